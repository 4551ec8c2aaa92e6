import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tapo.core.losses import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_pg_loss,
    generation_batch_count,
    get_loss_aggregation,
    register_loss_aggregation,
    tapo_total_loss,
)

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])  # masked sum 1 + 2 + 4 = 7 over 3 tokens


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("token_mean", {}, 7 / 3),
        ("token_mean", {"normalizer": 14.0}, 0.5),
        # Sequence means (1 + 2) / 2 = 1.5 and 4 / 1 = 4, averaged over B = 2: 2.75; or summed / 11: 0.5.
        ("seq_mean_token_mean", {}, 2.75),
        ("seq_mean_token_mean", {"normalizer": torch.tensor(11.0)}, 0.5),
        # 7 / (B * T) = 7 / 6; 7 / (B * max_len) = 7 / 14; an explicit normalizer wins over max_len.
        ("dr_grpo", {}, 7 / 6),
        ("dr_grpo", {"max_len": 7}, 0.5),
        ("dr_grpo", {"max_len": 7, "normalizer": 7.0}, 1.0),
    ],
)
def test_aggregations(mode, kwargs, expected):
    close(aggregate_loss(LOSS, MASK, mode, **kwargs), expected)


def test_empty_rows_and_masks_do_not_divide_by_zero():
    # Row 1 has no tokens: its sequence mean is 0 / max(0, 1) = 0 -> (1.5 + 0) / 2. An all-empty mask: 0 / max(0, 1).
    close(aggregate_loss(LOSS, torch.tensor([[1, 1, 0], [0, 0, 0]]), "seq_mean_token_mean"), 0.75)
    close(aggregate_loss(LOSS, torch.zeros(2, 3), "token_mean"), 0.0)


def test_aggregation_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
        aggregate_loss(LOSS, torch.ones(2, 2), "token_mean")
    with pytest.raises(KeyError, match=r"'seq_sum'.*\['dr_grpo', 'seq_mean_token_mean', 'token_mean'\]"):
        aggregate_loss(LOSS, MASK, "seq_sum")
    with pytest.raises(ValueError, match="already registered"):
        register_loss_aggregation("token_mean")(lambda loss, mask, normalizer, max_len: loss.sum())


def test_register_new_aggregation():
    try:
        register_loss_aggregation("test_sum")(lambda loss, mask, normalizer, max_len: (loss * mask).sum())
        assert get_loss_aggregation("test_sum") is LOSS_AGGREGATIONS["test_sum"]
        close(aggregate_loss(LOSS, MASK, "test_sum"), 7.0)
    finally:
        LOSS_AGGREGATIONS.pop("test_sum", None)


# Sequence 0 (A = +1): ratios 1.5 (above 1 + 0.2: clipped) and 0.9 (inside).
#   per-token loss -min(1.5, 1.2) = -1.2 and -min(0.9, 0.9) = -0.9.
# Sequence 1 (A = -1): ratios 0.5 (below 1 - 0.2: clipped) and 1.5 (above, but A < 0 keeps the unclipped term).
#   per-token loss -min(-0.5, -0.8) = 0.8 and -min(-1.5, -1.2) = 1.5 (masked out below).
RATIOS = torch.tensor([[1.5, 0.9], [0.5, 1.5]])
OLD = torch.full((2, 2), -1.0)
NEW = OLD + RATIOS.log()
ADV = torch.tensor([1.0, -1.0])
PG_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("seq_mean_token_mean", (-1.05 + 0.8) / 2),  # sequence means (-1.2 - 0.9) / 2 and 0.8 / 1
        ("token_mean", (-1.2 - 0.9 + 0.8) / 3),
        ("dr_grpo", (-1.2 - 0.9 + 0.8) / (2 * 2)),
    ],
)
def test_clipped_loss_inside_and_outside_the_clip(agg, expected):
    loss, _ = clipped_pg_loss(NEW, OLD, ADV, PG_MASK, agg=agg)
    close(loss, expected)


def test_clipped_loss_unmasked_negative_advantage_is_not_clipped_above():
    # Full mask adds 1.5 for token (1, 1): sequence means -1.05 and (0.8 + 1.5) / 2 = 1.15 -> 0.05.
    loss, stats = clipped_pg_loss(NEW, OLD, ADV, torch.ones(2, 2))
    close(loss, 0.05)
    close(stats["clip_low"], 0.25)  # token (1, 1) is outside the band but not clipped


def test_clip_stats():
    # Masked tokens: (0, 0) high-clipped, (1, 0) low-clipped, (0, 1) inside; ratio mean (1.5 + 0.9 + 0.5) / 3.
    _, stats = clipped_pg_loss(NEW, OLD, ADV, PG_MASK)
    close(stats["clip_high"], 1 / 3)
    close(stats["clip_low"], 1 / 3)
    close(stats["clip_region"], 2 / 3)
    close(stats["ratio_mean"], 2.9 / 3)
    assert "kl" not in stats and "weight_mean" not in stats


