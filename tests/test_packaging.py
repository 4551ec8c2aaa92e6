"""What a user installs: the wheel works without the source tree, the version is the same everywhere, and the PyPI
package `tapo` (a TP-Link client with the same import name) is named plainly instead of breaking imports."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import tapo
from tapo.cli import main
from tapo.collision import foreign_tapo

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from; everything else in the checkout (tests, benchmarks, runs) must not be needed.
BUILD_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "tapo"]


def test_version_is_the_same_in_package_cli_pyproject_and_changelog(capsys):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tapo.version.__version__"}
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"tapo-rl {tapo.__version__} (trl ")
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", (REPO / "CHANGELOG.md").read_text(), flags=re.M)
    assert releases[0] == tapo.__version__  # the newest release heading is the version being built
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert (REPO / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]


def fake_foreign_tapo(site: Path, so_beside_ours: Path | None = None) -> None:
    """The TP-Link client's metadata as pip leaves it (name `tapo`, a compiled `tapo/tapo.*.so` in its RECORD)."""
    info = site / "tapo-0.12.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.4\nName: tapo\nVersion: 0.12.0\n")
    (info / "RECORD").write_text("tapo/__init__.py,,\ntapo/tapo.cpython-311-x86_64-linux-gnu.so,,\n")


def test_the_tp_link_tapo_package_is_found_in_either_place(tmp_path):
    assert foreign_tapo(tapo.__path__) is None  # this checkout, with its own old editable `tapo` install if any
    ours = tmp_path / "site" / "tapo"
    ours.mkdir(parents=True)
    (ours / "__init__.py").write_text("")
    assert foreign_tapo([str(ours)], search_path=[str(tmp_path / "site")]) is None
    (ours / "tapo.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")  # installed into the same folder
    assert foreign_tapo([str(ours)]) == str(ours / "tapo.cpython-311-x86_64-linux-gnu.so")
    other = tmp_path / "other-site"
    fake_foreign_tapo(other)  # installed elsewhere on the path
    assert foreign_tapo(tapo.__path__, search_path=[str(other)]) == str(other / "tapo/tapo.cpython-311-x86_64-linux-gnu.so")


def test_import_and_command_name_the_collision(tmp_path, capsys, monkeypatch):
    fake_foreign_tapo(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    proc = subprocess.run([sys.executable, "-c", "import tapo"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("ImportError: This environment also holds the PyPI package "
                                                           "`tapo`")
    assert "pip uninstall -y tapo tapo-rl && pip install tapo-rl" in proc.stderr
    # The other package's __init__ replaced ours, so `import tapo` did not check: the command does.
    monkeypatch.setattr("tapo.collision.foreign_tapo", lambda dirs: "/site/tapo/tapo.cpython-311-x86_64-linux-gnu.so")
    assert main(["--version"]) == 2
    assert "TP-Link" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The wheel, installed into a fresh virtual environment, used from a folder that is not the checkout.

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the build inputs (so a stale build/ in the checkout cannot leak into it), with the
    installed setuptools (no build isolation: no index needed)."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src],
                   check=True, timeout=300)
    (built,) = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv that sees the system's torch & co (--system-site-packages) and holds only the wheel of its own.
    The system may also hold an editable install of this checkout; `--ignore-installed` puts the wheel in the venv
    regardless, and the venv's site-packages come first on its path."""
    env_dir = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", env_dir], check=True)
    subprocess.run([env_dir / "bin/python", "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel],
                   check=True, timeout=300)
    return env_dir


def in_venv(venv: Path, cwd: Path, command: str, *args: str) -> subprocess.CompletedProcess:
    """`command` from the venv's bin/, in `cwd`, with no PYTHONPATH pointing back at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([venv / "bin" / command, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_wheel_holds_the_package_its_data_and_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert wheel.name == f"tapo_rl-{tapo.__version__}-py3-none-any.whl"
    assert "tapo/templates/model_card.md" in names and "tapo/core/verify.py" in names  # read/run by path at run time
    assert {n.split("/")[0] for n in names} == {"tapo", f"tapo_rl-{tapo.__version__}.dist-info"}  # no tests, benchmarks
    metadata = zipfile.ZipFile(wheel).read(f"tapo_rl-{tapo.__version__}.dist-info/METADATA").decode()
    assert "Name: tapo-rl" in metadata and "License-Expression: Apache-2.0" in metadata
    assert f"tapo_rl-{tapo.__version__}.dist-info/licenses/LICENSE" in names
    entry_points = zipfile.ZipFile(wheel).read(f"tapo_rl-{tapo.__version__}.dist-info/entry_points.txt").decode()
    assert "tapo = tapo.cli:main" in entry_points


def test_installed_wheel_runs_train_eval_and_coldstart_outside_the_checkout(venv, tmp_path):
    where = in_venv(venv, tmp_path, "python", "-c", "import json, importlib.metadata as m, importlib.resources as r, "
                    "tapo; print(json.dumps([tapo.__file__, str(r.files('tapo') / 'templates/model_card.md'), "
                    "m.version('tapo-rl')]))")
    assert where.returncode == 0, where.stderr[-3000:]
    package_file, template, installed_version = json.loads(where.stdout)
    site = venv.resolve()
    assert Path(package_file).resolve().is_relative_to(site) and Path(template).resolve().is_relative_to(site)
    assert installed_version == tapo.__version__

    version = in_venv(venv, tmp_path, "tapo", "--version")
    assert version.returncode == 0 and version.stdout.startswith(f"tapo-rl {tapo.__version__} ")

    train = in_venv(venv, tmp_path, "tapo", "train", "--model", "tiny", "--max_steps", "1", "--n_train", "4",
                    "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "8",
                    "--output_dir", "run")
    assert train.returncode == 0, train.stderr[-3000:]
    assert "run folder: run" in train.stdout
    assert f"- tapo (tapo-rl): {tapo.__version__}" in (tmp_path / "run/final/README.md").read_text()

    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"problem": "1 + 1", "answer": "2"}\n{"problem": "2 + 3", "answer": "5"}\n')
    evaluation = in_venv(venv, tmp_path, "tapo", "eval", "--model", "tiny", "--data", str(problems), "--k", "1",
                         "--max-tokens", "8", "--out", "eval")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert json.loads((tmp_path / "eval/summary.json").read_text())["benchmarks"]["problems"]["n_problems"] == 2

    coldstart = in_venv(venv, tmp_path, "tapo", "coldstart", "--help")
    assert coldstart.returncode == 0 and "build" in coldstart.stdout and "train" in coldstart.stdout
