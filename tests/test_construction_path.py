"""The trainer's construction path: which trajectories it builds and how (the options reach the core), which it
rejects and why (counted per reason), the ablation controls, the prefix as the policy's own sampled tokens, blank
rollouts, and the synthesis budget. Generation is scripted (tests/scripted.py); everything after it is the real code.
"""

import pytest
import torch

from tapo.config import EMBEDDED_DEFAULTS, TAPOConfig
from tapo.construct import Truncated
from tapo.core.synthesis import REJECTIONS
from tapo.models import TINY_CHAT_TEMPLATE
from tapo.trainer import TAPOTrainer

from scripted import COLUMNS, PROBLEMS, generation_batch, one_token_per_char, script_generation, synthesis_for
from test_trainer_wiring import SQRT_1_3, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

DAE_ORIG = 0.5 / (SQRT_1_3 + 1e-4)  # a construction (reward 1) against its group [1, 1, 0, 0], ref_baseline="orig"


def parts_of(prompt: str) -> tuple[str, str, str]:
    """(gold, right, wrong) of the problem a synthesis prompt names."""
    return next(PROBLEMS[p] for p in PROBLEMS if p in prompt)


def copying_synthesis(prompt: str, drift: bool = False, answer: str | None = None) -> str:
    """A synthesis that copies the wrong rollout's first (wrong) step verbatim, then reflects and corrects. drift: the
    copy paraphrases that step ("is" for "=") and also copies the second one, then reflects; answer: a final answer
    other than the right one."""
    gold, right, wrong = parts_of(prompt)
    first_wrong, second_wrong, _ = wrong.splitlines()
    first_right, *rest = right.splitlines()
    copy = f"{first_wrong.replace(' = ', ' is ')}\n{second_wrong}" if drift else first_wrong
    correction = "\n".join(rest).replace(f"\\boxed{{{gold}}}", f"\\boxed{{{answer or gold}}}")
    return (f"<analysis>The first step is wrong.</analysis>\n<reconstruction>{copy}\nWait, that step is wrong: "
            f"{first_right}.\n{correction}</reconstruction>")


def constructed(trainer, batch) -> dict[int, list[int]]:
    """Row -> the constructed completion ids of that row (mask applied)."""
    rows = batch[COLUMNS["rows"]].nonzero().flatten().tolist()
    return {r: batch[COLUMNS["ids"]][r][batch[COLUMNS["mask"]][r].bool()].tolist() for r in rows}


def tapo_metrics(trainer) -> dict[str, float]:
    return {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("tapo/")}


# --------------------------------------------------------------------------- faithful trajectories: options, rejections

def test_prefix_match_reaches_assembly_strict_by_default(tiny_model_dir, tmp_path):
    drifting = lambda prompt: copying_synthesis(prompt, drift=True)  # noqa: E731
    strict = make_trainer(tiny_model_dir, tmp_path / "strict", constructor="self", synthesis=drifting)
    assert strict.args.prefix_match == "strict"
    assert not generation_batch(strict)[COLUMNS["rows"]].any()
    assert tapo_metrics(strict)["tapo/rejected_copy_mismatch"] == 4.0

    longest = make_trainer(tiny_model_dir, tmp_path / "longest", constructor="self", synthesis=drifting,
                           prefix_match="longest")
    batch = generation_batch(longest)
    texts = [longest._tokenizer.decode(ids[:-1]) for ids in constructed(longest, batch).values()]
    assert len(texts) == 4 and tapo_metrics(longest)["tapo/rejected_copy_mismatch"] == 0.0
    for text in texts:  # the policy's own two steps, then the model's reflection: never the paraphrase
        wrong = next(w for _, _, w in PROBLEMS.values() if text.startswith(w.splitlines()[0]))
        assert text.startswith("\n".join(wrong.splitlines()[:2]) + "\nWait, that step is wrong")