def test_per_token_advantages_and_asymmetric_clip():
    # eps_high = 0.6: ratio 1.5 now lies inside, so token (0, 0) gives -1.5 * 2 (A = 2 there) = -3.
    advantages = torch.tensor([[2.0, 1.0], [-1.0, -1.0]])
    loss, _ = clipped_pg_loss(NEW, OLD, advantages, PG_MASK, eps_high=0.6, agg="token_mean")
    close(loss, (-3.0 - 0.9 + 0.8) / 3)


def test_on_policy_gradient_is_advantage_weighted_log_likelihood():
    # old = logp.detach() (one optimizer step per generation batch): ratio 1, loss = -sum(A_i w_it) / 4 and
    # d loss / d logp_it = -A_i w_it / 4. Loss -(2 * 0.5 + 2 * 2 - 1 * 1 - 1 * 1) / 4 = -0.75.
    logprobs = torch.tensor([[-0.3, -2.0], [-1.0, -0.1]], requires_grad=True)
    weights = torch.tensor([[0.5, 2.0], [1.0, 1.0]], requires_grad=True)
    loss, _ = clipped_pg_loss(
        logprobs, logprobs.detach(), torch.tensor([2.0, -1.0]), torch.ones(2, 2), token_weights=weights,
        agg="token_mean",
    )
    loss.backward()
    close(loss.detach(), -0.75)
    close(logprobs.grad, [[-0.25, -1.0], [0.25, 0.25]])
    assert weights.grad is None


def test_clipped_tokens_get_no_gradient():
    logprobs = NEW.clone().requires_grad_(True)
    clipped_pg_loss(logprobs, OLD, ADV, PG_MASK)[0].backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[1, 0] == 0 and logprobs.grad[0, 1] != 0


def test_token_weights_scale_the_policy_term_and_stats():
    # Per-token losses [[-1.2, -0.9], [0.8, .]] times weights [[0.5, 2], [1, .]]: -0.6 - 1.8 + 0.8 = -1.6 over 3.
    # Weight stats over masked tokens only (the 9 is masked out): mean 3.5 / 3, min 0.5, max 2.
    weights = torch.tensor([[0.5, 2.0], [1.0, 9.0]])
    loss, stats = clipped_pg_loss(NEW, OLD, ADV, PG_MASK, token_weights=weights, agg="token_mean")
    close(loss, -1.6 / 3)
    close(stats["weight_mean"], 3.5 / 3)
    close(stats["weight_min"], 0.5)
    close(stats["weight_max"], 2.0)


def test_weight_stats_without_tokens_are_nan():
    _, stats = clipped_pg_loss(NEW, OLD, ADV, torch.zeros(2, 2), token_weights=torch.ones(2, 2))
    assert all(math.isnan(stats[f"weight_{k}"]) for k in ("mean", "min", "max"))


def test_kl_term_is_added_unweighted():
    # A = 0 silences the policy term. ref - logp = log 2: kl = 2 - log 2 - 1 = 0.3068528; ref - logp = 0: kl = 0.
    # beta 0.1, token mean over 2 tokens: 0.1 * 0.3068528 / 2. OTS weights of 5 must not touch it.
    logprobs = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-1.0 + math.log(2.0), -1.0]])
    kl = 2 - math.log(2.0) - 1
    loss, stats = clipped_pg_loss(
        logprobs, logprobs, torch.zeros(1), torch.ones(1, 2), token_weights=torch.full((1, 2), 5.0),
        ref_logprobs=ref, beta=0.1, agg="token_mean",
    )
    close(loss, 0.1 * kl / 2)
    close(stats["kl"], kl / 2)


def test_kl_is_logged_but_not_added_when_beta_is_zero():
    ref = torch.tensor([[-1.0 + math.log(2.0), -1.0]])
    loss, stats = clipped_pg_loss(ref * 0 - 1, ref * 0 - 1, torch.zeros(1), torch.ones(1, 2), ref_logprobs=ref)
    close(loss, 0.0)
    close(stats["kl"], (2 - math.log(2.0) - 1) / 2)


def test_delta_caps_the_unclipped_ratio():
    # Ratio 3 with A = -1: unclipped term -3 wins the min -> loss 3; delta = 2 caps it -> -min(-2, -1.2) = 2.
    logprobs, old = torch.tensor([[math.log(3.0)]]), torch.zeros(1, 1)
    close(clipped_pg_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 1))[0], 3.0)
    close(clipped_pg_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 1), delta=2.0)[0], 2.0)


