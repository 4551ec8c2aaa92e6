"""Six things that keep a CPU training process small and quick (measured on SmolLM2: `benchmarks/README.md`, memory).

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

Only labelled positions through the LM head on the CPU. TRL's fused head scores every position of a row (prompt and
padding too) unless Triton runs it, to keep tile shapes fixed for compilers (Neuron); eager CPU code has no such need,
and a row of the embedded default is ~65 prompt positions and ~105 completion positions (TRL's own log-probs of the
first steps). `score_labelled_positions_only()` gives the CPU TRL's CUDA path, `hidden_states[mask]`: the head's
GEMMs, forward and backward, over the completion only.

A tied LM head's gradient goes into the parameter's `.grad` at once (one process on the CPU). With the head tied to
the embedding, autograd keeps the head's (vocab, hidden) fp32 gradient (113 MB for SmolLM2) in the shared weight's
input buffer through the whole backward, until the embedding's own dense gradient (another 113 MB) arrives at the end
and the two are summed. `accumulate_tied_head_gradient(model)` hands TRL's fused head a detached alias of the weight
whose gradient is added to the weight's `.grad` as soon as the head's backward ends, and makes the embedding's
gradient sparse (the rows the batch used), which autograd adds into that dense `.grad` in place. The sum is the same
up to float rounding (another order). One process only: DDP, FSDP and DeepSpeed count on autograd's accumulation.

Fewer activations kept for the backward. Autograd keeps ~11.6k floats per token and decoder layer of SmolLM2; 4.4k
of them are elementwise results that are cheap to recompute: each RMSNorm's normalized input (its input is kept
anyway), and in the MLP silu(gate) and silu(gate) * up (down_proj's input). `lean_activations(model)` makes the norms
keep only their input (`torch.utils.checkpoint` around the norm alone) and the MLP keep only gate and up
(`_ProjectedProduct`: down_proj of the product, recomputing the product in the backward). No GEMM runs twice, the
forward is the same computation, and the gradients are those autograd computes (bit-identical in
tests/test_memory.py): 38% fewer activation bytes (0.13 GiB for a 300-token row); the default run's peak fell from
3.39-3.43 to 3.31 GiB, the rest of the peak being the tied LM head's gradient buffers and heap slack.

Activation checkpointing for the long micro-batches only (`activation_checkpointing_min_tokens`). A training loop's
peak is the weights, gradients and optimizer state plus the activations of its longest micro-batch; checkpointing
every micro-batch (TRL's `gradient_checkpointing`) lowers that peak but recomputes every forward. `checkpointing(layers)`
turns transformers' own per-layer checkpointing on for one forward: the trainers do so when a micro-batch holds at
least that many token positions, so only the micro-batches that set the peak pay for the recomputation.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import types

import torch
import torch.nn.functional as F
import trl.trainer.utils as trl_utils
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

CPU_LM_HEAD_TILE = 8192  # vocabulary columns per tile of TRL's fused LM head when it runs on the CPU
_LAYER_CHECKPOINT = functools.partial(checkpoint, use_reentrant=False)  # what `checkpointing` gives each layer


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


def score_labelled_positions_only() -> None:
    """TRL's fused LM head (`add_fused_lm_head`) projects only the positions with a label on the CPU too, as it does
    where Triton runs (`compact`); the process-wide switch is TRL's `_use_triton` in trl.trainer.utils, which decides
    nothing else there. Calling it again changes nothing."""
    if not hasattr(trl_utils, "_use_triton"):
        raise RuntimeError("trl.trainer.utils._use_triton is gone (TRL changed its fused LM head): update "
                           "tapo.memory.score_labelled_positions_only")
    if getattr(trl_utils._use_triton, "_tapo_compact_on_cpu", False):
        return
    compact_elsewhere = trl_utils._use_triton

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or compact_elsewhere(device)

    compact._tapo_compact_on_cpu = True
    compact.trl_use_triton = compact_elsewhere  # TRL's own switch (benchmarks/logprob_pass.py compares both)
    trl_utils._use_triton = compact


class _HeadIntoGrad:
    """Stand-in for TRL's `_ChunkedLogProbFunction` in `trl.trainer.utils`: `apply` passes the head's weight as a
    detached alias whose accumulated gradient is moved into the weight's `.grad` (module docstring)."""

    function = trl_utils._ChunkedLogProbFunction if hasattr(trl_utils, "_ChunkedLogProbFunction") else None

    @classmethod
    def apply(cls, hidden, weight, *rest):
        if not (getattr(weight, "_tapo_grad_at_once", False) and torch.is_grad_enabled() and weight.requires_grad):
            return cls.function.apply(hidden, weight, *rest)
        alias = weight.detach().requires_grad_()
        alias.register_post_accumulate_grad_hook(functools.partial(_add_to_grad, weight))
        return cls.function.apply(hidden, alias, *rest)


