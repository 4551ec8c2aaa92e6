"""OPSD: the divergences against hand-computed values, reference choice, teacher prompts, and OPSDTrainer end to end on
the tiny model with scripted rollouts (generation is the only thing replaced, as in test_trainer.py)."""

import math
import random

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tapo.core.verify import math_reward
from tapo.opsd import OPSDConfig, OPSDTrainer, choose_reference, teacher_prompt, token_divergence
from tapo.trainer import TAPOTrainer

from scripted import K, PROBLEMS, generation_batch, script_generation

# ---------------------------------------------------------------------------------------------------------------------
# Divergences. Position 0: teacher p_T = (0.5, 0.25, 0.25), student p_S = (0.8, 0.1, 0.1). Position 1: both equal.
P_T = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
P_S = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
# Logits are log-probabilities plus a per-row shift: softmax must undo both.
TEACHER_LOGITS = P_T.log() + torch.tensor([[3.0], [-1.0]])
STUDENT_LOGITS = P_S.log() + torch.tensor([[-2.0], [0.5]])
ALL = torch.ones(2)

# KL(T||S) = 0.5 ln(0.5/0.8) + 2 * 0.25 ln(0.25/0.1) = 0.5 ln(0.625 * 2.5) = 0.5 ln 1.5625 = 0.2231436
FORWARD = 0.5 * math.log(0.5 / 0.8) + 2 * 0.25 * math.log(0.25 / 0.1)
# KL(S||T) = 0.8 ln(0.8/0.5) + 2 * 0.1 ln(0.1/0.25) = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.3760027 - 0.1832581 = 0.1927446
REVERSE = 0.8 * math.log(0.8 / 0.5) + 2 * 0.1 * math.log(0.1 / 0.25)
# beta = 0.5: M = (0.65, 0.175, 0.175); KL(T||M) = 0.5 ln(0.5/0.65) + 0.5 ln(0.25/0.175) = 0.0471553,
# KL(S||M) = 0.8 ln(0.8/0.65) + 0.2 ln(0.1/0.175) = 0.0541881; JSD = (0.0471553 + 0.0541881) / 2 = 0.0506717
JSD_HALF = 0.5 * (0.5 * math.log(0.5 / 0.65) + 0.5 * math.log(0.25 / 0.175)) + 0.5 * (
    0.8 * math.log(0.8 / 0.65) + 0.2 * math.log(0.1 / 0.175))
# beta = 0.25: M = 0.25 p_T + 0.75 p_S = (0.725, 0.1375, 0.1375)
M_QUARTER = (0.725, 0.1375, 0.1375)
JSD_QUARTER = 0.25 * (0.5 * math.log(0.5 / 0.725) + 0.5 * math.log(0.25 / 0.1375)) + 0.75 * (
    0.8 * math.log(0.8 / 0.725) + 0.2 * math.log(0.1 / 0.1375))


@pytest.mark.parametrize(("kind", "beta", "expected"), [
    ("forward_kl", 0.5, FORWARD), ("reverse_kl", 0.5, REVERSE), ("jsd", 0.5, JSD_HALF), ("jsd", 0.25, JSD_QUARTER)])
def test_divergence_matches_hand_computed_value(kind, beta, expected):
    out = token_divergence(STUDENT_LOGITS, TEACHER_LOGITS, ALL, kind, jsd_beta=beta)
    torch.testing.assert_close(out, torch.tensor([expected, 0.0]), atol=1e-6, rtol=1e-5)


def test_default_divergence_is_reverse_kl():
    torch.testing.assert_close(token_divergence(STUDENT_LOGITS, TEACHER_LOGITS, ALL),
                               token_divergence(STUDENT_LOGITS, TEACHER_LOGITS, ALL, "reverse_kl"))


