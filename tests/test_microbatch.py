"""The embedded default trains a generation batch in micro-batches (gradient accumulation) to bound memory. That must
be the same optimizer step as one big batch: same loss and gradient, up to float summation order.

Checked in float64: the tiny random model's rows have nearly identical gradients with advantages of opposite sign, so
the step's gradient is a difference of much larger terms and float32 noise (~1e-7) shows up at ~1e-3 relative. In
float64 every parameter but the tied LM head agrees to < 1e-9; the LM head's ~1e-7 is TRL's chunked log-prob kernel,
which works in float32 inside. (Weights after AdamW's first step are not compared: its update is ~lr * sign(g).)"""

import pytest
import torch
from transformers import TrainerCallback

from test_trainer import make_trainer


class GradientSnapshot(TrainerCallback):
    """The accumulated gradient of every parameter, just before the optimizer step."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def one_step(tiny_model_dir, tmp_path, **layout):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1, loss_type="dapo", **layout)
    trainer.model.double()
    snapshot = GradientSnapshot(trainer.model)
    trainer.add_callback(snapshot)
    trainer.train()
    return next(r for r in trainer.state.log_history if "loss" in r), snapshot.grads


@pytest.mark.parametrize("algorithm", ["tapo", "grpo"])
def test_micro_batches_give_the_same_step_as_one_batch(tiny_model_dir, tmp_path, algorithm):
    k = 4  # scripted.K: 2 problems x 4 rollouts = one generation batch of 8
    tapo = {"tapo_enabled": algorithm == "tapo"}
    whole, whole_grads = one_step(tiny_model_dir, tmp_path / "whole", per_device_train_batch_size=2 * k,
                                  gradient_accumulation_steps=1, **tapo)
    # One row per micro-batch, as the embedded default trains (the finest split there is).
    micro, micro_grads = one_step(tiny_model_dir, tmp_path / "micro", per_device_train_batch_size=1,
                                  gradient_accumulation_steps=2 * k, **tapo)
    if algorithm == "tapo":
        assert whole["tapo/constructions_accepted"] == micro["tapo/constructions_accepted"] == 4  # L_ref is in it
    assert micro["loss"] == pytest.approx(whole["loss"], rel=1e-5, abs=1e-7)
    assert micro["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5) and whole["grad_norm"] > 0
    assert whole_grads.keys() == micro_grads.keys() and whole_grads
    whole_flat = torch.cat([g.flatten() for g in whole_grads.values()])
    micro_flat = torch.cat([micro_grads[n].flatten() for n in whole_grads])
    relative = ((micro_flat - whole_flat).norm() / whole_flat.norm()).item()
    assert relative < 1e-6
