import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tapo.core.synthesis import (
    COPY_MISMATCH,
    MARKERS,
    NO_CORRECTION,
    NO_REFLECTION,
    PREFIX_MATCHES,
    REJECTIONS,
    SYNTHESIS_PROMPT,
    UNPARSED,
    Assembly,
    Synthesis,
    assemble_output,
    assemble_synthesis,
    assemble_trajectory,
    build_synthesis_prompt,
    format_synthesis,
    is_blank,
    parse_synthesis,
    write_rule_synthesis,
)
from tapo.core.splice import splice_trajectory, split_steps
from tapo.core.trajectory import CUTS, Trajectory


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


def test_prompt_rejects_blank_inputs_and_blank_rollouts_are_easy_to_tell_apart():
    with pytest.raises(ValueError, match="wrong"):
        build_synthesis_prompt("p", "  ", "r")
    assert [is_blank(text) for text in ("", " \n\t", None, "0", " x ")] == [True, True, True, False, False]


def test_prompt_asks_for_the_copy_the_cut_wants():
    assert "up to but not including the first critical error" in build_synthesis_prompt("p", "w", "r")
    assert "up to and including the first critical error" in build_synthesis_prompt("p", "w", "r", cut="after_error")
    with pytest.raises(ValueError, match="cut"):
        build_synthesis_prompt("p", "w", "r", cut="somewhere")


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
        "\nWe subtract: 68 - 12 = 56.\nThe answer is \\boxed{56}.",  # the trailing newline is tag layout: dropped
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


def test_assemble_a_rewrite_without_reflection_is_rejected_in_both_modes():
    # The model wrote the corrected solution instead of copying: the copy runs into "68 - 12 = 5|6" mid-step.
    copy = "We add: 23 + 45 = 68.\nWe subtract: 68 - 12 = 56.\nThe answer is \\boxed{56}."
    for mode in PREFIX_MATCHES:
        assert assemble_synthesis(WRONG, Synthesis(ANALYSIS, copy), prefix_match=mode) == Assembly(None, NO_REFLECTION)


def test_assemble_rejects_a_prefix_the_model_did_not_write():
    copy = "We add: 23 + 45 = 69.\nWait, 68 - 12 = 56. So \\boxed{56}."  # "69" is not what the policy wrote
    for mode in PREFIX_MATCHES:  # "longest" no longer falls back to an empty prefix plus the analysis
        assert assemble_synthesis(WRONG, Synthesis(ANALYSIS, copy), prefix_match=mode) == Assembly(None, COPY_MISMATCH)


@pytest.mark.parametrize(
    "copy, reason",
    [
        (WRONG + "\nWait, 68 - 12 = 56. So \\boxed{56}.", COPY_MISMATCH),  # the whole attempt kept: no error left out
        ("We add: 23 + 45 = 68.\nWait, that is wrong.\n\n", NO_CORRECTION),  # reflection but no correction
        ("We add: 23 + 45 = 68.\nWait, that is wrong", NO_CORRECTION),  # reflection runs to the end
        ("We add: 23 + 45 = 68.", NO_REFLECTION),  # only the copy
        ("We add: 23 + 45 = 68.\nSo 68 - 12 = 56. Hmm, yes. \\boxed{56}", COPY_MISMATCH),  # reflects after a rewrite
    ],
)
def test_assemble_rejections_say_why(copy, reason):
    assert assemble_synthesis(WRONG, Synthesis(ANALYSIS, copy)) == Assembly(None, reason)
    assert assemble(copy) is None


def test_assemble_output_parses_first_and_reasons_are_the_trainers_names():
    assert REJECTIONS == ("unparsed", "copy_mismatch", "no_reflection", "no_correction", "wrong_answer", "too_long")
    assert assemble_output(WRONG, "no tags") == Assembly(None, UNPARSED)
    output = "<analysis>a</analysis><reconstruction>We add: 23 + 45 = 68.\nWait, 56. So \\boxed{56}.</reconstruction>"
    assembled = assemble_output(WRONG, output, cut="after_error")
    assert assembled.rejection is None and assembled.trajectory.parts()[0] == "We add: 23 + 45 = 68."