def test_hand_values_are_distinct():
    # The cases above could not pass with one formula standing in for another.
    assert FORWARD == pytest.approx(0.2231436, abs=1e-6) and REVERSE == pytest.approx(0.1927446, abs=1e-6)
    assert JSD_HALF == pytest.approx(0.0506717, abs=1e-6) and len({FORWARD, REVERSE, JSD_HALF, JSD_QUARTER}) == 4


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_is_zero_when_teacher_equals_student(kind):
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)) * 4
    out = token_divergence(logits, logits + 7.0, torch.ones(3, 5), kind)
    torch.testing.assert_close(out, torch.zeros(3, 5), atol=1e-6, rtol=0)


def test_masked_positions_are_zero_and_do_not_matter():
    mask = torch.tensor([1, 0])
    out = token_divergence(STUDENT_LOGITS, TEACHER_LOGITS, mask, "forward_kl")
    other = STUDENT_LOGITS.clone()
    other[1] = torch.tensor([9.0, -9.0, 0.0])  # change only the masked position
    assert out.tolist() == token_divergence(other, TEACHER_LOGITS, mask, "forward_kl").tolist()
    assert out[1] == 0 and out[0] == pytest.approx(FORWARD, abs=1e-6)
    unmasked = token_divergence(other, TEACHER_LOGITS, ALL, "forward_kl")
    assert unmasked[1] > 1.0  # masking, not the values, made it zero


def test_forward_kl_gradient_is_student_minus_teacher_probabilities():
    # d KL(T||S) / d z_S = p_S - p_T = (0.8 - 0.5, 0.1 - 0.25, 0.1 - 0.25) = (0.3, -0.15, -0.15) at position 0.
    student = STUDENT_LOGITS.clone().requires_grad_()
    token_divergence(student, TEACHER_LOGITS, torch.tensor([1, 0]), "forward_kl").sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([[0.3, -0.15, -0.15], [0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)


def test_jsd_half_is_symmetric_and_bad_arguments_fail():
    a = token_divergence(STUDENT_LOGITS, TEACHER_LOGITS, ALL, "jsd")
    torch.testing.assert_close(a, token_divergence(TEACHER_LOGITS, STUDENT_LOGITS, ALL, "jsd"))
    for beta in (0.0, 1.0):  # a one-sided mixture is not a JSD
        with pytest.raises(ValueError, match="jsd_beta"):
            token_divergence(STUDENT_LOGITS, TEACHER_LOGITS, ALL, "jsd", jsd_beta=beta)
    with pytest.raises(ValueError, match="choose one of"):
        token_divergence(STUDENT_LOGITS, TEACHER_LOGITS, ALL, "kl")
    with pytest.raises(ValueError, match="shapes"):
        token_divergence(STUDENT_LOGITS, TEACHER_LOGITS[:1], ALL, "reverse_kl")


# ---------------------------------------------------------------------------------------------------------------------
# Reference choice and teacher prompts

def test_sibling_reference_is_another_correct_rollout():
    texts = ["a", "right-1", "b", "right-3"]
    correct = [False, True, False, True]
    draws = {choose_reference(0, correct, texts, None, "5", rng=random.Random(s))[1] for s in range(20)}
    assert draws == {"right-1", "right-3"}  # uniform over both correct siblings
    assert choose_reference(1, correct, texts, None, "5") == ("sibling", "right-3")  # never itself


def test_reference_falls_back_to_solution_then_answer():
    correct, texts = [True, False], ["right", "wrong"]
    # The only correct rollout is the row itself: no sibling.
    assert choose_reference(0, correct, texts, "gold steps", "5") == ("solution", "gold steps")
    assert choose_reference(0, correct, texts, "  ", "5") == ("answer", "The final answer is \\boxed{5}.")
    assert choose_reference(0, correct, texts, None, None) == (None, None)
    assert choose_reference(0, correct, texts, " ", " ") == (None, None)  # blank solution and answer count as missing
    assert choose_reference(1, correct, texts, "gold", "5", order=("answer",)) == ("answer", "The final answer is \\boxed{5}.")
    assert choose_reference(1, correct, texts, "gold", "5", order=("solution", "answer")) == ("solution", "gold")


def test_opsd_tokens_are_the_sampled_completion_tokens_of_rows_with_a_teacher():
    inputs = {"completion_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), "opsd_mask_rows": torch.tensor([True, False])}
    assert OPSDTrainer._opsd_token_mask(inputs).tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]
    inputs["tool_mask"] = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])  # tokens a tool wrote are not the student's
    assert OPSDTrainer._opsd_token_mask(inputs).tolist() == [[1, 0, 1, 0], [0, 0, 0, 0]]


