"""tapo.arith_policy: the testbed policy's tokenizer, pre-training mix, and cached build."""

import json
import random
from dataclasses import replace

import pytest
import torch

from tapo import arith
from tapo.arith_policy import (
    WORDS,
    PolicySettings,
    _batch,
    _chat_ids,
    build_tokenizer,
    opsd_teacher_accuracy,
    pretrain,
    pretrained_policy,
    rule_synthesis,
    self_synthesis_acceptance,
    synthesis_example,
    teacher_example,
    user_prompt,
)
from tapo.core.synthesis import assemble_trajectory, parse_synthesis
from tapo.core.verify import is_correct
from tapo.evaluation.generate import Completion
from tapo.models import load_model_and_tokenizer
from tapo.opsd import TEACHER_TEMPLATE, teacher_prompt

WRITER = f"{rule_synthesis.__module__}.{rule_synthesis.__qualname__}"
CHAIN = arith.Chain(terms=(12, 7, 3, 5), ops=("+", "*", "-"))
TINY = dict(task="arith:terms=3,ops=+,max=9", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
            max_positions=1536, max_steps=2, check_every=2, n_check=4, batch_size=4, synthesis_every=2,
            synthesis_batch_size=1, max_new_tokens=16)


def test_tokenizer_has_number_operator_and_word_tokens_a_chat_template_and_eos():
    tok = build_tokenizer()
    text = "19 * 3 = 57\n\\boxed{57}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # 19 | " *" | " 3" | " =" | " 57" | \n | \ | boxed | { | 57 | }
    assert tok.convert_ids_to_tokens(ids) == ["19", " *", " 3", " =", " 57", "\n", "\\", "boxed", "{", "57", "}"]
    assert tok.decode(ids) == text
    # Digits in groups of at most 3; a known word only where the whole word stands, else one token per character.
    pieces = tok.convert_ids_to_tokens(tok("1234 into Wait, 05 is wrong", add_special_tokens=False)["input_ids"])
    assert pieces == ["123", "4", " ", "i", "n", "t", "o", " Wait", ",", " 05", " is", " wrong"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "1 + 1"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\n1 + 1<|end|>\n<|assistant|>\n"
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    # <|user|> \n | 1 " +" " 1" | <|end|> \n | <|assistant|> \n: each special token is one token
    assert len(prompt_ids) == 2 + 3 + 2 + 2
    assert tok.eos_token == "<|end|>" and tok.decode([tok.eos_token_id, *ids], skip_special_tokens=True) == text
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "<unk>"
    every_word = " ".join(WORDS)
    assert tok.decode(tok(every_word, add_special_tokens=False)["input_ids"]) == every_word
    assert len(tok(every_word, add_special_tokens=False)["input_ids"]) == len(WORDS)


def test_rule_synthesis_parses_and_assembles_strictly_into_the_splice():
    rng = random.Random(0)
    user, target = synthesis_example(CHAIN, rng, rule_synthesis)
    assert "Incorrect attempt:" in user and "Compute 12 + 7 * 3 - 5" in user
    synthesis = parse_synthesis(target)
    wrong = user.split("Incorrect attempt:\n")[1].split("\n\nCorrect attempt:")[0]
    trajectory = assemble_trajectory(wrong, synthesis)
    assert trajectory is not None and trajectory.text.strip() == synthesis.reconstruction.strip()
    assert trajectory.parts()[1].strip().startswith("Wait, 19 * 3 = 58 is wrong")
    bad_line = next(i for i, (a, b) in enumerate(zip(wrong.splitlines(), arith.solution(CHAIN).splitlines())) if a != b)
    assert f"step {bad_line + 1}:" in synthesis.analysis


def test_batches_train_on_the_answer_only():
    tok = build_tokenizer()
    batch = _batch(tok, [("1 + 1", "2"), ("1 + 1 + 18", "20")], "cpu")
    labels, ids = batch["labels"], batch["input_ids"]
    assert tok.decode(labels[0][labels[0] != -100]) == "2<|end|>"
    assert tok.decode(labels[1][labels[1] != -100]) == "20<|end|>"
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # the shorter row is padded
    assert (ids[0][batch["attention_mask"][0] == 0] == tok.pad_token_id).all()


def test_pretrained_policy_is_a_cached_hf_folder_keyed_by_its_settings(tmp_path):
    settings = PolicySettings(**TINY)
    folder = pretrained_policy(settings, cache_dir=tmp_path, log=lambda _: None)
    stats = json.loads((folder / "pretrain.json").read_text())
    assert stats["steps"] == 2 and stats["curve"][-1]["step"] == 2 and 0 <= stats["sampled_accuracy"] <= 1
    model, tokenizer = load_model_and_tokenizer(str(folder))
    assert tokenizer.eos_token == "<|end|>" and model.config.num_hidden_layers == 1
    mtime = (folder / "pretrain.json").stat().st_mtime
    assert pretrained_policy(settings, cache_dir=tmp_path) == folder  # cached: not rebuilt
    assert (folder / "pretrain.json").stat().st_mtime == mtime
    assert PolicySettings(**{**TINY, "seed": 1}).key() != settings.key() != settings.key("another.writer")


def test_pretraining_refuses_the_held_out_split(tmp_path):
    with pytest.raises(ValueError, match="train split only"):
        pretrain(PolicySettings(**{**TINY, "task": "arith:split=test"}), tmp_path)
    assert torch.is_grad_enabled()


def test_teacher_example_is_opsd_teacher_prompt_with_the_solution_it_answers_with():
    user, target = teacher_example(CHAIN)
    assert user == teacher_prompt(user_prompt(CHAIN), arith.solution(CHAIN))  # what OPSDTrainer shows the teacher
    assert target == arith.solution(CHAIN) and target in user and is_correct(target, str(CHAIN.answer))
    assert user.startswith(TEACHER_TEMPLATE.split("{reference}")[0]) and user.endswith(user_prompt(CHAIN))


def test_opsd_teacher_accuracy_prompts_the_teacher_as_pre_training_and_opsd_do(monkeypatch):
    """The teacher's prompt is built as OPSDTrainer builds it, OPSD's teacher prompt around the training prompt's user
    message: the token ids the cold start trained the teacher on, up to where its answer starts."""
    tokenizer = build_tokenizer()
    seen = {}

    def accuracy(model, tok, prompts, golds, temperature, max_new_tokens, seed, batch_size=128):
        seen[temperature] = seen.get(temperature, []) + [prompts]
        return {"accuracy": 0.5, "formatted": 1.0}

    monkeypatch.setattr("tapo.arith_policy._accuracy", accuracy)
    row = {"problem": CHAIN.problem, "answer": str(CHAIN.answer), "solution": arith.solution(CHAIN)}
    out = opsd_teacher_accuracy(None, tokenizer, [row], temperature=1.0, max_new_tokens=8, seed=0)
    assert out == {"student_greedy": 0.5, "student_sampled": 0.5, "teacher_greedy": 0.5, "teacher_sampled": 0.5}
    student, teacher = seen[0.0]
    trained, answer_start = _chat_ids(tokenizer, *teacher_example(CHAIN))
    assert teacher == [trained[:answer_start]]
    plain, plain_start = _chat_ids(tokenizer, user_prompt(CHAIN), "")
    assert student == [plain[:plain_start]]
    assert seen[1.0] == seen[0.0]


def test_batch_kinds_main_phase_then_the_cold_start_cycle():
    settings = PolicySettings(synthesis_every=4, cold_start_cycle="synthesis, teacher,solution")
    kinds = [settings.batch_kind(step, main_steps=8) for step in range(1, 15)]
    assert kinds == ["solution"] * 3 + ["synthesis"] + ["solution"] * 3 + ["synthesis"] \
        + ["synthesis", "teacher", "solution"] * 2
    assert PolicySettings(synthesis_every=0).batch_kind(8, main_steps=8) == "solution"
    for bad in ("synthesis,sft", ""):
        with pytest.raises(ValueError, match="cold_start_cycle"):
            PolicySettings(cold_start_cycle=bad)
    # Without a cold start its settings are not in the key (a main phase's key is what it was before they existed).
    assert PolicySettings(teacher_batch_size=8).key() == PolicySettings().key() != PolicySettings(cold_start_steps=1).key()
    assert PolicySettings(cold_start_steps=1).key() != PolicySettings(cold_start_steps=1, cold_start_cycle="teacher").key()
    assert PolicySettings(cold_start_steps=1, seed=3).main_phase() == PolicySettings(seed=3)


def test_cold_start_continues_the_cached_main_phase_once_the_target_is_reached(tmp_path):
    # Target 0: reached at the first check (step 2), so the main phase ends there although max_steps is 10; then 3
    # cold-start steps teacher, synthesis, solution, checked 2 steps in and at the end.
    settings = PolicySettings(**{**TINY, "max_steps": 10, "target_accuracy": 0.0, "cold_start_steps": 3,
                                 "cold_start_cycle": "teacher,synthesis,solution", "teacher_batch_size": 2})
    folder = pretrained_policy(settings, cache_dir=tmp_path, log=lambda _: None)
    main = tmp_path / f"testbed-policy-{settings.main_phase().key(WRITER)}"
    assert folder.name == f"testbed-policy-{settings.key(WRITER)}" != main.name and main.is_dir()
    assert json.loads((main / "pretrain.json").read_text())["steps"] == 2  # the main phase, cached on its own
    stats = json.loads((folder / "pretrain.json").read_text())
    assert (stats["steps"], stats["main_steps"], stats["cold_start_steps"]) == (5, 2, 3) and stats["reached_target"]
    # main: step 1 solution, step 2 synthesis (synthesis_every=2); cold start: teacher, synthesis, solution
    assert stats["batches"] == {"solution": 2, "synthesis": 2, "teacher": 1}
    assert [(p["step"], p["phase"]) for p in stats["curve"]] == [(2, "main"), (4, "cold_start"), (5, "cold_start")]
    assert stats["sampled_accuracy"] == stats["curve"][-1]["accuracy"] and stats["settings"]["cold_start_steps"] == 3
    synth = stats["self_synthesis"]
    assert synth["problems"] == 4 and synth["rollouts"] == 32  # the check problems, K=8
    assert synth["accepted"] + sum(synth["rejected"].values()) == synth["attempted"]
    assert set(stats["opsd_teacher"]) == {"greedy", "sampled"}
    # Another cold start on the same main phase reuses it (not rebuilt); building in one process gives the same policy.
    mtime = (main / "pretrain.json").stat().st_mtime
    other = pretrained_policy(replace(settings, cold_start_cycle="solution"), cache_dir=tmp_path, log=lambda _: None)
    assert other != folder and (main / "pretrain.json").stat().st_mtime == mtime
    direct = pretrain(settings, tmp_path / "direct", log=lambda _: None)
    staged, in_process = (load_model_and_tokenizer(str(f))[0].state_dict() for f in (folder, direct))
    assert all(torch.equal(staged[name], in_process[name]) for name in staged)


# The scripted case of self_synthesis_acceptance: 4 problems x K=4 rollouts, n_pos=1, n_neg=2.
A, B, C, D = (arith.Chain((7, 5, 4), ("+", "-")), arith.Chain((3, 6, 2), ("+", "+")), arith.Chain((9, 2, 5), ("-", "+")),
              arith.Chain((8, 1, 1), ("+", "+")))


def _wrong(chain, step, delta=1):
    return arith.solution(chain, error_step=step, error_delta=delta)


ROLLOUTS = {  # per problem, its K rollouts in order
    A: [arith.solution(A), _wrong(A, 0), _wrong(A, 1), arith.solution(A)],  # 2 right, 2 wrong: 2 pairs
    B: [arith.solution(B)] * 3 + [_wrong(B, 0)],  # 1 wrong < n_neg: not eligible
    C: [_wrong(C, 0), _wrong(C, 1), "  ", arith.solution(C)],  # the blank one is left out: 1 right, 2 wrong: 2 pairs
    D: [_wrong(D, 0), _wrong(D, 1), _wrong(D, 0, 2), _wrong(D, 1, 2)],  # no right one: not eligible
}


def _synthesis_reply(chain, wrong):
    """The scripted synthesis for each of the 4 pairs, and whether it stopped at its budget."""
    good = rule_synthesis("", wrong, arith.solution(chain), str(chain.answer))
    if (chain, wrong) == (A, _wrong(A, 0)):
        return good, False  # accepted
    if (chain, wrong) == (A, _wrong(A, 1)):
        return good[:40], True  # cut at the budget, no closing tags: unparsed (and truncated)
    if (chain, wrong) == (C, _wrong(C, 0)):
        return good.replace(f"{{{C.answer}}}", f"{{{C.answer + 1}}}"), False  # assembles, does not re-verify
    assert (chain, wrong) == (C, _wrong(C, 1))
    padding = "".join(f"{C.answer} + 0 = {C.answer}\n" for _ in range(30))  # correct, but past ref_max_length
    return good.replace("\\boxed", padding + "\\boxed"), False


class ScriptedSampler:
    """TransformersSampler's interface; answers rollout prompts from ROLLOUTS (in order) and synthesis prompts from
    _synthesis_reply, found by the problem and wrong attempt written in the prompt."""

    served = {}

    def __init__(self, model, tokenizer, max_tokens, temperature, top_p):
        self.tokenizer = tokenizer

    def generate(self, prompts, batch_seed, sample_seeds):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            chain = next(c for c in ROLLOUTS if c.problem in text)
            if "Incorrect attempt:" in text:
                wrong = text.split("Incorrect attempt:\n")[1].split("\n\nCorrect attempt:")[0]
                reply, truncated = _synthesis_reply(chain, wrong)
            else:
                n = ScriptedSampler.served[chain] = ScriptedSampler.served.get(chain, -1) + 1
                reply, truncated = ROLLOUTS[chain][n], False
            out.append(Completion(reply, 1, truncated))
        return out


def test_self_synthesis_acceptance_counts_the_trainer_path_on_a_scripted_policy():
    tok = build_tokenizer()
    rows = [{"problem": c.problem, "answer": str(c.answer)} for c in ROLLOUTS]
    model = torch.nn.Linear(1, 1)
    ScriptedSampler.served = {}
    result = self_synthesis_acceptance(model, tok, rows, k=4, n_pos=1, n_neg=2, m_max=4, ref_max_length=112,
                                       batch_size=3, sampler_class=ScriptedSampler)
    assert result == {"problems": 4, "rollouts": 16, "rollout_accuracy": 6 / 16, "eligible_groups": 2,
                      "attempted": 4, "parsed": 3, "truncated": 1, "accepted": 1, "accept_rate": 0.25,
                      "parse_rate": 0.75, "rejected": {"unparsed": 1, "copy_mismatch": 0, "no_reflection": 0,
                                                       "no_correction": 0, "wrong_answer": 1, "too_long": 1}}
    assert model.training  # left as it was
