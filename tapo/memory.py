"""Two things that keep a CPU training process small (measured on SmolLM2: `benchmarks/README.md`, memory).

Freed memory goes back to the OS at the boundaries of a training step (glibc's malloc; a no-op elsewhere). glibc
raises its mmap threshold (up to 32 MiB) the first time a large block is freed, so from then on the 1-3 MB
activation tensors of every forward come from the heap, and a heap only shrinks from its top: after an optimizer
step a SmolLM2 training loop still held 3.4 GiB, 1.4 GiB of it free heap, carried into the next generation and
backward. `malloc_trim(0)` returns every free page, from the middle of the heap too (glibc >= 2.8). It is called
twice per step, after generation (the generation cache is gone) and after the optimizer step (the gradients are
gone): a few ms each, plus page faults when the memory is used again. A fixed small mmap threshold would avoid the
slack altogether, but made an allocation-heavy loop of activation-sized tensors 45% slower in CPU time (page faults
on every fresh block), so it is not set.

Smaller LM-head tiles on the CPU. TRL's fused LM head scores the vocabulary in tiles of 32768 columns; without
Triton each tile becomes ~4 float32 temporaries of (tokens, 32768), forward and backward: ~130 MB for a 250-token
row. Tiles of 8192 columns cut the peak by 0.14 GiB (3.36 -> 3.22 GiB in a 2-step SmolLM2 train-side loop); the
GEMMs stay 8192 columns wide. The log-probs change only in float rounding (the online logsumexp adds the tiles in
another grouping).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import trl.trainer.utils as trl_utils
from transformers import TrainerCallback

CPU_LM_HEAD_TILE = 8192  # vocabulary columns per tile of TRL's fused LM head when it runs on the CPU


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (musl, macOS, Windows: nothing to trim this way)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Give the allocator's free memory back to the OS; True when some was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


class ReleaseFreedMemory(TrainerCallback):
    """After every optimizer step (the Trainer has zeroed the gradients by then), release what the step freed."""

    def on_step_end(self, args, state, control, **kwargs):
        release_freed_memory()


def use_small_lm_head_tiles() -> None:
    """TRL's fused LM head (`add_fused_lm_head`, read at every call) in CPU_LM_HEAD_TILE-column tiles. For a process
    that trains on the CPU only: the setting is TRL's module-wide one."""
    if not hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        raise RuntimeError("trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE is gone (TRL changed its fused LM head): "
                           "update tapo.memory.use_small_lm_head_tiles")
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, CPU_LM_HEAD_TILE)
