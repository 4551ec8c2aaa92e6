from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_synthesis import tiles
from tapo.core.splice import (
    StepError,
    _claims,
    _evaluate,
    find_first_error,
    has_false_step,
    splice_at_first_error,
    splice_trajectory,
    split_steps,
)
from tapo.core.trajectory import CUTS
from tapo.core.verify import extract_answer

CHAIN_WRONG = "23 + 45 = 63\n63 - 12 = 51\nThe answer is \\boxed{51}"
CHAIN_RIGHT = "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}"
REDO = "Let me redo this from there."



def test_steps_split_lines_and_sentences_but_not_enumerators_or_decimals():
    text = "1. Add 2.5 and 1. Then 3.5 - 1 = 2.5!\n\n  Step 2: done?  Yes"
    expected = ["1. Add 2.5 and 1.", "Then 3.5 - 1 = 2.5!", "Step 2: done?", "Yes"]
    assert [text[s:e] for s, e in split_steps(text)] == expected


@pytest.mark.parametrize(
    "step, expected",
    [
        ("23 + 45 = 63", [("23 + 45", "63", 68, False)]),
        ("so (23 + 45) - 12 = 56.", [("(23 + 45) - 12", "56", 56, True)]),
        ("10 / 4 = 2.5, 10 / 3 = 3.33", [
            ("10 / 4", "2.5", Fraction(5, 2), True),
            ("10 / 3", "3.33", Fraction(10, 3), True),
        ]),
        ("10 / 3 = 3", [("10 / 3", "3", Fraction(10, 3), False)]),
        ("1/2 + 1/3 = 5/6", [("1/2 + 1/3", "5/6", Fraction(5, 6), True)]),
        ("3 × 4 = 13, 3 \\times 4 = 12", [("3 * 4", "13", 12, False), ("3 * 4", "12", 12, True)]),
        ("1,000 + 1 = 1,001", [("1000 + 1", "1001", 1001, True)]),
        ("-3 + 5 = 2", [("-3 + 5", "2", 2, True)]),
        ("23 + 45 = 68 - 12 = 56", [("23 + 45", "68", 68, True), ("68 - 12", "56", 56, True)]),
        # not checkable: a variable, a power, a term glued to a letter, division by zero, a bare number, a relation
        ("x + 2 + 3 = 5, x - 3 = 2, 2^3 + 1 = 9, f(2) + 3 = 5", []),
        ("2 ** 3 = 8, 5 / 0 = 1, x = 5, 5 = 5, a <= 3 + 4, 2 + 2 = 4x", []),
    ],
)
def test_claims_are_found_and_checked_exactly(step, expected):
    assert [(c.lhs, c.stated, c.true, c.holds) for c in _claims(step)] == expected


def test_evaluate_is_not_eval():
    assert _evaluate("__import__('os').getcwd()") is None
    assert _evaluate("(1 + 2) * 3 / 4") == Fraction(9, 4)
    assert _evaluate("1 +" * 100 + "1") is None  # too long to parse safely


def test_splice_arithmetic_chain_first_step_wrong():
    t = splice_trajectory(CHAIN_WRONG, CHAIN_RIGHT)
    assert t.parts() == ("", f"Wait, 23 + 45 = 63 is wrong: 23 + 45 = 68. {REDO}", "\n" + CHAIN_RIGHT)
    assert t.prefix_fraction == 0.0 and extract_answer(t.text) == "56"


def test_splice_arithmetic_chain_later_step_wrong():
    wrong = "23 + 45 = 68\n68 - 12 = 50\nThe answer is \\boxed{50}"
    t = splice_trajectory(wrong, CHAIN_RIGHT)
    assert t.text == (
        f"23 + 45 = 68\nWait, 68 - 12 = 50 is wrong: 68 - 12 = 56. {REDO}\n68 - 12 = 56\nThe answer is \\boxed{{56}}"
    )
    assert t.parts()[0] == "23 + 45 = 68" and t.prefix_fraction == pytest.approx(12 / len(wrong))


def test_splice_free_text_rollout_of_a_chat_model():
    wrong = "First, let's add 23 and 45: 23 + 45 = 63.\n\nNext, we subtract 12: 63 - 12 = 48.\n\nSo, the answer is: 48"
    reference = "We add first: 23 + 45 = 68. Then 68 - 12 = 56. The answer is \\boxed{56}."
    t = splice_trajectory(wrong, reference)
    assert t.parts() == ("", f"Wait, 23 + 45 = 63 is wrong: 23 + 45 = 68. {REDO}", "\n" + reference)
    # Error in the second paragraph: the correct set-up paragraph is kept although the reference words it differently.
    wrong = "First, let's add 23 and 45: 23 + 45 = 68.\n\nNext, we subtract 12: 68 - 12 = 54.\n\nSo, the answer is: 54"
    t = splice_trajectory(wrong, reference)
    assert t.parts() == (
        "First, let's add 23 and 45: 23 + 45 = 68.",
        f"\n\nWait, 68 - 12 = 54 is wrong: 68 - 12 = 56. {REDO}",
        " Then 68 - 12 = 56. The answer is \\boxed{56}.",
    )


