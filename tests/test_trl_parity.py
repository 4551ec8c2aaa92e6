"""Where the TAPO path re-runs a piece of TRL on constructed rows, it behaves as TRL's own pass does: reward-function
logs, the chunked no-grad log-prob passes, missing (NaN) rewards. Scripted rollouts on the tiny model (see
test_trainer.py); everything after generation is the real code."""

import pytest
import torch

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
