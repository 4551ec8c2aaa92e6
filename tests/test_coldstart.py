"""Cold start: the builder on a scripted generator (every keep/drop path), the jsonl it writes, and the SFT run on the
tiny model through the CLI."""

import json

import pytest
from transformers import AutoModelForCausalLM

from tapo.cli import main
from tapo.coldstart import (
    ATTEMPTS_FILE,
    DATA_FILE,
    STATS_FILE,
    build_examples,
    prompt_writer,
    read_attempts,
    read_chats,
    rule_writer,
    sample_attempts,
    sft_trainer,
    write_attempts,
    write_examples,
)
from tapo.core.synthesis import (
    assemble_trajectory,
    build_synthesis_prompt,
    format_synthesis,
    parse_synthesis,
    write_rule_synthesis,
)
from tapo.data import PROMPT_TEMPLATE, DataError

RIGHT, WRONG = "right", "wrong"
# label -> (gold, right attempt, wrong attempt, the 4 attempts in order, the synthesis the generator writes)
SCRIPT = {
    "(A) 23 + 45 - 12": (
        "56", "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}",
        "Step 1: 23 + 45 = 68\nStep 2: 68 - 12 = 66\nThe answer is \\boxed{66}",
        [RIGHT, RIGHT, WRONG, ""],
        # A loose copy (double space) of step 1, a reflection, the fix: kept.
        ("<analysis>Step 2 subtracts wrongly.</analysis>\n<reconstruction>\nStep 1:  23 + 45 = 68\nWait, 68 - 12 is 56, "
         "not 66.\nStep 2: 68 - 12 = 56\nThe answer is \\boxed{56}\n</reconstruction>")),
    "(B) 7 + 8 + 9": (
        "24", "7 + 8 = 15\n15 + 9 = 24\nThe answer is \\boxed{24}", "7 + 8 = 16\n16 + 9 = 25\nThe answer is \\boxed{25}",
        [RIGHT, WRONG, WRONG, WRONG],
        "I think the first step is wrong, 7 + 8 is 15."),  # no tags: unparsed
    "(C) 6 * 7 + 1": (
        "43", "6 * 7 = 42\n42 + 1 = 43\nThe answer is \\boxed{43}", "6 * 7 = 48\n48 + 1 = 49\nThe answer is \\boxed{49}",
        [RIGHT, WRONG, RIGHT, WRONG],
        # Parses, but rewrites from scratch instead of copying and turning: not assembled under "strict".
        ("<analysis>6 * 7 is 42.</analysis><reconstruction>Let us redo it: 6 * 7 = 42 and 42 + 1 = 43, so \\boxed{43}"
         "</reconstruction>")),
    "(D) 100 - 37 - 8": (
        "55", "100 - 37 = 63\n63 - 8 = 55\nThe answer is \\boxed{55}", "100 - 37 = 73\n73 - 8 = 65\nThe answer is \\boxed{65}",
        [WRONG, RIGHT, WRONG, WRONG],
        # Well-formed, but the corrected answer is still wrong.
        ("<analysis>100 - 37 is not 73.</analysis><reconstruction>Wait, 100 - 37 = 64.\n64 - 8 = 56\nThe answer is "
         "\\boxed{56}</reconstruction>")),
    "(E) 2 + 2": ("4", "2 + 2 = 4\nThe answer is \\boxed{4}", "2 + 2 = 5\nThe answer is \\boxed{5}",
                  [RIGHT] * 4, None),  # all right: no pair
    "(F) 9 * 9 - 1": ("80", "9 * 9 = 81\n81 - 1 = 80\nThe answer is \\boxed{80}",
                      "9 * 9 = 72\n72 - 1 = 71\nThe answer is \\boxed{71}", [WRONG] * 4, None),  # all wrong: no pair
}
K = 4