@pytest.mark.parametrize("cut", ["before_error", "after_error"])
def test_cut_reaches_the_splice_the_synthesis_prompt_and_assembly(tiny_model_dir, tmp_path, cut):
    splice = make_trainer(tiny_model_dir, tmp_path / "splice", cut=cut)
    texts = [splice._tokenizer.decode(ids[:-1]) for ids in constructed(splice, generation_batch(splice)).values()]
    first_wrong_steps = {w.splitlines()[0] for _, _, w in PROBLEMS.values()}
    # The first step is the error: before it the prefix is empty, after it the prefix is that step.
    assert len(texts) == 4 and all((text.split("\n")[0] in first_wrong_steps) == (cut == "after_error")
                                   for text in texts)

    prompts = []
    writer = make_trainer(tiny_model_dir, tmp_path / "self", constructor="self", cut=cut,
                          synthesis=lambda prompt: prompts.append(prompt) or copying_synthesis(prompt))
    assert int(generation_batch(writer)[COLUMNS["rows"]].sum()) == 4
    asked = "and including" if cut == "after_error" else "but not including"
    assert len(prompts) == 4 and all(f"up to {asked} the first critical error" in p for p in prompts)


@pytest.mark.parametrize(("reason", "synthesis", "overrides"), [
    ("unparsed", lambda prompt: "no tags at all", {}),
    ("copy_mismatch", lambda prompt: copying_synthesis(prompt, drift=True), {}),
    ("no_reflection", lambda prompt: f"<analysis>x</analysis><reconstruction>{parts_of(prompt)[1]}</reconstruction>",
     {}),
    ("no_correction", lambda prompt: (f"<analysis>x</analysis><reconstruction>{parts_of(prompt)[2].splitlines()[0]}\n"
                                      "Wait, that is wrong</reconstruction>"), {}),
    ("wrong_answer", lambda prompt: copying_synthesis(prompt, answer="99"), {}),
    ("too_long", copying_synthesis, {"ref_max_length": 8}),
])
def test_rejections_are_counted_by_reason(tiny_model_dir, tmp_path, reason, synthesis, overrides):
    trainer = make_trainer(tiny_model_dir, tmp_path, constructor="self", synthesis=synthesis, **overrides)
    assert not generation_batch(trainer)[COLUMNS["rows"]].any()
    metrics = tapo_metrics(trainer)
    assert metrics["tapo/constructions_attempted"] == 4.0 and metrics["tapo/constructions_accepted"] == 0.0
    assert {r: metrics[f"tapo/rejected_{r}"] for r in REJECTIONS} == {r: 4.0 * (r == reason) for r in REJECTIONS}


# --------------------------------------------------------------------------------------------------------- controls

@pytest.mark.parametrize("control", ["none", "no_prefix", "no_reflection"])
def test_construction_controls_rewrite_every_construction_with_the_same_advantage(tiny_model_dir, tmp_path, control):
    trainer = make_trainer(tiny_model_dir, tmp_path, cut="after_error", construction_control=control)
    batch = generation_batch(trainer)
    built = constructed(trainer, batch)
    assert sorted(built) == [2, 3, 6, 7]  # every wrong rollout, on its own row
    for row, ids in built.items():
        text = trainer._tokenizer.decode(ids[:-1])
        gold, right, wrong = next(p for p in PROBLEMS.values() if p[1] in text or p[2].splitlines()[0] in text)
        if control == "no_prefix":
            assert text == right  # the correct sibling alone
        else:
            assert text.startswith(wrong.splitlines()[0] + "\n") and text.endswith(f"\\boxed{{{gold}}}")
            assert ("Wait" in text) == (control == "none")
    torch.testing.assert_close(batch[COLUMNS["advantages"]].cpu()[list(built)], torch.full((4,), DAE_ORIG), atol=1e-5,
                               rtol=0)


def test_unknown_options_are_config_errors(tmp_path):
    for key, value in (("construction_control", "no_analysis"), ("prefix_match", "fuzzy"), ("cut", "at_error")):
        with pytest.raises(ValueError, match=key):
            TAPOConfig(output_dir=str(tmp_path), use_cpu=True, **{key: value})


# ---------------------------------------------------------------------------------- the prefix as the policy sampled it

TURN_END = "<|assistant|>"  # a special token of the tiny tokenizer, standing in for a chat model's end-of-turn token


