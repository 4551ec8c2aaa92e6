from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_synthesis import tiles
from tapo.core.splice import _claims, _evaluate, split_steps, splice_trajectory
from tapo.core.verify import extract_answer

CHAIN_WRONG = "23 + 45 = 63\n63 - 12 = 51\nThe answer is \\boxed{51}"
CHAIN_RIGHT = "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}"
REDO = "Let me redo this from there."



def test_steps_split_lines_and_sentences_but_not_enumerators_or_decimals():
    text = "1. Add 2.5 and 1. Then 3.5 - 1 = 2.5!\n\n  Step 2: done?  Yes"
    assert [text[s:e] for s, e in split_steps(text)] == ["1. Add 2.5 and 1.", "Then 3.5 - 1 = 2.5!", "Step 2: done?", "Yes"]


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
@given(wrong=_solution(), reference=_solution())
def test_splice_property_prefix_is_verbatim_and_spans_tile(wrong, reference):
    t = splice_trajectory(wrong, reference)
    if t is not None:
        assert tiles(t)
        assert wrong.startswith(t.parts()[0])
        assert t.text.endswith(reference[reference.rindex("The answer is") :])
        assert extract_answer(t.text) == extract_answer(reference)


@settings(max_examples=100, deadline=None)
@given(wrong=st.text(max_size=80), reference=st.text(max_size=80))
def test_splice_never_crashes_on_arbitrary_text(wrong, reference):
    t = splice_trajectory(wrong, reference + " \\boxed{1}")
    assert t is None or (tiles(t) and wrong.startswith(t.parts()[0]))