def test_splice_only_the_final_answer_step_is_read_as_an_answer():
    wrong = "The answer is the sum of 23 and 45, minus 12.\n23 + 45 = 68\n68 - 12 = 50\nThe answer is \\boxed{50}"
    t = splice_trajectory(wrong, CHAIN_RIGHT)
    assert t.parts()[0] == "The answer is the sum of 23 and 45, minus 12.\n23 + 45 = 68"
    assert t.parts()[1] == f"\nWait, 68 - 12 = 50 is wrong: 68 - 12 = 56. {REDO}"


def test_splice_wrong_has_fewer_steps_than_the_reference():
    # It stops after the first step and answers 68: that answer step is the bad one, the reference resumes at step 2.
    t = splice_trajectory("23 + 45 = 68\nThe answer is \\boxed{68}", CHAIN_RIGHT)
    assert t.parts() == (
        "23 + 45 = 68",
        f"\nWait, the answer is 68 is wrong: 68 - 12 = 56. {REDO}",
        "\n68 - 12 = 56\nThe answer is \\boxed{56}",
    )


def test_splice_enumerated_steps_and_an_unsupported_number():
    # "23 + 54" is true arithmetic but rests on numbers the reference never uses: that step is where it went wrong.
    wrong = "1. We have 23 and 45.\n2. 23 + 54 = 77\n3. 77 - 12 = 65\nThe answer is \\boxed{65}"
    t = splice_trajectory(wrong, CHAIN_RIGHT)
    assert t.parts() == (
        "1. We have 23 and 45.",
        f"\nWait, 2. 23 + 54 = 77 is wrong: 23 + 45 = 68. {REDO}",
        "\n" + CHAIN_RIGHT,
    )


def test_splice_appends_gold_when_the_reference_states_no_answer():
    t = splice_trajectory(CHAIN_WRONG, "23 + 45 = 68\n68 - 12 = 56", gold="56")
    assert t.parts()[2] == "\n23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}."
    assert splice_trajectory(CHAIN_WRONG, "23 + 45 = 68\n68 - 12 = 56") is None  # no target answer at all


def test_splice_custom_template():
    t = splice_trajectory(CHAIN_WRONG, CHAIN_RIGHT, reflection_template="Hmm, {bad}? No: {fix}.")
    assert t.parts()[1] == "Hmm, 23 + 45 = 63? No: 23 + 45 = 68."
    for template in ("Wait, {fix}.", "Wait, {bad} {fix} {other}.", "Wait, {bad} {fix"):
        with pytest.raises(ValueError, match="reflection_template"):
            splice_trajectory(CHAIN_WRONG, CHAIN_RIGHT, reflection_template=template)


def test_splice_cut_after_error_keeps_the_erroneous_step_and_reflects_right_after_it():
    wrong = "37 + 45 = 72\n72 - 10 = 62\nThe answer is \\boxed{62}"
    right = "37 + 45 = 82\n82 - 10 = 72\nThe answer is \\boxed{72}"
    before = splice_trajectory(wrong, right)  # the default: the reflection names a claim the text never made
    assert before.parts() == ("", f"Wait, 37 + 45 = 72 is wrong: 37 + 45 = 82. {REDO}", "\n" + right)
    after = splice_trajectory(wrong, right, cut="after_error")
    assert after.parts() == ("37 + 45 = 72", f"\nWait, 37 + 45 = 72 is wrong: 37 + 45 = 82. {REDO}", "\n" + right)
    assert after.prefix_fraction == pytest.approx(12 / len(wrong)) and tiles(after)


def test_splice_cut_after_error_at_the_final_step_keeps_the_whole_rollout():
    # The rollout stops early with a wrong answer: that last step is the error, so the prefix is all of it.
    wrong = "23 + 45 = 68\nThe answer is \\boxed{68}"
    t = splice_trajectory(wrong + "\n", CHAIN_RIGHT, cut="after_error")
    reflection = f"\nWait, the answer is 68 is wrong: 68 - 12 = 56. {REDO}"
    assert t.parts() == (wrong, reflection, "\n68 - 12 = 56\nThe answer is \\boxed{56}")
    t = splice_trajectory("1. 23 + 45 = 63. 2. 63 - 12 = 51.", CHAIN_RIGHT, gold="56", cut="after_error")
    assert t.parts()[:2] == ("1. 23 + 45 = 63.", f" Wait, 23 + 45 = 63 is wrong: 23 + 45 = 68. {REDO}")
    with pytest.raises(ValueError, match="cut"):
        splice_trajectory(CHAIN_WRONG, CHAIN_RIGHT, cut="at_error")


