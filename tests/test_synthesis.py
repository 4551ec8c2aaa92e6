import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo.core.synthesis import (
    MARKERS,
    SYNTHESIS_PROMPT,
    Synthesis,
    assemble_trajectory,
    build_synthesis_prompt,
    parse_synthesis,
)
from tapo.core.trajectory import Trajectory


def tiles(t: Trajectory) -> bool:
    prefix, reflection, correction = t.parts()
    return (
        prefix + reflection + correction == t.text
        and t.prefix_span[0] == 0
        and t.prefix_span[1] == t.reflection_span[0]
        and t.reflection_span[1] == t.correction_span[0]
        and t.correction_span[1] == len(t.text)
    )


# ------------------------------------------------------------------------------------------------- prompt, markers


def test_prompt_carries_the_inputs_and_the_tag_layout():
    prompt = build_synthesis_prompt("What is {x}?", " 1 + 1 = 3\n", "1 + 1 = 2 so \\boxed{2}")
    assert "What is {x}?" in prompt and "1 + 1 = 3" in prompt and "\\boxed{2}" in prompt
    for tag in ("<analysis>", "</analysis>", "<reconstruction>", "</reconstruction>", "\\boxed{answer}"):
        assert tag in prompt
    # The reference comes after the wrong attempt, and the answer format after both.
    assert prompt.index("1 + 1 = 3") < prompt.index("so \\boxed{2}") < prompt.index("\\boxed{answer}")
    assert SYNTHESIS_PROMPT.count("{problem}") == SYNTHESIS_PROMPT.count("{wrong}") == 1


def test_prompt_rejects_empty_inputs():
    with pytest.raises(ValueError, match="wrong"):
        build_synthesis_prompt("p", "  ", "r")


def test_markers_are_lower_case_reflection_phrases():
    assert all(m == m.lower() and m.strip() == m for m in MARKERS)
    assert {"wait", "let me re-check", "i made a mistake", "actually", "hmm"} <= set(MARKERS)


# ------------------------------------------------------------------------------------------------------ parsing


def test_parse_well_formed_output_keeps_raw_tag_contents():
    text = "Sure.\n<analysis>\nStep 2 is wrong.\n</analysis>\n<reconstruction>\nA\nWait, B. \\boxed{5}\n"
    text += "</reconstruction>\n"
    assert parse_synthesis(text + "Bye") == Synthesis("\nStep 2 is wrong.\n", "\nA\nWait, B. \\boxed{5}\n")


def test_parse_is_case_and_whitespace_tolerant_in_tags():
    text = "<ANALYSIS>a</ Analysis ><Reconstruction >r \\boxed{1}< /RECONSTRUCTION>"
    assert parse_synthesis(text) == Synthesis("a", "r \\boxed{1}")


def test_parse_truncated_output_needs_a_final_answer():
    head = "<analysis>a</analysis><reconstruction>x = 2\nWait, no. So \\boxed{3}"
    assert parse_synthesis(head) == Synthesis("a", "x = 2\nWait, no. So \\boxed{3}")
    assert parse_synthesis(head + "\n</recons") == Synthesis("a", "x = 2\nWait, no. So \\boxed{3}\n")
    assert parse_synthesis("<analysis>a</analysis><reconstruction>x = 2\nWait, no. So x =") is None


@pytest.mark.parametrize(
    "text",
    [
        "no tags at all, \\boxed{3}",
        "<analysis>only an analysis</analysis>",
        "<reconstruction>r \\boxed{1}</reconstruction><analysis>a</analysis>",  # wrong order
        "<analysis>a<reconstruction>r \\boxed{1}</reconstruction>",  # analysis never closed
        "<analysis>  </analysis><reconstruction>r \\boxed{1}</reconstruction>",  # empty analysis
        "<analysis>a</analysis><reconstruction>\n</reconstruction>",  # empty reconstruction
        "",
    ],
)
def test_parse_rejects_malformed_output(text):
    assert parse_synthesis(text) is None


