"""Clipped policy-gradient loss (TRL 1.16 GRPO numbers), loss aggregation modes, and the TAPO total loss.

Per token t of sequence i (TRL `GRPOTrainer._compute_loss`, importance_sampling_level="token"):

    ratio_it = exp(logp_it - old_logp_it)
    l_it     = -min(ratio_it * A_i, clamp(ratio_it, 1 - eps_low, 1 + eps_high) * A_i) * w_it + beta * kl_it
    kl_it    = exp(ref_it - logp_it) - (ref_it - logp_it) - 1          (k3 estimator of KL(pi || pi_ref))
               times ratio_it with kl_ratio_correction (TRL's use_bias_correction_kl, its default: the unbiased
               reverse-KL gradient; the ratio is differentiable, so this changes the gradient even where it is 1)
    with delta (TRL's two-sided clipping) the unclipped ratio_it inside the min() is capped at delta.

w_it are optional OTS weights (constants). They scale only the policy term: the KL term stays unweighted, as TRL adds
beta * kl after every other per-token factor (vLLM IS ratio, entropy mask) has been applied to the policy term.

Old log-probs of a constructed trajectory (the contract the trainer follows). A micro-reflective trajectory contains
tokens the policy never sampled (the diagnosis and corrected reasoning it wrote under a different, synthesis prompt,
spliced after the copied prefix). Its old_logprobs are the behaviour policy's log-probs *at construction time*: the same
model's log-probs of the constructed sequence under the training prompt, computed in the no-grad pass right after
construction, whenever the trainer computes old log-probs at all. When a generation batch feeds exactly one optimizer
step (num_iterations == 1), TRL skips that pass and uses old = logp.detach(); then ratio == 1, nothing is clipped, and
the policy term's gradient is the advantage-weighted log-likelihood gradient -A_i * w_it * grad log p_it.

Aggregations (all over `mask`; `normalizer` overrides the default so a trainer can pass global counts, e.g. tokens
summed across processes and accumulation steps):
    token_mean           sum(l * m) / normalizer, default mask.sum() (>= 1)          TRL "bnpo"; "dapo" w/ normalizer
    seq_mean_token_mean  sum_i [sum_t l*m / max(sum_t m, 1)] / normalizer, default B  TRL "grpo"
    dr_grpo              sum(l * m) / normalizer, default B * (max_len or T)          TRL "dr_grpo" (max_len =
                                                                                      max_completion_length)
TRL then divides "grpo"/"bnpo"/"dr_grpo" by the gradient-accumulation steps; that is the trainer's job, not this file's.
For "dapo" TRL passes normalizer = num_items_in_batch / num_processes * grad_accum_steps / steps_per_generation.
"""

import torch
from torch import Tensor

from tapo.core.registry import Registry

# Each aggregation is fn(per_token_loss, mask, normalizer, max_len) -> scalar.
LOSS_AGGREGATIONS = Registry("loss aggregation")
register_loss_aggregation = LOSS_AGGREGATIONS.register  # decorator: @register_loss_aggregation("name")
get_loss_aggregation = LOSS_AGGREGATIONS.lookup


@register_loss_aggregation("token_mean")
def _token_mean(loss: Tensor, mask: Tensor, normalizer: float | Tensor | None, max_len: int | None) -> Tensor:
    return (loss * mask).sum() / (mask.sum().clamp(min=1.0) if normalizer is None else normalizer)


@register_loss_aggregation("seq_mean_token_mean")
def _seq_mean_token_mean(loss: Tensor, mask: Tensor, normalizer: float | Tensor | None, max_len: int | None) -> Tensor:
    per_sequence = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_sequence.sum() / (loss.shape[0] if normalizer is None else normalizer)