def test_assemble_default_is_strict():
    loose = "We add: 23+45 is 68.\nWe subtract: 68 - 12 = 50.\nWait, 68 - 12 = 56. So \\boxed{56}."
    assert assemble(loose) is None and assemble(loose, prefix_match="longest") is not None


# The issue's bad example: the copy deviates in step 2, the error is in step 3. The old "longest" cut at the end of
# step 1 and inserted the analysis there: "Step 1 ... The first critical error is in Step 3 ... Step 2 ... Wait ...".
ISSUE_WRONG = "Step 1: 23 + 45 = 68.\nStep 2: 68 - 12 = 56.\nStep 3: 56 * 2 = 102.\nThe answer is \\boxed{102}."
ISSUE_ANALYSIS = "The first critical error is in Step 3: 56 * 2 = 112."


def test_assemble_longest_never_puts_a_diagnosis_before_a_step_it_did_not_follow():
    copy = ("Step 1: 23 + 45 = 68.\nStep 2: subtract 12 to get 56.\nWait, 56 * 2 = 112, not 102.\n"
            "Step 3: 56 * 2 = 112.\nThe answer is \\boxed{112}.")
    for mode in PREFIX_MATCHES:
        assembled = assemble_synthesis(ISSUE_WRONG, Synthesis(ISSUE_ANALYSIS, copy), prefix_match=mode)
        assert assembled == Assembly(None, COPY_MISMATCH)  # the step before "Wait" is not one the policy wrote


def test_assemble_longest_anchors_the_models_own_reflection_after_the_step_it_followed():
    # Step 1 is copied loosely ("is" for "="), step 2 exactly, then the reflection: the prefix is the policy's own
    # steps 1-2, the reflection the model's sentence (never the analysis), the correction the rest.
    copy = ("Step 1: 23 + 45 is 68.\nStep 2: 68 - 12 = 56.\nWait, 56 * 2 = 112, not 102.\nStep 3: 56 * 2 = 112.\n"
            "The answer is \\boxed{112}.\n")
    synthesis = Synthesis(ISSUE_ANALYSIS, copy)
    assert assemble_synthesis(ISSUE_WRONG, synthesis) == Assembly(None, COPY_MISMATCH)  # strict
    t = assemble_trajectory(ISSUE_WRONG, synthesis, prefix_match="longest")
    assert t.parts() == (
        "Step 1: 23 + 45 = 68.\nStep 2: 68 - 12 = 56.",
        "\nWait, 56 * 2 = 112, not 102.",
        "\nStep 3: 56 * 2 = 112.\nThe answer is \\boxed{112}.",
    )
    assert tiles(t) and ISSUE_ANALYSIS not in t.text


def test_assemble_longest_anchor_must_lie_past_the_deviation():
    def longest(copy):
        return assemble_synthesis(ISSUE_WRONG, Synthesis("a", copy), prefix_match="longest")

    # The copy deviates in step 2 and then repeats step 1 before reflecting: step 1 lies before the deviation.
    copy = "Step 1: 23 + 45 = 68.\nStep 2: 68 less 12.\nStep 1: 23 + 45 = 68.\nWait, no. So \\boxed{112}."
    assert longest(copy) == Assembly(None, COPY_MISMATCH)
    # A reflection with nothing before it that the copy could anchor to.
    assert longest("Step 1 again.\nWait, no. So \\boxed{112}.") == Assembly(None, COPY_MISMATCH)


