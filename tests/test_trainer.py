"""TAPOTrainer end to end on the tiny model, with scripted rollouts so that DCS and constructions are guaranteed.

Generation is the only thing replaced: `_generate_single_turn` returns the token ids of scripted texts (two right and
two wrong solutions per problem; for synthesis prompts, a well-formed synthesis). Everything after it (rewards,
advantages, DCS, construction, re-verification, tokenization, DAE, loss) is the real code.
"""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from tapo.core.tokens import CORRECTION, PREFIX, REFLECTION, trajectory_token_ids
from tapo.core.verify import math_reward
from tapo.trainer import TAPOConfig, TAPOTrainer

from scripted import K, PROBLEMS, generation_batch, script_generation


def dataset():
    rows = [{"prompt": [{"role": "user", "content": f"Compute {p}. Put the answer in \\boxed{{}}."}], "answer": gold}
            for p, (gold, _, _) in PROBLEMS.items()]
    return Dataset.from_list(rows)


def make_trainer(tiny_model_dir, tmp_path, cls=TAPOTrainer, **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config_cls = TAPOConfig if cls is TAPOTrainer else GRPOConfig
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2 * K, num_generations=K,
                  max_completion_length=64, max_steps=2, learning_rate=1e-3, report_to="none", logging_steps=1,
                  save_strategy="no", seed=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=True, loss_type="grpo")
    if config_cls is TAPOConfig:
        kwargs.update(constructor="splice", n_pos=1, n_neg=2, m_max=2)
    kwargs.update(overrides)
    trainer = cls(model=model, reward_funcs=[math_reward], args=config_cls(**kwargs), train_dataset=dataset(),
                  processing_class=tokenizer)
    script_generation(trainer, n_right=2)
    return trainer


@pytest.mark.parametrize("constructor", ["splice", "self"])
def test_constructions_are_attached_with_their_own_advantages(tiny_model_dir, tmp_path, constructor, monkeypatch):
    labelled = []  # (ids, span labels, trajectory) of every construction the trainer tokenizes

    def recording_token_ids(tokenizer, trajectory, *args, **kwargs):
        ids, labels = trajectory_token_ids(tokenizer, trajectory, *args, **kwargs)
        labelled.append((ids, labels, trajectory))
        return ids, labels

    monkeypatch.setattr("tapo.trainer.trajectory_token_ids", recording_token_ids)
    trainer = make_trainer(tiny_model_dir, tmp_path, constructor=constructor)
    out = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in generation_batch(trainer).items()}

    # Each problem has 2 wrong rollouts and m_max=2: both are repaired, on their own rows.
    rows = out["constructed_rows"].nonzero().flatten().tolist()
    assert len(rows) == 4
    metrics = trainer._metrics["train"]
    assert metrics["tapo/eligible_frac"] == [1.0]
    assert metrics["tapo/constructions_attempted"] == [4.0]
    assert metrics["tapo/constructions_accepted"] == [4.0]
    assert metrics["tapo/accuracy"] == [0.5]

    # Original advantages: (r - 0.5) / (std + 1e-4) with the unbiased std of [1, 1, 0, 0] = 0.57735.
    expected = torch.tensor([1.0, 1.0, -1.0, -1.0] * 2) * 0.5 / (0.57735027 + 1e-4)
    completions = trainer._tokenizer.batch_decode(out["completion_ids"], skip_special_tokens=True)
    signs = torch.tensor([1.0 if "boxed{56}" in c or "boxed{24}" in c else -1.0 for c in completions])
    torch.testing.assert_close(out["advantages"], signs * expected.abs(), atol=1e-5, rtol=0)
    # Constructions (reward 1) are scored against the original group's mean/std (ref_baseline="orig").
    torch.testing.assert_close(out["constructed_advantages"][rows], torch.full((4,), 0.5 / (0.57735027 + 1e-4)), atol=1e-5, rtol=0)
    # Only wrong rollouts are repaired.
    assert all(signs[r] < 0 for r in rows)

    # Span labels: prefix tokens spell the start of the wrong rollout, the reflection follows, the answer is right.
    for r in rows:
        n = int(out["constructed_completion_mask"][r].sum())
        ids = out["constructed_completion_ids"][r][:n]
        labels = torch.tensor(next(lab for i, lab, _ in labelled if i == ids.tolist()))
        part = {lab: trainer._tokenizer.decode(ids[labels == lab]) for lab in (PREFIX, REFLECTION, CORRECTION)}
        wrong = completions[r]
        assert wrong.startswith(part[PREFIX].rstrip()) or part[PREFIX] == ""
        assert "wrong" in part[REFLECTION].lower()
        assert "\\boxed{56}" in part[CORRECTION] or "\\boxed{24}" in part[CORRECTION]
        assert (labels >= 0).all()

    # The logged means over the accepted constructions, recomputed from their tokens, span labels and trajectories.
    kept = [next((lab, t) for i, lab, t in labelled
                 if i == out["constructed_completion_ids"][r][: int(out["constructed_completion_mask"][r].sum())].tolist())
            for r in rows]
    assert metrics["tapo/constructed_tokens"] == [float(sum(len(lab) for lab, _ in kept))]
    assert metrics["tapo/prefix_fraction"] == [pytest.approx(sum(t.prefix_fraction for _, t in kept) / 4)]
    assert metrics["tapo/reflection_tokens"] == [pytest.approx(sum(list(lab).count(REFLECTION) for lab, _ in kept) / 4)]
    for name, label in (("prefix", PREFIX), ("reflection", REFLECTION), ("correction", CORRECTION)):
        expected_fraction = sum(list(lab).count(label) / len(lab) for lab, _ in kept) / 4
        assert metrics[f"tapo/span_{name}_frac"] == [pytest.approx(expected_fraction)]
    # (The scripted wrong rollouts err in their first step, so the prefix is empty; the other spans are not.)
    reflection, correction = metrics["tapo/span_reflection_frac"][0], metrics["tapo/span_correction_frac"][0]
    assert 0 < reflection < 1 and 0 < correction < 1 and reflection != pytest.approx(correction)