def _add_to_grad(weight: torch.Tensor, alias: torch.Tensor) -> None:
    if weight.grad is None:
        weight.grad = alias.grad
    else:
        weight.grad.add_(alias.grad)
    alias.grad = None


def accumulate_tied_head_gradient(model: nn.Module) -> bool:
    """For a model whose LM head is tied to an `nn.Embedding` (one process): the head's gradient into `.grad` at once,
    the embedding's sparse (module docstring). Returns whether the model was changed; an untied head is left alone."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or type(embedding) is not nn.Embedding or head.weight is not embedding.weight:
        return False
    if _HeadIntoGrad.function is None:
        raise RuntimeError("trl.trainer.utils._ChunkedLogProbFunction is gone (TRL changed its fused LM head): update "
                           "tapo.memory.accumulate_tied_head_gradient")
    trl_utils._ChunkedLogProbFunction = _HeadIntoGrad
    head.weight._tapo_grad_at_once = True
    embedding.sparse = True
    return True


class _ProjectedProduct(torch.autograd.Function):
    """F.linear(act(gate) * up, weight), keeping gate, up and weight for the backward instead of act(gate) and the
    product: the backward recomputes both (elementwise), then does what autograd does for the linear and the product,
    under the autocast state the forward ran in (mixed precision: the GEMMs in the autocast dtype, as in the forward)."""

    @staticmethod
    def forward(ctx, gate, up, weight, act):
        device = gate.device.type
        ctx.act = act
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(gate, up, weight)
        return F.linear(act(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        need_gate, need_up, need_weight = ctx.needs_input_grad[:3]
        with torch.autocast(gate.device.type, dtype=ctx.autocast, enabled=ctx.autocast is not None):
            with torch.enable_grad():
                gate, up = gate.detach().requires_grad_(need_gate), up.detach().requires_grad_(need_up)
                product = ctx.act(gate) * up
            grad_weight = (grad_out.flatten(0, -2).t().mm(product.detach().flatten(0, -2)).to(weight.dtype)
                           if need_weight else None)
            inputs = [t for t, need in ((gate, need_gate), (up, need_up)) if need]
            grads = iter(torch.autograd.grad(product, inputs, grad_out.matmul(weight).to(product.dtype))
                         if inputs else ())
        return (next(grads) if need_gate else None), (next(grads) if need_up else None), grad_weight, None


def _is_gated_mlp(module: nn.Module) -> bool:
    """Llama / Qwen / Mistral-style MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)) with plain bias-free Linears
    (a peft-wrapped projection is not one, and is left alone). The formula is checked on a probe input against the
    module's own forward, so an MLP with these parts but another forward is left alone too."""
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not (all(type(p) is nn.Linear and p.bias is None for p in projections) and callable(getattr(module, "act_fn", None))):
        return False
    weight = module.gate_proj.weight
    probe = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        return torch.equal(module(probe), module.down_proj(module.act_fn(module.gate_proj(probe)) * module.up_proj(probe)))


def _lean_mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad or self.down_proj.weight.requires_grad):
        return _ProjectedProduct.apply(gate, up, self.down_proj.weight, self.act_fn)
    return self.down_proj(self.act_fn(gate) * up)


def _lean_norm_forward(self, hidden_states):
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        return checkpoint(type(self).forward, self, hidden_states, use_reentrant=False, preserve_rng_state=False)
    return type(self).forward(self, hidden_states)


def lean_activations(model: nn.Module) -> int:
    """Recompute the elementwise activations of `model`'s RMSNorms and gated MLPs in the backward instead of keeping
    them (module docstring); returns how many modules it changed (tests/test_memory.py compares outputs and gradients
    with the plain modules). A module already changed is skipped, so calling it twice changes nothing. The new
    forwards are bound methods, so a deep copy of the model computes with its own weights."""
    changed = 0
    for module in model.modules():
        if getattr(module, "_tapo_lean", False):
            continue
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_lean_norm_forward, module)
        elif _is_gated_mlp(module):
            module.forward = types.MethodType(_lean_mlp_forward, module)
        else:
            continue
        module._tapo_lean = True
        changed += 1
    return changed


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of `model` that transformers can checkpoint one by one (its decoder blocks)."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


@contextlib.contextmanager
def checkpointing(layers: list[nn.Module], enabled: bool = True):
    """Within the block, each of `layers` (`decoder_layers`) that does not checkpoint already keeps only its input for
    the backward and recomputes the rest there. torch's non-reentrant checkpoint: it needs no input that requires grad,
    and the norms' own checkpoints (`lean_activations`) nest in it. The recomputation is recorded when the forward
    runs, so a forward made inside the block is backpropagated as checkpointed after the block has ended."""
    switched = [layer for layer in layers if not layer.gradient_checkpointing] if enabled else []
    for layer in switched:
        layer._gradient_checkpointing_func = _LAYER_CHECKPOINT
        layer.gradient_checkpointing = True
    try:
        yield
    finally:
        for layer in switched:
            layer.gradient_checkpointing = False