def test_teacher_prompt_puts_the_reference_before_the_problem():
    chat = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Compute 2+2."}]
    out = teacher_prompt(chat, " 2+2=4, \\boxed{4} ")
    assert out[0] == chat[0] and chat[1]["content"] == "Compute 2+2."  # input untouched
    assert out[1]["role"] == "user" and out[1]["content"].startswith("Here is a reference solution")
    assert "2+2=4, \\boxed{4}\n\nNow solve the problem yourself.\n\nCompute 2+2." in out[1]["content"]
    # Messages after the last user turn (an assistant prefix) stay as they are, after it.
    prefilled = [*chat, {"role": "assistant", "content": "Let me think."}]
    assert teacher_prompt(prefilled, "ref")[::2] == prefilled[::2] and len(teacher_prompt(prefilled, "ref")) == 3
    assert teacher_prompt("Q: {x}?", "{ref}").endswith("{ref}\n\nNow solve the problem yourself.\n\nQ: {x}?")


# ---------------------------------------------------------------------------------------------------------------------
# OPSDTrainer on the tiny model

def make_trainer(tiny_model_dir, tmp_path, cls=OPSDTrainer, solutions=False, **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    kwargs = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2 * K, "num_generations": K,
              "max_completion_length": 64, "max_steps": 2, "learning_rate": 1e-3, "report_to": "none",
              "logging_steps": 1, "save_strategy": "no", "seed": 0, "use_cpu": True, "disable_tqdm": True,
              "loss_type": "grpo", "tapo_enabled": False, **overrides}
    rows = [{"prompt": [{"role": "user", "content": f"Compute {p}."}], "answer": gold}
            | ({"solution": f"GOLD-SOLUTION {right}"} if solutions else {})
            for p, (gold, right, _) in PROBLEMS.items()]
    trainer = cls(model=model, reward_funcs=[math_reward], args=OPSDConfig(**kwargs), train_dataset=Dataset.from_list(rows),
                  processing_class=tokenizer)
    script_generation(trainer, n_right=1)  # one correct rollout per group
    return trainer


