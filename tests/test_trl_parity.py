"""Where the TAPO path re-runs a piece of TRL on constructed rows, it behaves as TRL's own pass does: reward-function
logs, the chunked no-grad log-prob passes, missing (NaN) rewards. Scripted rollouts on the tiny model (see
test_trainer.py); everything after generation is the real code."""

import pytest
import torch

from tapo.config import TAPOConfig
from tapo.core.losses import clipped_pg_loss
from tapo.core.verify import math_reward
from tapo.trainer_base import completion_text

from scripted import K, generation_batch
from test_trainer import make_trainer


def logging_reward(prompts, completions, answer, log_extra, log_metric, **kwargs):
    """math_reward that also logs a column (the text it scored) and a metric (its mean reward), as TRL allows."""
    rewards = math_reward(prompts, completions, answer)
    log_extra("scored_text", [completion_text(c) for c in completions])
    log_metric("logged_accuracy", sum(rewards) / len(rewards))
    return rewards


def test_rescoring_constructions_does_not_leak_reward_function_logs(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    trainer.reward_funcs = [logging_reward]
    for batch in (1, 2):
        out = generation_batch(trainer)
        assert int(out["constructed_rows"].sum()) == 4  # constructions were built, so rescoring ran
        # Nothing queued by the rescoring waits to be flushed into the next batch's logs.
        assert not trainer._pending_extra_logs and not trainer._pending_metrics
        # The completion table's extra column is the batch's own texts, one per rollout, in order.
        logged = [completion_text(c) for c in trainer._logs["completion"]]
        assert list(trainer._logs["extra"]["scored_text"]) == logged and len(logged) == 2 * K
        # One value per batch, over the original rollouts only (2 of 4 right per problem).
        assert trainer._metrics["train"]["logged_accuracy"] == [0.5] * batch


def test_no_grad_passes_over_constructed_rows_run_in_micro_batch_chunks(tiny_model_dir, tmp_path, monkeypatch):
    # A generation batch of 2 micro-batches (steps_per_generation=2), with old log-probs (num_iterations=2) and a
    # reference model (beta > 0): every no-grad log-prob pass, TRL's and ours over the constructed rows, is chunked.
    trainer = make_trainer(tiny_model_dir, tmp_path, per_device_train_batch_size=K, steps_per_generation=2,
                           num_iterations=2, beta=0.04)
    calls = []
    real = trainer._get_per_token_logps_and_entropies

    def spy(model, input_ids, *args, **kwargs):
        calls.append((model is trainer.ref_model, input_ids.shape[0], kwargs.get("batch_size")))
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", spy)
    out = generation_batch(trainer)
    assert "constructed_ref_per_token_logps" in out and "constructed_old_per_token_logps" in out
    # TRL's old and reference passes, then ours: old and reference, all over the 2K rows of the generation batch.
    assert [(is_ref, rows) for is_ref, rows, _ in calls] == [(False, 2 * K), (True, 2 * K)] * 2
    assert {batch_size for _, _, batch_size in calls} == {K}


def test_unscorable_rollout_is_missing_from_the_orig_baseline_as_in_trl(tiny_model_dir, tmp_path):
    # Problem 0's 4th rollout (wrong) is unscorable: the reward function returns None for it, so TRL gives it reward
    # NaN, leaves it out of the group's nanmean/nanstd and gives it advantage 0. The constructions of that group are
    # scored against the same baseline, and the unscorable rollout is not repaired (it is not known to be wrong).
    first_call = []

    def reward(prompts, completions, answer, **kwargs):
        rewards = math_reward(prompts, completions, answer)
        if not first_call:  # the original rollouts; later calls rescore the constructions
            first_call.append(True)
            rewards[3] = None
        return rewards

    trainer = make_trainer(tiny_model_dir, tmp_path, n_neg=1, ref_baseline="orig")
    trainer.reward_funcs = [reward]
    out = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in generation_batch(trainer).items()}

    # Group 0 = [1, 1, 0, NaN]: mean 2/3, unbiased std over the 3 scored = sqrt((1/9 + 1/9 + 4/9) / 2) = 0.577350.
    # Group 1 = [1, 1, 0, 0]: mean 1/2, std 0.577350. eps = 1e-4, as TRL.
    std = 0.5773503 + 1e-4
    torch.testing.assert_close(out["advantages"], torch.tensor([1 / 3, 1 / 3, -2 / 3, 0, 0.5, 0.5, -0.5, -0.5]) / std
                               * torch.tensor([1, 1, 1, 0, 1, 1, 1, 1]), atol=1e-5, rtol=0)
    # Constructions (reward 1) on the wrong rows 2, 6 and 7; row 3 (unscorable) is not repaired.
    assert out["constructed_rows"].nonzero().flatten().tolist() == [2, 6, 7]
    torch.testing.assert_close(out["constructed_advantages"][[2, 6, 7]], torch.tensor([1 / 3, 0.5, 0.5]) / std,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("option, value", [("importance_sampling_level", "sequence"), ("loss_type", "cispo"),
                                           ("loss_type", "sapo"), ("loss_type", "vespo"),
                                           ("multi_objective_aggregation", "normalize_then_sum")])
def test_trl_options_not_applied_to_constructed_rows_are_refused(tmp_path, option, value):
    kwargs = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{option: value})
    with pytest.raises(ValueError, match=rf"^{option}='{value}' is not supported with TAPO \(.+\): use .+tapo_enabled=False"):
        TAPOConfig(**kwargs)
    assert getattr(TAPOConfig(tapo_enabled=False, **kwargs), option) == value  # plain GRPO: TRL's option as is


def test_delta_and_kl_bias_correction_reach_the_constructed_rows_loss(tiny_model_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, tmp_path, beta=0.04, delta=1.5, use_bias_correction_kl=True)
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return clipped_pg_loss(*args, **kwargs)

    monkeypatch.setattr("tapo.trainer.clipped_pg_loss", spy)
    out = generation_batch(trainer)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, out)
    assert seen["delta"] == 1.5 and seen["kl_ratio_correction"] is True and seen["beta"] == 0.04