def sampled_like_a_chat_model(tokenizer, text: str) -> list[int]:
    """One token per character (a split the tokenizer would never produce), ended by the end-of-turn token; the wrong
    rollout of "7 + 8 + 9" is cut at the length limit instead (no terminator)."""
    ids = one_token_per_char(tokenizer, text)
    return ids if "\\boxed{25}" in text else ids + [tokenizer.convert_tokens_to_ids(TURN_END)]


@pytest.mark.parametrize("constructor", ["splice", "self"])
def test_the_prefix_is_the_sampled_tokens_and_the_row_ends_with_the_rollouts_terminator(tiny_model_dir, tmp_path,
                                                                                        constructor):
    trainer = make_trainer(tiny_model_dir, tmp_path, constructor=constructor, cut="after_error",
                           synthesis=copying_synthesis)
    script_generation(trainer, pattern="RRWW", synthesis=copying_synthesis, encode=sampled_like_a_chat_model)
    tok, turn_end = trainer._tokenizer, trainer._tokenizer.convert_tokens_to_ids(TURN_END)
    trainer.eos_token_ids = [tok.eos_token_id, turn_end]  # the chat model stops at its end-of-turn token
    batch = generation_batch(trainer)
    built = constructed(trainer, batch)
    assert sorted(built) == [2, 3, 6, 7]
    for row, ids in built.items():
        sampled = batch["completion_ids"][row][batch["completion_mask"][row].bool()].tolist()
        wrong = tok.decode(sampled, skip_special_tokens=True)
        prefix = wrong.splitlines()[0]  # "23 + 45 = 63": the erroneous first step, kept (after_error)
        assert wrong in {w for _, _, w in PROBLEMS.values()}
        assert one_token_per_char(tok, prefix) != tok(prefix, add_special_tokens=False)["input_ids"]  # non-canonical
        assert ids[: len(prefix)] == sampled[: len(prefix)]  # the prefix: the policy's own ids, one per char
        assert tok.decode(ids[len(prefix) :]).startswith("\nWait")
        assert ids[-1] == (tok.eos_token_id if "\\boxed{25}" in wrong else turn_end)


# ----------------------------------------------------------------------------------------------------- blank rollouts

@pytest.mark.parametrize("constructor", ["splice", "self", "teacher"])
def test_blank_wrong_rollouts_are_left_out_of_pairing_and_counted(tiny_model_dir, tmp_path, constructor):
    # Groups of 5: 2 right, 2 wrong, 1 blank (only the terminator). m_max=3 would pick all three "wrong" ones.
    teacher = dict(teacher_model="teacher-model", teacher_base_url="http://127.0.0.1:9/v1") if constructor == "teacher" else {}
    trainer = make_trainer(tiny_model_dir, tmp_path, pattern="RRWWB", constructor=constructor, m_max=3, **teacher)
    if constructor == "teacher":
        trainer._teacher = lambda messages: [synthesis_for(m) for m in messages]
    batch = generation_batch(trainer)
    assert sorted(constructed(trainer, batch)) == [2, 3, 7, 8]
    metrics = tapo_metrics(trainer)
    assert metrics["tapo/blank_rollouts"] == 2.0
    assert metrics["tapo/constructions_attempted"] == 4.0 and metrics["tapo/constructions_accepted"] == 4.0


# -------------------------------------------------------------------------------------------------- synthesis budget

def test_synthesis_budget_defaults_to_copy_plus_solution_plus_analysis(tmp_path):
    def budget(**overrides):
        return TAPOConfig(output_dir=str(tmp_path), use_cpu=True, max_completion_length=100, **overrides).synthesis_max_tokens

    assert budget() == 3 * 100 + 64 and budget(synthesis_max_tokens=50) == 50
    # The embedded default sets no budget of its own, so it follows max_completion_length whatever overrides that.
    assert "synthesis_max_tokens" not in EMBEDDED_DEFAULTS