def test_parse_takes_the_last_complete_block():
    echo = "Format: <analysis>...</analysis><reconstruction>...</reconstruction>\n"
    final = "<analysis>real</analysis><reconstruction>r \\boxed{2}</reconstruction>"
    assert parse_synthesis(echo + final) == Synthesis("real", "r \\boxed{2}")
    draft = "<analysis>draft</analysis><reconstruction>d \\boxed{1}</reconstruction>"
    assert parse_synthesis(draft + "\n" + final) == Synthesis("real", "r \\boxed{2}")


def test_parse_keeps_tags_inside_the_copied_attempt():
    copy = "I write <reconstruction> and </reconstruction> and <analysis> here.\nWait, 2. \\boxed{2}"
    text = f"<analysis>a</analysis><reconstruction>{copy}</reconstruction>"
    assert parse_synthesis(text) == Synthesis("a", copy)


def test_parse_nested_analysis_tags():
    text = "<analysis><analysis>x</analysis></analysis><reconstruction>r \\boxed{1}</reconstruction>"
    assert parse_synthesis(text) == Synthesis("x", "r \\boxed{1}")


_MEGABYTE_INPUTS = {
    "opens_only": lambda: "<analysis>" * 100_000,
    "close_open_pairs": lambda: "</analysis><reconstruction>" * 40_000,
    "lone_brackets_in_body": lambda: "<analysis>a</analysis><reconstruction>" + "< " * 500_000,
    "brackets": lambda: "<" * 1_000_000,
    "long_body": lambda: "<analysis>a</analysis><reconstruction>" + "x" * 1_000_000 + "</reconstruction>",
}


@pytest.mark.parametrize("name", list(_MEGABYTE_INPUTS))
def test_parse_megabyte_inputs_in_linear_time(name):
    text = _MEGABYTE_INPUTS[name]()
    start = time.perf_counter()
    parse_synthesis(text)
    assert time.perf_counter() - start < 3.0  # quadratic work on 1 MB would take hours


# ----------------------------------------------------------------------------------------------------- assembly

WRONG = "We add: 23 + 45 = 68.\nWe subtract: 68 - 12 = 50.\nThe answer is \\boxed{50}."
ANALYSIS = "The subtraction is wrong: 68 - 12 = 56."


def assemble(copy, **kwargs):
    return assemble_trajectory(WRONG, Synthesis(analysis=ANALYSIS, reconstruction=copy), **kwargs)


def test_assemble_splits_copy_reflection_and_correction():
    copy = "\nWe add: 23 + 45 = 68.\nWait, 68 - 12 is 56, not 50.\nWe subtract: 68 - 12 = 56.\n"
    copy += "The answer is \\boxed{56}.\n"
    t = assemble(copy, prefix_match="strict")
    assert t.parts() == (
        "We add: 23 + 45 = 68.",
        "\nWait, 68 - 12 is 56, not 50.",
        "\nWe subtract: 68 - 12 = 56.\nThe answer is \\boxed{56}.\n",
    )
    assert tiles(t) and t.prefix_fraction == pytest.approx(21 / 74)
    assert len(WRONG) == 74


def test_assemble_slices_the_prefix_from_the_wrong_rollout_not_the_copy():
    copy = "We add:23+45   =  68.\n\nHmm, 68 - 12 = 56. The answer is \\boxed{56}."  # same text, other whitespace
    t = assemble(copy, prefix_match="strict")
    assert t.parts() == ("We add: 23 + 45 = 68.", "\n\nHmm, 68 - 12 = 56.", " The answer is \\boxed{56}.")


def test_assemble_accepts_a_copy_that_stops_mid_step():
    t = assemble("We add: 23 + 45 = 68.\nWe subtract: 68 - 12 = Wait, that is 56. So \\boxed{56}.")
    assert t.parts() == ("We add: 23 + 45 = 68.\nWe subtract: 68 - 12 =", " Wait, that is 56.", " So \\boxed{56}.")