def test_teacher_prompts_hold_a_correct_sibling(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    out = generation_batch(trainer)
    tok = trainer._tokenizer
    completions = tok.batch_decode(out["completion_ids"], skip_special_tokens=True)
    teachers = tok.batch_decode(out["opsd_teacher_prompt_ids"], skip_special_tokens=True)
    students = tok.batch_decode(out["prompt_ids"], skip_special_tokens=True)
    assert out["opsd_mask_rows"].tolist() == [True] * 2 * K
    for completion, teacher, student in zip(completions, teachers, students, strict=True):
        problem = next(p for p in PROBLEMS if p in student)
        gold, right, _ = PROBLEMS[problem]
        if f"boxed{{{gold}}}" in completion:  # the group's only correct rollout: no sibling, the gold answer instead
            assert f"The final answer is \\boxed{{{gold}}}." in teacher and right not in teacher
        else:
            assert f"reference solution to the problem below:\n{right}\n\nNow solve" in teacher
        assert teacher.endswith(student.split("Compute")[-1]) and f"Compute {problem}." in teacher
    metrics = trainer._metrics["train"]
    assert metrics["opsd/reference_sibling_frac"] == [0.75] and metrics["opsd/reference_answer_frac"] == [0.25]
    assert out["opsd_num_items"] == out["completion_mask"].sum()  # every row has a teacher
    # Left-padded like TRL's prompts, so that every teacher prompt ends right where the completion starts.
    mask, n_real = out["opsd_teacher_prompt_mask"], out["opsd_teacher_prompt_mask"].sum(1)
    assert (n_real < mask.shape[1]).any()
    for ids, row_mask, n in zip(out["opsd_teacher_prompt_ids"], mask, n_real.tolist(), strict=True):
        assert row_mask.tolist() == [0] * (len(row_mask) - n) + [1] * n
        assert ids[: len(ids) - n].tolist() == [tok.pad_token_id] * (len(ids) - n)
    assert metrics["opsd/teacher_prompt_tokens"] == [pytest.approx(n_real.float().mean().item())]


def test_sibling_draws_depend_on_seed_generation_and_row_only(tiny_model_dir, tmp_path, monkeypatch):
    """With several correct siblings the draw matters. It must not read the global random state (so it is
    reproducible whatever else ran), and a new generation draws again."""
    import tapo.opsd

    trainer = make_trainer(tiny_model_dir, tmp_path)
    script_generation(trainer, n_right=3)
    drawn = []  # per row: which member of the group was drawn as the sibling (the scripted right texts are identical)

    def spy(index, correct, texts, solution, answer, order, rng=None):
        labels = [f"member {j}" for j in range(len(texts))]
        source, text = choose_reference(index, correct, labels, solution, answer, order, rng)
        drawn.append(text)
        return (source, texts[labels.index(text)]) if source == "sibling" else (source, text)

    monkeypatch.setattr(tapo.opsd, "choose_reference", spy)

    def draws(global_seed):
        random.seed(global_seed)
        drawn.clear()
        generation_batch(trainer)
        return list(drawn)

    first = draws(1)
    assert len(first) == 2 * K and all(d.startswith("member") for d in first)
    assert draws(2) == first
    trainer._step += trainer.args.steps_per_generation * trainer.num_iterations  # the next generation
    assert draws(1) != first


def test_a_row_without_any_reference_keeps_its_prompt_and_gets_no_opsd_term(tiny_model_dir, tmp_path, monkeypatch):
    import tapo.opsd

    monkeypatch.setitem(tapo.opsd.REFERENCE_ORDER, "sibling", ("sibling",))  # no fallback to the gold answer
    trainer = make_trainer(tiny_model_dir, tmp_path)  # one correct rollout per group: it has no correct sibling
    out = generation_batch(trainer)
    tok = trainer._tokenizer
    completions = tok.batch_decode(out["completion_ids"], skip_special_tokens=True)
    alone = [any(f"boxed{{{gold}}}" in c for gold, _, _ in PROBLEMS.values()) for c in completions]
    assert sum(alone) == 2 and out["opsd_mask_rows"].tolist() == [not a for a in alone]
    teachers = tok.batch_decode(out["opsd_teacher_prompt_ids"], skip_special_tokens=True)
    students = tok.batch_decode(out["prompt_ids"], skip_special_tokens=True)
    assert all((t == s) == a for t, s, a in zip(teachers, students, alone, strict=True))
    assert out["opsd_num_items"] == out["completion_mask"][~torch.tensor(alone)].sum()


@pytest.mark.parametrize(("reference", "solutions", "expected"), [
    ("solution", True, "GOLD-SOLUTION"), ("solution", False, "The final answer is"), ("answer", True, "The final answer is")])
def test_reference_source_setting(tiny_model_dir, tmp_path, reference, solutions, expected):
    trainer = make_trainer(tiny_model_dir, tmp_path, solutions=solutions, opsd_reference=reference)
    teachers = trainer._tokenizer.batch_decode(generation_batch(trainer)["opsd_teacher_prompt_ids"], skip_special_tokens=True)
    assert all(expected in t for t in teachers)
    assert not any("GOLD-SOLUTION" in t for t in teachers) or expected == "GOLD-SOLUTION"


def test_loss_is_grpo_plus_weighted_divergence_and_is_logged(tiny_model_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, tmp_path, opsd_weight=0.5, opsd_divergence="jsd", opsd_jsd_beta=0.25)
    out = generation_batch(trainer)
    used = []  # (kind, beta) the loss asked for, with token_divergence's own defaults for what it leaves out

    def spy(student, teacher, mask, kind="reverse_kl", jsd_beta=0.5):
        used.append((kind, jsd_beta))
        return token_divergence(student, teacher, mask, kind, jsd_beta)

    monkeypatch.setattr("tapo.opsd.token_divergence", spy)
    with torch.no_grad():
        total = trainer.compute_loss(trainer.model, out)
        grpo = TAPOTrainer._compute_loss(trainer, trainer.model, out)
    assert used == [("jsd", 0.25)]
    metrics = trainer._metrics["train"]
    opsd, divergence = metrics["opsd/loss"][-1], metrics["opsd/divergence"][-1]
    assert math.isfinite(total.item()) and opsd > 0
    assert total.item() == pytest.approx(grpo.item() + 0.5 * opsd, abs=1e-6)
    assert metrics["opsd/loss_grpo"][-1] == pytest.approx(grpo.item(), abs=1e-7)
    # One micro-batch holding the whole generation batch: the normalized loss is the token-mean divergence.
    assert opsd == pytest.approx(divergence, rel=1e-5)
    # A micro-batch in which no row has a teacher: L_OPSD = 0 and the logged divergence is NaN (no tokens), no error.
    out["opsd_mask_rows"] = torch.zeros_like(out["opsd_mask_rows"])
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, out).item() == pytest.approx(grpo.item(), abs=1e-7)
    assert metrics["opsd/loss"][-1] == 0 and math.isnan(metrics["opsd/divergence"][-1])