def test_assemble_cut_after_error_keeps_the_erroneous_step():
    through_error = "We add: 23 + 45 = 68.\nWe subtract: 68 - 12 = 50.\nWait, 68 - 12 = 56. So \\boxed{56}."
    for cut in CUTS:  # the answer step is still left out: both readings accept
        t = assemble(through_error, cut=cut)
        assert t.parts()[0] == "We add: 23 + 45 = 68.\nWe subtract: 68 - 12 = 50."
    whole = WRONG + "\nWait, 68 - 12 = 56. So \\boxed{56}."  # the error is the last step: only "after_error" keeps it
    assert assemble(whole, cut="before_error") is None
    assert assemble(whole, cut="after_error").parts() == (WRONG, "\nWait, 68 - 12 = 56.", " So \\boxed{56}.")
    first_step = "Wait, 23 + 45 = 68 is right. So \\boxed{56}."  # nothing copied: no erroneous step kept
    assert assemble(first_step).parts()[0] == ""
    assert assemble_synthesis(WRONG, Synthesis("a", first_step), cut="after_error") == Assembly(None, COPY_MISMATCH)
    with pytest.raises(ValueError, match="cut"):
        assemble(first_step, cut="inside_error")


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
    expected = ("Use <reconstruction> as a word:", "\nWait, 2 + 2 is 4, not 5.", "\n2 + 2 = 4.\nSo \\boxed{4}.")
    assert t.parts() == expected


@settings(max_examples=150, deadline=None)
@given(wrong=st.text(max_size=60), copy=st.text(max_size=80), analysis=st.text(max_size=10))
def test_assemble_property_prefix_is_the_policys_own_text(wrong, copy, analysis):
    for mode in ("longest", "strict"):
        t = assemble_trajectory(wrong, Synthesis(analysis, copy), prefix_match=mode)
        if t is not None:
            assert tiles(t) and wrong.startswith(t.parts()[0]) and t.parts()[2].strip()


_STEPS = ["a = 1.", "b = 2.", "c = 3.", "so d = 4.", "Wait, b = 3.", "Hmm, no c.", "But e = 5."]


@settings(max_examples=300, deadline=None)
@given(
    wrong=st.lists(st.sampled_from(_STEPS[:4]), min_size=1, max_size=5).map("\n".join),
    copy=st.lists(st.sampled_from(_STEPS), max_size=7).map("\n".join),
    cut=st.sampled_from(CUTS),
)
def test_assemble_property_longest_adds_only_faithful_trajectories(wrong, copy, cut):
    synthesis = Synthesis("THE ANALYSIS", copy)
    strict = assemble_trajectory(wrong, synthesis, cut=cut)
    longest = assemble_trajectory(wrong, synthesis, prefix_match="longest", cut=cut)
    if strict is not None:
        assert longest == strict  # "longest" keeps everything "strict" keeps, unchanged
    if longest is not None:
        prefix, reflection, correction = longest.parts()
        assert tiles(longest) and wrong.startswith(prefix) and "THE ANALYSIS" not in longest.text
        assert reflection.strip() in copy and copy.strip().endswith(correction)  # the model's own words
        assert wrong[len(prefix) :].strip() if cut == "before_error" else prefix
    if longest is not None and strict is None:  # anchored: a whole step of the policy's, never an empty prefix
        assert prefix and any(wrong[s:e] == prefix[-(e - s) :] for s, e in split_steps(wrong))


# ------------------------------------------------------------------------------------------------- rule-based writer

LINES_WRONG = "12 + 25 = 37\n37 + 45 = 72\n72 - 10 = 62\nThe answer is \\boxed{62}"
LINES_RIGHT = "12 + 25 = 37\n37 + 45 = 82\n82 - 10 = 72\nThe answer is \\boxed{72}"
WAIT_SENTENCE = "Wait, 37 + 45 = 72 is wrong: 37 + 45 = 82. Let me redo this from there."


