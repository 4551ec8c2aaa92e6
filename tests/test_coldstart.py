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
