"""tapo: Trajectory-Augmented Policy Optimization on top of TRL's GRPO.

`from tapo import TAPOConfig, TAPOTrainer` mirrors `from trl import GRPOConfig, GRPOTrainer`. The trainer classes are
imported lazily so that `tapo.core` stays importable without loading TRL.
"""

__all__ = ["TAPOConfig", "TAPOTrainer", "__version__"]

from tapo.collision import collision_message, foreign_tapo
from tapo.version import __version__

_foreign = foreign_tapo(__path__)
if _foreign is not None:
    raise ImportError(collision_message(_foreign))


def __getattr__(name):
    if name == "TAPOConfig":
        from tapo.config import TAPOConfig

        return TAPOConfig
    if name == "TAPOTrainer":
        from tapo.trainer import TAPOTrainer

        return TAPOTrainer
    raise AttributeError(f"module 'tapo' has no attribute {name!r}")