def test_assemble_never_splits_a_word_at_the_seam():
    # "No" matches the start of the policy's "Note": the prefix must not end inside that word.
    synthesis = Synthesis("2 + 2 is 4.", "No, wait, 2 + 2 = 4. So \\boxed{4}.")
    t = assemble_trajectory("Note that 2 + 2 = 5.\nSo \\boxed{5}.", synthesis, prefix_match="strict")
    assert t.parts() == ("", "No, wait, 2 + 2 = 4.", " So \\boxed{4}.")


def test_assemble_deviating_copy_strict_rejects_longest_keeps_whole_steps():
    # The model wrote the corrected solution instead of copying: the copy runs into "68 - 12 = 5|6" mid-step.
    copy = "We add: 23 + 45 = 68.\nWe subtract: 68 - 12 = 56.\nThe answer is \\boxed{56}."
    assert assemble(copy, prefix_match="strict") is None
    t = assemble(copy, prefix_match="longest")
    assert t.parts() == (
        "We add: 23 + 45 = 68.",
        "\nThe subtraction is wrong: 68 - 12 = 56.",
        "\nWe subtract: 68 - 12 = 56.\nThe answer is \\boxed{56}.",
    )
    assert tiles(t)


def test_assemble_rejects_a_prefix_the_model_did_not_write():
    copy = "We add: 23 + 45 = 69.\nWait, 68 - 12 = 56. So \\boxed{56}."  # "69" is not what the policy wrote
    assert assemble(copy, prefix_match="strict") is None
    assert assemble(copy, min_prefix_chars=1) is None  # longest falls back to an empty prefix
    t = assemble(copy)
    assert t.parts() == ("", ANALYSIS, "\nWe add: 23 + 45 = 69.\nWait, 68 - 12 = 56. So \\boxed{56}.")
    assert t.prefix_fraction == 0.0


@pytest.mark.parametrize(
    "copy",
    [
        WRONG + "\nWait, 68 - 12 = 56. So \\boxed{56}.",  # the whole wrong attempt kept: no error left out
        "We add: 23 + 45 = 68.\nWait, that is wrong.",  # reflection but no correction
        "We add: 23 + 45 = 68.\nWait, that is wrong",  # reflection runs to the end
        "We add: 23 + 45 = 68.",  # only the copy
    ],
)
def test_assemble_rejects_trajectories_without_a_correction_or_an_error(copy):
    assert assemble(copy) is None


def test_assemble_min_prefix_chars_and_bad_mode():
    copy = "We add: 23 + 45 = 68.\nBut 68 - 12 = 56. So \\boxed{56}."
    assert assemble(copy, min_prefix_chars=21).parts()[0] == "We add: 23 + 45 = 68."
    assert assemble(copy, min_prefix_chars=22) is None
    with pytest.raises(ValueError, match="prefix_match"):
        assemble(copy, prefix_match="fuzzy")


def test_parse_then_assemble_with_tags_inside_the_wrong_rollout():
    wrong = "Use <reconstruction> as a word: 2 + 2 = 5.\nSo \\boxed{5}."
    output = (
        "<analysis>2 + 2 is 4.</analysis>\n<reconstruction>\nUse <reconstruction> as a word:\n"
        "Wait, 2 + 2 is 4, not 5.\n2 + 2 = 4.\nSo \\boxed{4}.\n</reconstruction>"
    )
    t = assemble_trajectory(wrong, parse_synthesis(output), prefix_match="strict")
    expected = ("Use <reconstruction> as a word:", "\nWait, 2 + 2 is 4, not 5.", "\n2 + 2 = 4.\nSo \\boxed{4}.\n")
    assert t.parts() == expected


@settings(max_examples=150, deadline=None)
@given(wrong=st.text(max_size=60), copy=st.text(max_size=80), analysis=st.text(max_size=10))
def test_assemble_property_prefix_is_the_policys_own_text(wrong, copy, analysis):
    for mode in ("longest", "strict"):
        t = assemble_trajectory(wrong, Synthesis(analysis, copy), prefix_match=mode)
        if t is not None:
            assert tiles(t) and wrong.startswith(t.parts()[0]) and t.parts()[2].strip()
