"""Which process of a multi-process run (torchrun, accelerate launch) speaks to the user."""

import os


def is_main_process() -> bool:
    """True for a single process and for global rank 0. The launchers put RANK in every process's environment before
    Python starts, so this holds before torch.distributed is set up (dataset loading, the run folder's files) and
    names the process that the Trainer's `is_world_process_zero` reports later."""
    return os.environ.get("RANK", "0") == "0"