def test_opsd_weight_zero_gives_the_grpo_loss(tiny_model_dir, tmp_path):
    ours = make_trainer(tiny_model_dir, tmp_path / "a", opsd_weight=0.0)
    grpo = make_trainer(tiny_model_dir, tmp_path / "b", cls=TAPOTrainer)
    batch_ours, batch_grpo = generation_batch(ours), generation_batch(grpo)
    torch.testing.assert_close(batch_ours["completion_ids"], batch_grpo["completion_ids"])
    with torch.no_grad():
        assert ours.compute_loss(ours.model, batch_ours).item() == pytest.approx(
            grpo.compute_loss(grpo.model, batch_grpo).item(), abs=1e-7)
    assert "opsd/loss" not in ours._metrics["train"]


def test_gradient_flows_through_the_student_only(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, opsd_include_grpo=False, opsd_divergence="forward_kl")
    out = generation_batch(trainer)
    model = trainer.model
    model.zero_grad()
    trainer.compute_loss(model, out).backward()
    ours = [p.grad.clone() for p in model.parameters()]

    def logits(prompt_ids, prompt_mask):
        ids = torch.cat([prompt_ids, out["completion_ids"]], dim=1)
        mask = torch.cat([prompt_mask, out["completion_mask"]], dim=1)
        with trainer.accelerator.autocast():  # TRL's precision (bf16 autocast by default, on CPU too)
            logits = model(input_ids=ids, attention_mask=mask).logits
        return logits[:, prompt_ids.shape[1] - 1 : -1].float() / trainer.temperature

    def manual_grads(detach_teacher: bool):
        model.zero_grad()
        teacher = logits(out["opsd_teacher_prompt_ids"], out["opsd_teacher_prompt_mask"])
        student = logits(out["prompt_ids"], out["prompt_mask"])
        teacher = teacher.detach() if detach_teacher else teacher
        loss = token_divergence(student, teacher, out["completion_mask"], "forward_kl").sum() / out["completion_mask"].sum()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(ours, manual_grads(detach_teacher=True), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # Had the teacher side carried gradient, the result would differ.
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-4)
               for a, b in zip(ours, manual_grads(detach_teacher=False), strict=True))


def test_training_steps_run_and_log(tiny_model_dir, tmp_path):
    # One generation split into two micro-batches: the opsd_* columns must survive TRL's shuffling and buffering.
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1, steps_per_generation=2, per_device_train_batch_size=K,
                           gradient_accumulation_steps=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(b, a) for b, a in zip(before, trainer.model.parameters()))
    logged = {k for record in trainer.state.log_history for k in record}
    assert {"opsd/loss", "opsd/loss_grpo", "opsd/divergence", "opsd/reference_sibling_frac", "reward"} <= logged
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)