def test_syntheses_that_hit_the_budget_are_counted(tiny_model_dir, tmp_path):
    cut_short = make_trainer(tiny_model_dir, tmp_path / "short", constructor="self", synthesis_max_tokens=16)
    assert not generation_batch(cut_short)[COLUMNS["rows"]].any()
    metrics = tapo_metrics(cut_short)
    assert metrics["tapo/synthesis_truncated"] == 4.0 and metrics["tapo/rejected_unparsed"] == 4.0

    default = make_trainer(tiny_model_dir, tmp_path / "default", constructor="self")
    assert default.args.synthesis_max_tokens == 3 * 64 + 64
    assert int(generation_batch(default)[COLUMNS["rows"]].sum()) == 4
    assert tapo_metrics(default)["tapo/synthesis_truncated"] == 0.0


# ------------------------------------------------------------------------------------------- self synthesis generation

def generator_spy(trainer, answer=None):
    """Replaces the trainer's generation backend with a recorder of what it is given (and of the generation budget
    in force), which answers with TRL's real transformers generation, or with `answer` (lists of token ids)."""
    seen = []
    real = TAPOTrainer._generate_single_turn.__get__(trainer)

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        seen.append(dict(prompt_ids=prompt_ids, images=images, multimodal_fields=multimodal_fields,
                         num_generations=num_generations, max_new_tokens=trainer.generation_config.max_new_tokens))
        out = answer if answer is not None else real(prompt_ids, images, multimodal_fields, num_generations)[0]
        seen[-1]["completion_ids"] = out
        return out, None

    trainer._generate_single_turn = generate
    return seen


def test_self_syntheses_are_chat_prompts_generated_by_trl_within_the_synthesis_budget(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, constructor="self", synthesis_max_tokens=7,
                           max_completion_length=3, chat_template_kwargs={"note": "Be brief."})
    tokenizer = trainer._tokenizer
    tokenizer.chat_template = "{% if note %}{{ note }}{% endif %}" + TINY_CHAT_TEMPLATE  # uses the template kwarg
    seen = generator_spy(trainer)
    messages = ["Fix 2 + 2 = 5.", "Fix 3 * 3 = 6."]
    texts = trainer._self_generate(messages)

    [call] = seen
    # One user turn per synthesis message, in the chat format with the generation prompt and the template kwargs,
    # as plain lists of token ids (what TRL's backends take).
    assert call["prompt_ids"] == [tokenizer(f"Be brief.<s><|user|>\n{m}</s>\n<|assistant|>\n",
                                            add_special_tokens=False)["input_ids"] for m in messages]
    assert call["images"] is None and call["multimodal_fields"] == {} and call["num_generations"] == 1
    # Generation runs with the synthesis budget (not max_completion_length), which is restored afterwards.
    assert call["max_new_tokens"] == 7 and trainer.generation_config.max_new_tokens == 3
    # The random tiny model never stops on its own: every synthesis runs out of budget and is marked so.
    assert [len(ids) for ids in call["completion_ids"]] == [7, 7]
    assert all(isinstance(t, Truncated) for t in texts)
    assert texts == tokenizer.batch_decode(call["completion_ids"], skip_special_tokens=True)


def test_self_synthesis_decoding_and_truncation_marks(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, constructor="self", synthesis_max_tokens=6)
    tokenizer = trainer._tokenizer
    word = tokenizer("fix", add_special_tokens=False)["input_ids"]
    user, eos, pad = tokenizer.convert_tokens_to_ids("<|user|>"), tokenizer.eos_token_id, tokenizer.pad_token_id
    filler = (word * 6)[:5]
    answer = [word + [user] + word + [eos],  # special tokens are dropped from the text; ended by eos
              filler + [word[0]],  # as long as the budget, no stop token: truncated
              filler + [eos],  # as long as the budget, but it stopped
              filler + [pad]]  # ... padded after its stop
    generator_spy(trainer, answer)
    texts = trainer._self_generate(["a", "b", "c", "d"])
    assert texts == [tokenizer.decode(word + word), tokenizer.decode(filler + [word[0]]),
                     tokenizer.decode(filler), tokenizer.decode(filler)]
    assert [isinstance(t, Truncated) for t in texts] == [False, True, False, False]
    assert "<|user|>" not in texts[0] and "</s>" not in texts[0]

    # Exactly one synthesis in the batch is generated too.
    generator_spy(trainer, [word + [eos]])
    assert trainer._self_generate(["only one"]) == [tokenizer.decode(word)]