@register_loss_aggregation("dr_grpo")
def _dr_grpo(loss: Tensor, mask: Tensor, normalizer: float | Tensor | None, max_len: int | None) -> Tensor:
    default = loss.shape[0] * (max_len or loss.shape[1])
    return (loss * mask).sum() / (default if normalizer is None else normalizer)


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str,
    normalizer: float | Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss over the (B, T) 0/1 `mask` to a scalar with the aggregation `mode`.

    token_mean: sum(l*m) / (normalizer or max(sum m, 1)); seq_mean_token_mean: sum_i mean_t(l_i) / (normalizer or B);
    dr_grpo: sum(l*m) / (normalizer or B * (max_len or T)).
    """
    if per_token_loss.dim() != 2 or per_token_loss.shape != mask.shape:
        raise ValueError(
            f"aggregate_loss: per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} "
            "must be equal (B, T) shapes"
        )
    return get_loss_aggregation(mode)(per_token_loss, mask.to(per_token_loss.dtype), normalizer, max_len)


def generation_batch_count(mode: str, num_tokens: Tensor, num_seqs: Tensor, max_len: int) -> Tensor:
    """What aggregation `mode` divides by over a whole generation batch: its masked tokens (token_mean), its sequences
    (seq_mean_token_mean) or sequences * max_len (dr_grpo). A trainer that splits the batch into micro-batches passes
    this count (rescaled to its accumulation window) as `normalizer`, so that the micro-batch losses add up to the
    batch's, however the rows fall (TRL's "dapo" normalization, for every aggregation)."""
    if mode == "token_mean":
        return num_tokens
    if mode == "seq_mean_token_mean":
        return num_seqs
    if mode == "dr_grpo":
        return num_seqs * max_len
    raise ValueError(f"generation_batch_count: no count for loss aggregation {mode!r}; known: {sorted(LOSS_AGGREGATIONS)}")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def clipped_pg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    token_weights: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    agg: str = "seq_mean_token_mean",
    normalizer: float | Tensor | None = None,
    max_len: int | None = None,
    delta: float | None = None,
    kl_ratio_correction: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped surrogate over (B, T) tokens; returns (loss, detached stats). Formulas: module docstring.

    advantages: (B,) per sequence or (B, T) per token. token_weights: (B, T) OTS weights, detached here.
    delta: TRL's two-sided clipping, caps the unclipped ratio at delta (ratio = min(ratio, delta)) in the min().
    kl_ratio_correction: multiply the KL term by the (uncapped) ratio, as TRL's use_bias_correction_kl.
    Stats (detached; means over this batch's masked tokens): clip_low/clip_high/clip_region (TRL's
    clip_ratio/{low,high,region}_mean), ratio_mean, kl (when ref_logprobs is given), weight_mean/weight_min/weight_max
    (when token_weights is given; NaN without masked tokens).
    """
    if logprobs.dim() != 2 or not logprobs.shape == old_logprobs.shape == mask.shape:
        raise ValueError(
            f"clipped_pg_loss: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must be equal (B, T) shapes"
        )
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("clipped_pg_loss: beta != 0 needs ref_logprobs")
    mask = mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)

    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    capped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(capped_ratio * advantages, clipped_ratio * advantages)
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights.detach()
    if ref_logprobs is not None:
        log_ref_ratio = ref_logprobs - logprobs
        per_token_kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        if kl_ratio_correction:
            per_token_kl = per_token_kl * ratio
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * per_token_kl
    loss = aggregate_loss(per_token_loss, mask, agg, normalizer, max_len)

    with torch.no_grad():
        # Same definitions as TRL's clip_ratio metrics: a token counts as clipped only where clipping changes the
        # loss (ratio below the band with A < 0, above it with A > 0).
        low_clipped = ((capped_ratio < 1 - eps_low) & (advantages < 0)).to(mask.dtype)
        high_clipped = ((capped_ratio > 1 + eps_high) & (advantages > 0)).to(mask.dtype)
        stats = {
            "clip_low": _masked_mean(low_clipped, mask),
            "clip_high": _masked_mean(high_clipped, mask),
            "clip_region": _masked_mean(torch.maximum(low_clipped, high_clipped), mask),
            "ratio_mean": _masked_mean(ratio, mask),
        }
        if ref_logprobs is not None:
            stats["kl"] = _masked_mean(per_token_kl, mask)
        if token_weights is not None:
            weights = token_weights.detach()[mask.bool()]
            weights = weights if weights.numel() else mask.new_tensor([torch.nan])  # no tokens: NaN, as TRL's nanmin
            stats["weight_mean"], stats["weight_min"] = weights.mean(), weights.min()
            stats["weight_max"] = weights.max()
    return loss, stats


def tapo_total_loss(grpo_loss: Tensor, ref_loss: Tensor | None, ref_loss_weight: float = 1.0) -> Tensor:
    """L = L_GRPO + lambda * L_ref, with lambda = ref_loss_weight; L_GRPO alone when there is no ref loss."""
    return grpo_loss if ref_loss is None else grpo_loss + ref_loss_weight * ref_loss