def test_find_first_error_describes_the_error():
    assert find_first_error(CHAIN_WRONG, CHAIN_RIGHT, "56") == StepError(
        step=0, bad="23 + 45 = 63", fix="23 + 45 = 68", is_claim=True, resume=0)
    assert find_first_error("23 + 45 = 68\nThe answer is \\boxed{68}", CHAIN_RIGHT, "56") == StepError(
        step=1, bad="the answer is 68", fix="68 - 12 = 56", is_claim=False, resume=1)
    spliced = splice_at_first_error(CHAIN_WRONG, CHAIN_RIGHT)
    assert spliced.error.step == 0 and spliced.trajectory == splice_trajectory(CHAIN_WRONG, CHAIN_RIGHT)


def test_a_reference_with_cancelling_errors_is_refused_unless_asked_not_to_check():
    # 66 + 16 = 84 is false and 84 - 22 = 60 is false too: the answer 60 is right only because the errors cancel.
    lucky = "66 + 16 = 84\n84 - 22 = 60\nThe answer is \\boxed{60}"
    wrong = "66 + 16 = 72\n72 - 22 = 50\nThe answer is \\boxed{50}"
    assert has_false_step(lucky) and not has_false_step(CHAIN_RIGHT)
    assert splice_trajectory(wrong, lucky) is None
    unchecked = splice_trajectory(wrong, lucky, check_reference=False)  # would teach both false steps as the fix
    assert unchecked.parts() == ("", f"Wait, 66 + 16 = 72 is wrong: 66 + 16 = 82. {REDO}", "\n" + lucky)
    right = "66 + 16 = 82\n82 - 22 = 60\nThe answer is \\boxed{60}"
    assert splice_trajectory(wrong, right).parts() == unchecked.parts()[:2] + ("\n" + right,)


@pytest.mark.parametrize(
    "wrong",
    [
        CHAIN_RIGHT,  # identical
        "Adding gives 23 + 45 = 68. Subtracting 12: 68 - 12 = 56. So \\boxed{56}.",  # other words, same steps
        "23 + 45 = 68\n68 - 12 =",  # unfinished, nothing wrong yet
    ],
)
def test_splice_returns_none_when_nothing_diverges(wrong):
    assert splice_trajectory(wrong, CHAIN_RIGHT) is None


_numbers = st.integers(min_value=0, max_value=60)


@st.composite
def _solution(draw):
    """A step list: arithmetic steps (true or off by some delta), prose, and a final answer line."""
    steps = []
    for _ in range(draw(st.integers(0, 5))):
        a, b, op = draw(_numbers), draw(_numbers), draw(st.sampled_from("+-*"))
        value = {"+": a + b, "-": a - b, "*": a * b}[op] + draw(st.sampled_from([0, 0, 1, -3]))
        form = draw(st.sampled_from(["{e}", "So {e}.", "Step {i}: {e}"]))
        steps.append(form.format(e=f"{a} {op} {b} = {value}", i=len(steps) + 1))
        if draw(st.booleans()):
            steps.append(draw(st.sampled_from(["Let's think.", "We know 23 apples.", "Hmm, ok.", "Now subtract."])))
    steps.append(f"The answer is \\boxed{{{draw(_numbers)}}}")
    return draw(st.sampled_from(["\n", " ", "\n\n"])).join(steps)


@settings(max_examples=200, deadline=None)
@given(wrong=_solution(), reference=_solution(), cut=st.sampled_from(CUTS), check_reference=st.booleans())
def test_splice_property_prefix_is_verbatim_and_spans_tile(wrong, reference, cut, check_reference):
    t = splice_trajectory(wrong, reference, cut=cut, check_reference=check_reference)
    if t is not None:
        assert not (check_reference and has_false_step(t.parts()[2]))
        assert tiles(t)
        assert wrong.startswith(t.parts()[0])
        assert t.text.endswith(reference[reference.rindex("The answer is") :])
        assert extract_answer(t.text) == extract_answer(reference)


@settings(max_examples=100, deadline=None)
@given(wrong=st.text(max_size=80), reference=st.text(max_size=80))
def test_splice_never_crashes_on_arbitrary_text(wrong, reference):
    t = splice_trajectory(wrong, reference + " \\boxed{1}")
    assert t is None or (tiles(t) and wrong.startswith(t.parts()[0]))