def test_original_advantages_equal_plain_grpo_on_the_same_batch(tiny_model_dir, tmp_path):
    tapo = generation_batch(make_trainer(tiny_model_dir, tmp_path / "a"))
    grpo = generation_batch(make_trainer(tiny_model_dir, tmp_path / "b", tapo_enabled=False))
    assert "constructed_rows" not in grpo
    torch.testing.assert_close(tapo["advantages"], grpo["advantages"])
    torch.testing.assert_close(tapo["completion_ids"], grpo["completion_ids"])


def test_tapo_loss_is_grpo_plus_weighted_ref_loss(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    out = generation_batch(trainer)
    with torch.no_grad():
        total = trainer.compute_loss(trainer.model, out)
        grpo = GRPOTrainer._compute_loss(trainer, trainer.model, out)
    metrics = trainer._metrics["train"]
    ref = metrics["tapo/loss_ref"][-1]
    assert math.isfinite(total.item()) and ref != 0.0
    assert total.item() == pytest.approx(grpo.item() + 1.0 * ref, abs=1e-5)
    assert 0.01 <= metrics["tapo/ots_weight_min"][-1] <= metrics["tapo/ots_weight_mean"][-1] <= metrics["tapo/ots_weight_max"][-1] <= 10

    # lambda scales L_ref only; OTS off changes L_ref.
    trainer.args.ref_loss_weight = 0.5
    with torch.no_grad():
        half = trainer.compute_loss(trainer.model, out)
    assert half.item() == pytest.approx(grpo.item() + 0.5 * ref, abs=1e-5)
    trainer.args.ots_enabled = False
    with torch.no_grad():
        trainer.compute_loss(trainer.model, out)
    assert metrics["tapo/loss_ref"][-1] != pytest.approx(ref)

    # dr_grpo divides the same token sum by sequences * ref_max_length instead of by tokens.
    token_mean = metrics["tapo/loss_ref"][-1]
    trainer.args.ref_loss_aggregation = "dr_grpo"
    with torch.no_grad():
        trainer.compute_loss(trainer.model, out)
    tokens, seqs = out["constructed_num_items"].item(), out["constructed_num_seqs"].item()
    assert metrics["tapo/loss_ref"][-1] == pytest.approx(token_mean * tokens / (seqs * trainer.args.ref_max_length),
                                                         rel=1e-5)


def test_tapo_off_loss_equals_trl_grpo_loss(tiny_model_dir, tmp_path):
    ours = make_trainer(tiny_model_dir, tmp_path / "a", tapo_enabled=False)
    trl = make_trainer(tiny_model_dir, tmp_path / "b", cls=GRPOTrainer)
    batch_ours, batch_trl = generation_batch(ours), generation_batch(trl)
    assert batch_ours.keys() == batch_trl.keys()
    with torch.no_grad():
        assert ours.compute_loss(ours.model, batch_ours).item() == pytest.approx(
            trl.compute_loss(trl.model, batch_trl).item(), abs=1e-7)


def test_training_steps_run_and_log(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=2, steps_per_generation=2, per_device_train_batch_size=K,
                           gradient_accumulation_steps=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    after = list(trainer.model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    logged = {k for record in trainer.state.log_history for k in record}
    assert {"tapo/loss_grpo", "tapo/loss_ref", "tapo/accept_rate", "tapo/eligible_frac", "reward", "entropy"} <= logged
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)