def test_clipped_loss_errors():
    with pytest.raises(ValueError, match="must be equal"):
        clipped_pg_loss(NEW, OLD[:1], ADV, PG_MASK)
    with pytest.raises(ValueError, match="ref_logprobs"):
        clipped_pg_loss(NEW, OLD, ADV, PG_MASK, beta=0.1)


def test_tapo_total_loss():
    close(tapo_total_loss(torch.tensor(1.5), torch.tensor(2.0), ref_loss_weight=0.25), 2.0)  # 1.5 + 0.25 * 2
    close(tapo_total_loss(torch.tensor(1.5), None, ref_loss_weight=0.25), 1.5)


# Cross-check against TRL itself: run GRPOTrainer._compute_loss on a stand-in object carrying only the attributes
# it reads, with the model forward replaced by fixed log-probs.
class _Accelerator:
    num_processes = 2
    sync_gradients = True

    def reduce(self, tensor, reduction):
        return tensor

    def gather(self, tensor):
        return tensor


def _trl_loss(loss_type, logprobs, inputs, beta, delta, accumulation=3, steps_per_generation=2, max_len=6,
              bias_correction_kl=False):
    from trl.trainer import grpo_trainer  # a declared dependency: a moved module must fail, not skip
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation, max_completion_length=max_len,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=delta, steps_per_generation=steps_per_generation),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None),
    )
    loss = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


# The seeded draw below gives ratios exp(logprobs - old) = [[1.61, 1.39, 1.23, 0.98], [0.82, 0.74, ...], [0.83, ...]].
# These per-token advantages put 1.61 under A < 0 (delta 1.3 bites), 1.39 under A > 0 (high clip, eps_high 0.28) and
# 0.74 under A < 0 (low clip).
PER_TOKEN_ADVANTAGES = [[-1.3, 1.3, -1.3, 1.3], [-0.7, -0.7, 0.7, 0.7], [0.4, -0.4, 0.4, -0.4]]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize(("beta", "delta", "bias_correction_kl"), [(0.0, None, False), (0.04, 1.3, False),
                                                                   (0.04, 1.3, True)])
@pytest.mark.parametrize("advantages", [torch.tensor([1.3, -0.7, 0.4]), torch.tensor(PER_TOKEN_ADVANTAGES)])
def test_matches_trl_compute_loss(loss_type, beta, delta, bias_correction_kl, advantages):
    generator = torch.Generator().manual_seed(0)
    batch, length, accumulation, steps_per_generation, max_len, processes = 3, 4, 3, 2, 6, 2
    logprobs = -torch.rand(batch, length, generator=generator) * 2
    old = logprobs + (torch.rand(batch, length, generator=generator) - 0.5)  # ratios spread across the clip band
    ref = logprobs + (torch.rand(batch, length, generator=generator) - 0.5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    num_items = torch.tensor(20.0)  # tokens across the whole generation batch and all processes
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long), "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": num_items,
    }
    trl_loss, trl_metrics = _trl_loss(loss_type, logprobs, inputs, beta, delta, accumulation, steps_per_generation,
                                      max_len, bias_correction_kl)

    agg, normalizer, scale = {
        "grpo": ("seq_mean_token_mean", None, accumulation),
        "bnpo": ("token_mean", None, accumulation),
        "dr_grpo": ("dr_grpo", None, accumulation),
        "dapo": ("token_mean", num_items / processes * accumulation / steps_per_generation, 1),
    }[loss_type]
    loss, stats = clipped_pg_loss(
        logprobs, old, advantages, mask, eps_low=0.2, eps_high=0.28, ref_logprobs=ref, beta=beta, agg=agg,
        normalizer=normalizer, max_len=max_len, delta=delta, kl_ratio_correction=bias_correction_kl,
    )
    torch.testing.assert_close(loss / scale, trl_loss)
    if beta:
        assert stats["kl"].item() == pytest.approx(trl_metrics["kl"][0])
    for ours, trl_key in [("clip_low", "low"), ("clip_high", "high"), ("clip_region", "region")]:
        assert stats[ours].item() == pytest.approx(trl_metrics[f"clip_ratio/{trl_key}_mean"][0])
    if beta:
        assert stats["kl"].item() == pytest.approx(trl_metrics["kl"][0])


def test_generation_batch_count_per_aggregation():
    tokens, seqs = torch.tensor(30), torch.tensor(4)  # 4 sequences holding 30 masked tokens, padded to length 16
    assert generation_batch_count("token_mean", tokens, seqs, 16) == 30
    assert generation_batch_count("seq_mean_token_mean", tokens, seqs, 16) == 4
    assert generation_batch_count("dr_grpo", tokens, seqs, 16) == 64
    with pytest.raises(ValueError, match="no count for loss aggregation 'seq_sum'"):
        generation_batch_count("seq_sum", tokens, seqs, 16)