@pytest.mark.parametrize("cut, copied", [("before_error", LINES_WRONG[:12]), ("after_error", LINES_WRONG[:25])])
def test_rule_writer_names_the_error_and_copies_up_to_the_cut(cut, copied):
    text = write_rule_synthesis(LINES_WRONG, LINES_RIGHT, cut=cut)
    assert text == (
        "<analysis>\nThe first critical error is step 2: it claims 37 + 45 = 72, but 37 + 45 = 82.\n</analysis>\n"
        f"<reconstruction>\n{copied}\n{WAIT_SENTENCE}\n37 + 45 = 82\n82 - 10 = 72\nThe answer is \\boxed{{72}}\n"
        "</reconstruction>"
    )
    spliced = splice_trajectory(LINES_WRONG, LINES_RIGHT, cut=cut)
    assert copied == spliced.parts()[0] and text == format_synthesis(parse_synthesis(text).analysis, spliced.text)


def test_rule_writer_describes_a_step_that_is_not_a_false_claim():
    text = write_rule_synthesis("23 + 45 = 68\nThe answer is \\boxed{68}", "23 + 45 = 68\n68 - 12 = 56\n\\boxed{56}")
    assert parse_synthesis(text).analysis.strip() == (
        'The first critical error is step 2: "the answer is 68" is wrong; the correct step is "68 - 12 = 56".')


def test_rule_writer_refuses_what_it_cannot_write_faithfully():
    lucky = "12 + 25 = 37\n37 + 45 = 72\n72 + 0 = 72\nThe answer is \\boxed{72}"  # right answer, false step 2
    assert write_rule_synthesis(LINES_WRONG.replace("62", "61"), lucky) is None
    assert write_rule_synthesis(LINES_RIGHT, LINES_RIGHT) is None  # nothing wrong
    # The wrong attempt itself opens with "Wait": its copy cannot be told apart from the reflection, so the written
    # text would not read back as the splice (the splice itself still builds the trajectory).
    waiting = "Wait, 37 + 45 = 72\n72 - 10 = 62\nThe answer is \\boxed{62}"
    assert splice_trajectory(waiting, LINES_RIGHT) is not None and write_rule_synthesis(waiting, LINES_RIGHT) is None


@st.composite
def _chain_pair(draw):
    """(wrong, right, bad step): a chain of 3-6 terms, one `a op b = c` line per step, then the boxed answer; the
    wrong chain is off by a delta at one step and carries on correctly from its wrong value."""
    terms = draw(st.lists(st.integers(1, 99), min_size=3, max_size=6))
    ops = draw(st.lists(st.sampled_from("+-*"), min_size=len(terms) - 1, max_size=len(terms) - 1))
    bad, delta = draw(st.integers(0, len(ops) - 1)), draw(st.sampled_from([-10, -1, 1, 2, 10]))
    layout = "{}\n" + draw(st.sampled_from(["The answer is \\boxed{{{}}}", "\\boxed{{{}}}", "So it is \\boxed{{{}}}."]))

    def chain(error: int) -> str:
        value, lines = terms[0], []
        for k, (op, b) in enumerate(zip(ops, terms[1:])):
            result = {"+": value + b, "-": value - b, "*": value * b}[op] + (error if k == bad else 0)
            lines.append(f"{value} {op} {b} = {result}")
            value = result
        return layout.format("\n".join(lines), value)

    return chain(delta), chain(0), bad


@settings(max_examples=150, deadline=None)
@given(pair=_chain_pair(), cut=st.sampled_from(CUTS))
def test_rule_writer_round_trips_to_the_splice(pair, cut):
    wrong, right, bad = pair
    text = write_rule_synthesis(wrong, right, cut=cut)
    assert text is not None
    assert f"The first critical error is step {bad + 1}: it claims" in parse_synthesis(text).analysis
    assembled = assemble_trajectory(wrong, parse_synthesis(text), prefix_match="strict", cut=cut)
    spliced = splice_trajectory(wrong, right, cut=cut)
    assert assembled.text == spliced.text and assembled.prefix_span == spliced.prefix_span