class ScriptedGenerator:
    """Attempt prompts -> the scripted attempts in order; synthesis prompts -> the scripted synthesis."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.served: dict[str, int] = {}

    def __call__(self, messages: list[str]) -> list[str]:
        self.calls.append(messages)
        out = []
        for message in messages:
            label = next(label for label in SCRIPT if label in message)
            _, right, wrong, attempts, synthesis = SCRIPT[label]
            if "Incorrect attempt:" in message:
                out.append(synthesis)
            else:
                n = self.served.get(label, 0)
                self.served[label] = n + 1
                out.append({RIGHT: right, WRONG: wrong}.get(attempts[n % K], attempts[n % K]))
        return out


def problems():
    return [{"problem": label, "answer": gold} for label, (gold, *_) in SCRIPT.items()]


def prompt_of(label: str) -> str:
    return PROMPT_TEMPLATE.replace("{problem}", label)


def build(generate, batch_problems=16, **options):
    """Sample the scripted attempts, then build with the scripted model as the synthesis writer."""
    rows = sample_attempts(problems(), generate, k=K, batch_problems=batch_problems)
    return build_examples(rows, prompt_writer(generate), batch_problems=batch_problems, **options)


def test_counts_by_reason():
    generate = ScriptedGenerator()
    examples, stats = build(generate, m_max=1, batch_problems=4)
    assert stats == {
        "problems": 6, "attempts": 24, "correct_attempts": 2 + 1 + 2 + 1 + 4, "blank_attempts": 1,
        "plain_examples": 5,  # one distinct right attempt for each of A..E
        "pairs": 4, "synthesis_examples": 1,
        "dropped_no_pair": 2, "dropped_unparsed": 1, "dropped_unassembled": 1, "dropped_wrong_answer": 1,
    }
    assert len(examples) == 5 + 1
    # Batches of 4 problems: the attempt calls (K attempts per problem), then one synthesis call per batch with pairs.
    assert [len(c) for c in generate.calls] == [4 * K, 2 * K, 4]


def test_examples_hold_verified_syntheses_and_plain_solutions():
    examples, _ = build(ScriptedGenerator(), m_max=1)
    plain = [e for e in examples if "Incorrect attempt:" not in e["messages"][0]["content"]]
    assert [(e["messages"][0]["content"], e["messages"][1]["content"]) for e in plain] == [
        (prompt_of(label), SCRIPT[label][1]) for label in list(SCRIPT)[:5]]

    (synthesis,) = [e for e in examples if "Incorrect attempt:" in e["messages"][0]["content"]]
    user, assistant = synthesis["messages"]
    label = "(A) 23 + 45 - 12"
    _, right, wrong, _, _ = SCRIPT[label]
    assert user == {"role": "user", "content": build_synthesis_prompt(prompt_of(label), wrong, right)}
    assert assistant["role"] == "assistant"
    # The target copies the wrong attempt exactly (single space), then the reflection and the fix.
    expected_trajectory = ("Step 1: 23 + 45 = 68\nWait, 68 - 12 is 56, not 66.\nStep 2: 68 - 12 = 56\n"
                           "The answer is \\boxed{56}")
    assert assistant["content"] == format_synthesis("Step 2 subtracts wrongly.", expected_trajectory)
    # Round trip: what the trainer parses out of the target is the same trajectory.
    again = assemble_trajectory(wrong, parse_synthesis(assistant["content"]), prefix_match="strict")
    assert again.text.strip() == expected_trajectory.strip()
    assert again.parts()[0] == "Step 1: 23 + 45 = 68"


def test_longest_prefix_match_still_drops_a_rewrite_without_reflection():
    # "longest" tolerates a loose copy before the model's own reflection; C's rewrite has no reflection at all.
    _, stats = build(ScriptedGenerator(), m_max=1, prefix_match="longest")
    assert stats["dropped_unassembled"] == 1 and stats["synthesis_examples"] == 1


def test_m_max_and_correct_per_problem():
    _, stats = build(ScriptedGenerator(), m_max=4, correct_per_problem=3)
    # B has 3 wrong attempts, C 2, D 3, A 1 (its blank attempt is never paired).
    assert stats["pairs"] == 1 + 3 + 2 + 3 and stats["dropped_unparsed"] == 3 and stats["dropped_wrong_answer"] == 3
    assert stats["plain_examples"] == 5  # the right attempts of a problem are all the same text


def test_generator_returning_too_few_texts_fails():
    with pytest.raises(ValueError, match="returned 0 texts for 24 prompts"):
        sample_attempts(problems(), lambda messages: [], k=K)
    rows = sample_attempts(problems(), ScriptedGenerator(), k=K)
    with pytest.raises(ValueError, match="returned 0 texts for 4 prompts"):
        build_examples(rows, prompt_writer(lambda messages: []), m_max=1)


def test_write_and_read_back(tmp_path):
    examples, stats = build(ScriptedGenerator(), m_max=1)
    out = write_examples(examples, stats, tmp_path / "cs")
    lines = (out / DATA_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == examples
    assert json.loads((out / STATS_FILE).read_text()) == stats
    chats = read_chats(out / DATA_FILE)
    assert chats[0] == {"prompt": examples[0]["messages"][:1], "completion": examples[0]["messages"][1:]}


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "line 2"), ('{"text": "x"}', "line 2"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "line 2: 'messages' needs")])
def test_bad_chat_lines_are_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                    + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_chats(path)


def test_cli_build_with_a_local_model(tiny_model_dir, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{a} + {a}", "answer": str(2 * a)}) + "\n" for a in (1, 2)))
    out = tmp_path / "cs"
    assert main(["coldstart", "build", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir),
                 "--k", "2", "--max-tokens", "4", "--synthesis-max-tokens", "4"]) == 0
    stats = json.loads((out / STATS_FILE).read_text())
    assert stats["problems"] == 2 and stats["attempts"] == 4  # a random tiny model: its attempts are all wrong
    assert (out / DATA_FILE).exists()


def test_cli_train_writes_a_model(tiny_model_dir, tmp_path):
    out = write_examples(*build(ScriptedGenerator(), m_max=1), tmp_path / "cs")
    model_dir = tmp_path / "sft"
    assert main(["coldstart", "train", "--data", str(out / DATA_FILE), "--model", str(tiny_model_dir), "--out",
                 str(model_dir), "--max-steps", "2", "--batch-size", "2", "--max-length", "256", "--lr", "1e-3"]) == 0
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any((a != b).any() for a, b in zip(trained.parameters(), original.parameters()))
    assert (model_dir / "tokenizer_config.json").exists()


def test_sft_loss_covers_the_assistant_turn_only(tiny_model_dir, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"},
                                             {"role": "assistant", "content": "It is 4."}]}) + "\n")
    trainer = sft_trainer(data, str(tiny_model_dir), tmp_path / "out")
    row = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    trained = tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])
    ignored = tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100])
    assert trained.startswith("It is 4.") and "What is" in ignored and "It is" not in ignored


# ---------------------------------------------------------------------------------------------------------------------
# --teacher rule and attempts reuse


def test_rule_teacher_end_to_end_on_scripted_attempts(tmp_path):
    rows = sample_attempts(problems(), ScriptedGenerator(), k=K)
    examples, stats = build_examples(rows, rule_writer, m_max=1)
    # A..D have a pair each (one wrong attempt, m_max=1); the rule writer repairs every one of them (no model call).
    assert stats["pairs"] == 4 and stats["synthesis_examples"] == 4 and stats["dropped_no_pair"] == 2
    label = "(A) 23 + 45 - 12"
    _, right, wrong, _, _ = SCRIPT[label]
    (example,) = [e for e in examples if e["messages"][0]["content"] == build_synthesis_prompt(prompt_of(label), wrong,
                                                                                               right)]
    assert example["messages"][1]["content"] == (
        "<analysis>\nThe first critical error is step 2: it claims 68 - 12 = 66, but 68 - 12 = 56.\n</analysis>\n"
        "<reconstruction>\nStep 1: 23 + 45 = 68\nWait, 68 - 12 = 66 is wrong: 68 - 12 = 56. Let me redo this from "
        "there.\n68 - 12 = 56\nThe answer is \\boxed{56}\n</reconstruction>")
    # What the trainer reads back: the wrong attempt's own step 1, then the turn.
    trajectory = assemble_trajectory(wrong, parse_synthesis(example["messages"][1]["content"]))
    assert trajectory.parts()[0] == "Step 1: 23 + 45 = 68"
    out = write_examples(examples, stats, tmp_path / "cs")
    assert len(read_chats(out / DATA_FILE)) == len(examples)


def test_rule_writer_without_a_synthesis_is_counted_unparsed():
    # The only right attempt has a false step (2 + 3 = 6): the splice's checker refuses it as a reference.
    rows = [{"problem": "2 + 3", "answer": "5",
             "attempts": ["2 + 3 = 6\n6 - 1 = 5\nThe answer is \\boxed{5}", "2 + 3 = 7\nThe answer is \\boxed{7}"]}]
    assert rule_writer([], "before_error") == []
    examples, stats = build_examples(rows, rule_writer)
    assert stats["pairs"] == 1 and stats["dropped_unparsed"] == 1 and stats["synthesis_examples"] == 0
    assert len(examples) == 1  # the plain correct solution only


def test_references_per_wrong_and_cuts_multiply_the_pairs():
    rights = ["2 + 3 = 5\nThe answer is \\boxed{5}", "3 + 2 = 5\nSo \\boxed{5}", "2 + 3 = 5\nThe answer is \\boxed{5}"]
    rows = [{"problem": "2 + 3", "answer": "5", "attempts": [*rights, "2 + 3 = 6\nThe answer is \\boxed{6}"]}]
    # 1 wrong attempt x 2 distinct right siblings (3 right attempts, 2 distinct texts) x 2 cuts.
    examples, stats = build_examples(rows, rule_writer, references_per_wrong=3, cuts=("before_error", "after_error"),
                                     correct_per_problem=5)
    assert stats["pairs"] == 4 and stats["synthesis_examples"] == 4 and stats["plain_examples"] == 2
    prompts = [e["messages"][0]["content"] for e in examples[2:]]
    assert sum("but not including" in p for p in prompts) == 2 and sum("and including" in p for p in prompts) == 2
    assert {write_rule_synthesis(rows[0]["attempts"][3], r, "5", cut) for r in rights[:2]
            for cut in ("before_error", "after_error")} == {e["messages"][1]["content"] for e in examples[2:]}
    with pytest.raises(ValueError, match="cuts"):
        build_examples(rows, rule_writer, cuts=("middle",))


def test_cli_build_reuses_attempts_with_the_rule_teacher(tmp_path):
    rows = sample_attempts(problems(), ScriptedGenerator(), k=K)
    first = write_attempts(rows, tmp_path / "first")
    assert read_attempts(first / ATTEMPTS_FILE) == rows
    out = tmp_path / "again"
    # No --data and no model: the attempts are read back, the rule writes the syntheses.
    assert main(["coldstart", "build", "--attempts", str(first / ATTEMPTS_FILE), "--teacher", "rule", "--out", str(out),
                 "--m-max", "1"]) == 0
    assert (out / ATTEMPTS_FILE).read_text() == (first / ATTEMPTS_FILE).read_text()
    stats = json.loads((out / STATS_FILE).read_text())
    assert stats["problems"] == 6 and stats["synthesis_examples"] == 4 and stats["plain_examples"] == 5
    assert main(["coldstart", "build", "--out", str(out)]) == 2  # neither --data nor --attempts


GOOD_ROW = {"problem": "2 + 3", "answer": "5", "attempts": ["\\boxed{5}", "\\boxed{6}"]}


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "line 2: not JSON"),
    ("[1, 2]", "line 2: not a JSON object"),
    (json.dumps({"problem": "p", "answer": "1"}), "line 2: missing field 'attempts'"),
    (json.dumps({**GOOD_ROW, "attempts": ["only one"]}), "line 2: field 'attempts' must be a list of at least 2"),
    (json.dumps({**GOOD_ROW, "attempts": ["a", 3]}), "line 2: field 'attempts'"),
    (json.dumps({**GOOD_ROW, "answer": None}), "line 2: field 'answer'"),
    (json.dumps({**GOOD_ROW, "problem": " "}), "line 2: field 'problem'"),
])
def test_bad_attempts_file_names_file_line_and_field(tmp_path, line, message, capsys):
    path = tmp_path / "attempts.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"attempts.jsonl: {message}"):
        read_attempts(path)
    assert main(["coldstart", "build", "--attempts", str(path), "--teacher", "rule", "--out", str(tmp_path / "o")]) == 2
    assert "line 2" in capsys.readouterr().out


def test_cli_train_with_lora_saves_a_merged_model(tiny_model_dir, tmp_path):
    out = write_examples(*build(ScriptedGenerator(), m_max=1), tmp_path / "cs")
    model_dir = tmp_path / "sft"
    assert main(["coldstart", "train", "--data", str(out / DATA_FILE), "--model", str(tiny_model_dir), "--out",
                 str(model_dir), "--max-steps", "2", "--batch-size", "2", "--max-length", "256", "--lr", "1e-2",
                 "--lora-r", "4"]) == 0
    trained = AutoModelForCausalLM.from_pretrained(model_dir)  # a plain model: the adapter is merged
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not any("lora" in name for name, _ in trained.named_parameters())
    assert any((a != b).any() for a, b in zip(trained.parameters(), original.parameters()))
