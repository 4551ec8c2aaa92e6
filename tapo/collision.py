"""The import name `tapo` is shared with an unrelated PyPI distribution named `tapo`, a TP-Link smart-home client
whose package is a compiled module `tapo/tapo.*.so` behind a one-line `tapo/__init__.py`. This project installs as
`tapo-rl`, but keeps `import tapo`. Installed into one environment, the two write into the same `tapo/` folder (or
shadow each other from two folders on sys.path), and whichever came last breaks the other with an import error that
names neither. `foreign_tapo` finds the other one, so `import tapo` and the `tapo` command can say so plainly.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import sys
from collections.abc import Iterable

FOREIGN_DISTRIBUTION = "tapo"


def foreign_tapo(package_dirs: Iterable[str], search_path: list[str] | None = None) -> str | None:
    """Where the other `tapo` is installed, or None. Two signs, either suffices: its compiled module `tapo.tapo`
    inside one of our package folders (this package has no module of that name), or a distribution named `tapo`
    on `search_path` (default sys.path) that ships that module. Our own old editable install (this project was
    called `tapo` before 0.1.0 was published) ships no such file, so it does not count."""
    for folder in package_dirs:
        hits = sorted(glob.glob(os.path.join(folder, "tapo.*")))
        if hits:
            return hits[0]
    for dist in importlib.metadata.distributions(name=FOREIGN_DISTRIBUTION, path=search_path or sys.path):
        for file in dist.files or ():
            if len(file.parts) == 2 and file.parts[0] == "tapo" and file.name.startswith("tapo."):
                return str(dist.locate_file(file))
    return None


def collision_message(found: str) -> str:
    return (
        f"This environment also holds the PyPI package `tapo` ({found}), a TP-Link smart-home client that is unrelated "
        "to TAPO training but uses the same import name `tapo`, so one package overwrites or hides the other. Keep them "
        "in separate virtual environments. To repair this one: pip uninstall -y tapo tapo-rl && pip install tapo-rl"
    )
