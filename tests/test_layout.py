"""The module layout that the README's "Layout" section describes: imports go down its table (so `tapo.core` imports
nothing above it and no import circle exists), and every module imports on its own.
"""

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import tapo

ROOT = Path(tapo.__file__).parent
MODULES = {"tapo": ROOT / "__init__.py"}
for info in pkgutil.walk_packages([str(ROOT)], "tapo."):
    relative = Path(*info.name.split(".")[1:])
    MODULES[info.name] = ROOT / relative / "__init__.py" if info.ispkg else ROOT / relative.with_suffix(".py")


# The README's "Layout" table, top to bottom: a module may import only modules of its own row or of a row below.
LAYERS = [
    ("tapo.cli",), ("tapo.coldstart", "tapo.evaluation", "tapo.arith_policy"), ("tapo.run",), ("tapo.plots",),
    ("tapo.opsd",), ("tapo.trainer",), ("tapo.trainer_base",), ("tapo.config",), ("tapo.construct",),
    ("tapo.runfolder", "tapo.modelcard", "tapo.progress"), ("tapo.data", "tapo.models"), ("tapo.arith",), ("tapo.core",),
    ("tapo.verifier_pool", "tapo.ranks", "tapo.collision", "tapo.version", "tapo.quiet", "tapo.memory"),
]


def layer(name: str) -> int | None:
    """The row of `name` (a module of a listed package counts as the package's row); None for the package itself."""
    rows = [i for i, prefixes in enumerate(LAYERS) for p in prefixes if name == p or name.startswith(p + ".")]
    return rows[0] if rows else None


def tapo_imports(name: str) -> set[str]:
    """The tapo modules that `name` imports anywhere in its file: at the top or inside a function (a lazy import still
    closes a circle at run time)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            # `from tapo import runfolder` imports the module tapo.runfolder; `from tapo.x import f` imports tapo.x
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names}
    return found - {name}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle [a, b, ..., a] of `graph`, or None (depth-first search, three colours)."""
    state, path = {}, []

    def visit(node):
        state[node], path[len(path):] = "open", [node]
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        state[node] = "done"
        path.pop()
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node))), None)


def test_find_circle_finds_one_and_only_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles():
    graph = {name: tapo_imports(name) for name in MODULES}
    assert len(graph) > 20 and graph["tapo.run"] >= {"tapo.config", "tapo.runfolder"}  # the scan sees the imports
    assert find_circle(graph) is None, f"import circle: {' -> '.join(find_circle(graph))}"


def test_imports_go_down_the_layout_table():
    assert [name for name in MODULES if layer(name) is None] == ["tapo"]  # every module has its row
    upward = [(name, imported) for name in MODULES if name != "tapo" for imported in tapo_imports(name)
              if layer(imported) < layer(name)]
    assert upward == []
    assert tapo_imports("tapo.verifier_pool") == set()  # run as a script by its workers: the standard library only


def test_every_module_imports_on_its_own():
    # Before each module, every tapo module is dropped from sys.modules, so each import starts from nothing of tapo
    # (third-party libraries stay loaded, which only saves time); the original modules are put back afterwards.
    saved = {m: sys.modules[m] for m in list(sys.modules) if m == "tapo" or m.startswith("tapo.")}
    try:
        for name in sorted(MODULES):
            for loaded in [m for m in sys.modules if m == "tapo" or m.startswith("tapo.")]:
                del sys.modules[loaded]
            importlib.import_module(name)
    finally:
        for loaded in [m for m in sys.modules if m == "tapo" or m.startswith("tapo.")]:
            del sys.modules[loaded]
        sys.modules.update(saved)
