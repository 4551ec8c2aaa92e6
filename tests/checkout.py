"""The environment for subprocess tests: they must run the checkout under test, not whichever `tapo` pip installed."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def checkout_env(**extra: str) -> dict[str, str]:
    """os.environ with REPO_ROOT first on PYTHONPATH (so `python -m tapo.cli` imports this checkout) plus `extra`."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
