"""tapo: Trajectory-Augmented Policy Optimization on top of TRL's GRPO.

`from tapo import TAPOConfig, TAPOTrainer` mirrors `from trl import GRPOConfig, GRPOTrainer`. The trainer classes are
imported lazily so that `tapo.core` stays importable without loading TRL.
"""

__version__ = "0.1.0"  # the only place the version is written: pyproject, `tapo --version` and model cards read it
__all__ = ["TAPOConfig", "TAPOTrainer"]

from tapo.collision import collision_message, foreign_tapo

_foreign = foreign_tapo(__path__)
if _foreign is not None:
    raise ImportError(collision_message(_foreign))


def __getattr__(name):
    if name in __all__:
        from tapo import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'tapo' has no attribute {name!r}")
