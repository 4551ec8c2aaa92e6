"""The version of tapo-rl: the only place it is written (pyproject, `tapo --version` and model cards read it)."""

__version__ = "0.1.0"