def test_bad_settings_fail_at_construction(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="opsd_divergence"):
        make_trainer(tiny_model_dir, tmp_path, opsd_divergence="kl")
    with pytest.raises(ValueError, match="opsd_reference"):
        make_trainer(tiny_model_dir, tmp_path, opsd_reference="teacher")
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="opsd_jsd_beta"):
            make_trainer(tiny_model_dir, tmp_path, opsd_divergence="jsd", opsd_jsd_beta=beta)
    OPSDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", opsd_divergence="reverse_kl",
               opsd_jsd_beta=1.0)  # beta is a jsd setting only
    with pytest.raises(ValueError, match="no loss"):
        make_trainer(tiny_model_dir, tmp_path, opsd_include_grpo=False, opsd_weight=0.0)
    with pytest.raises(ValueError, match="tapo_enabled"):
        make_trainer(tiny_model_dir, tmp_path, opsd_include_grpo=False, tapo_enabled=True)


@pytest.mark.parametrize("include_grpo", [True, False])
def test_non_finite_opsd_term_stops_before_backward(tiny_model_dir, tmp_path, include_grpo):
    from tapo.trainer import NonFiniteLossError

    trainer = make_trainer(tiny_model_dir, tmp_path, opsd_include_grpo=include_grpo)
    out = generation_batch(trainer)
    trainer._opsd_loss = lambda model, inputs: torch.tensor(float("nan"))
    # The message names every term of the loss: the GRPO term only when it is part of it.
    with pytest.raises(NonFiniteLossError, match=r"\(L_GRPO=[-0-9.e]+, L_OPSD=nan\)" if include_grpo else r"\(L_OPSD=nan\)"):
        trainer.compute_loss(trainer.model, out)


def test_loss_matches_an_independent_recomputation_with_temperature_and_micro_batches(tiny_model_dir, tmp_path):
    # T = 0.7, and one generation of 2K rows split into 2 micro-batches of K within ONE accumulation window
    # (steps_per_generation=2, gradient_accumulation_steps=1): the normaliser is N * 1/2, N the batch's token count.
    trainer = make_trainer(tiny_model_dir, tmp_path, temperature=0.7, per_device_train_batch_size=K,
                           steps_per_generation=2, gradient_accumulation_steps=1, opsd_weight=0.5,
                           opsd_divergence="reverse_kl")
    whole = generation_batch(trainer)
    trainer.current_gradient_accumulation_steps = 1
    model, n_tokens = trainer.model, whole["completion_mask"].sum()

    def loss_from_scratch(micro, temperature):
        """sum over tokens of KL(p_S || p_T) at `temperature`, over the global normaliser N * 1/2."""
        def log_probs(prompt_ids, prompt_mask):
            ids = torch.cat([prompt_ids, micro["completion_ids"]], dim=1)
            mask = torch.cat([prompt_mask, micro["completion_mask"]], dim=1)
            with torch.no_grad(), trainer.accelerator.autocast():
                logits = model(input_ids=ids, attention_mask=mask).logits
            return (logits[:, prompt_ids.shape[1] - 1 : -1].float() / temperature).log_softmax(-1)

        log_s = log_probs(micro["prompt_ids"], micro["prompt_mask"])
        log_t = log_probs(micro["opsd_teacher_prompt_ids"], micro["opsd_teacher_prompt_mask"])
        reverse_kl = (log_s.exp() * (log_s - log_t)).sum(-1)
        return (reverse_kl * micro["completion_mask"]).sum() / (n_tokens * 1 / 2)

    for start in (0, K):
        micro = {k: v[start : start + K] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in whole.items()}
        with torch.no_grad():
            total = trainer._compute_loss(model, micro)
            grpo = TAPOTrainer._compute_loss(trainer, model, micro)
        expected = loss_from_scratch(micro, 0.7)
        torch.testing.assert_close((total - grpo) / 0.5, expected, atol=1e-4, rtol=1e-3)
        assert not torch.allclose(loss_from_scratch(micro, 1.0), expected, rtol=1e-2)  # T matters on this batch
