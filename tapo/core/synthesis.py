"""A model writes the trajectory: the synthesis prompt, its parser, and assembly onto the wrong rollout.

The trajectory (`tapo.core.trajectory`) is `prefix + reflection + correction`, its prefix sliced from the wrong rollout.

Synthesis contract (what `SYNTHESIS_PROMPT` asks for, `format_synthesis` writes and `parse_synthesis` /
`assemble_synthesis` accept):

    <analysis> diagnosis of the first critical error in the wrong attempt </analysis>
    <reconstruction> the wrong attempt copied verbatim up to that error (cut="before_error": not including the
                     erroneous step; cut="after_error": including it),
                     then one reflection sentence ("Wait, ..."),
                     then the corrected reasoning ending in \\boxed{answer} </reconstruction>

Parsing (`parse_synthesis`), linear time in the output length:
  * tags are matched case-insensitively, with optional whitespace inside the brackets (`< / Analysis >`);
    text outside the tags is ignored;
  * the block used is the LAST `<analysis>` that is followed by a `</analysis>` and then a `<reconstruction>` (so a
    model that first echoes the format, or writes a draft and then a final block, is read at its final block); the
    analysis ends at the first `</analysis>` after it; the reconstruction runs from the first `<reconstruction>` after
    that to the LAST `</reconstruction>` in the text, so tags that occur inside the copied wrong attempt stay part of
    the reconstruction;
  * a missing `</reconstruction>` (generation cut at the very end) is accepted only when the reconstruction already
    states a final answer (`verify.extract_answer` finds one): then only the closing tag was lost, not reasoning. A
    partial closing tag at the end (`</recons`) is dropped;
  * no such block, or an empty analysis or reconstruction -> None.

Assembly (`assemble_synthesis`, which says why it rejects; `assemble_trajectory` returns only the trajectory). The
analysis is never part of the trajectory: it is third-person diagnosis, not the policy's reasoning. Whitespace at
either end of the reconstruction is tag layout and is dropped. The copy is matched against the wrong rollout char by
char with all whitespace ignored on both sides (a match never ends inside a word). Where the match ends:
  * the rest opens with a reflection phrase (`MARKERS`, or a contrastive "But"/"However"/"No", optionally after
    punctuation): the copy ended on purpose. prefix = wrong up to the last matched character.
  * otherwise the copy deviated from the wrong rollout (a paraphrase, or the model simply wrote a solution). If no
    later step of the reconstruction opens with a `MARKERS` phrase -> rejected `no_reflection`. Else
    `prefix_match="strict"` (default) rejects it as `copy_mismatch`. `prefix_match="longest"` anchors the model's own
    reflection in the policy's text: the reconstruction's last step before that reflection step must equal (whitespace
    ignored) a whole step of the wrong rollout at or after the step where the copy deviated; prefix = wrong up to the
    end of that step, so the reflection sits exactly after the step the model put it after and the deviating copy is
    replaced by the policy's own words. No such step -> `copy_mismatch`. So "longest" never places a diagnosis before
    a step it did not follow, never inserts the analysis, and never falls back to an empty prefix: it keeps everything
    "strict" keeps, plus copies that are loose before the point of reflection.
  Then reflection = from the end of the prefix's copy to the end of the reflection's first sentence (".", "!" or "?"
  before whitespace, or a newline), correction = the rest; no sentence end or nothing after it -> `no_correction`.
  The prefix must fit the cut -> else `copy_mismatch`: with "before_error" it must leave some of the wrong rollout out
  (the error lies in the part not kept); with "after_error" it must be non-empty (it holds the erroneous step). A
  prefix shorter than `min_prefix_chars` -> `copy_mismatch`.

`tapo.core.splice` builds a trajectory without any model, from a wrong and a correct rollout.
"""

import re
from dataclasses import dataclass

from tapo.core.splice import splice_at_first_error, split_steps
from tapo.core.trajectory import Trajectory, build_trajectory, check_cut
from tapo.core.verify import extract_answer

SYNTHESIS_PROMPT = """You are given a math problem, an incorrect attempt at it and a correct attempt.

Problem:
{problem}

Incorrect attempt:
{wrong}

Correct attempt:
{reference}

Compare the two attempts and find the FIRST critical error in the incorrect attempt: the earliest step that is wrong \
and leads to the wrong final answer. Reply in exactly this format:

<analysis>
One or two sentences: which step is the first critical error and why it is wrong.
</analysis>
<reconstruction>
The incorrect attempt copied exactly, character for character, up to {copy_until} the first critical error. \
Then one short sentence that notices the error, starting with "Wait,". Then the correct reasoning from that point on, \
ending with the final answer as \\boxed{{answer}}.
</reconstruction>"""

# Reflection phrases, lower-case. The eval module reuses them to detect reflection in rollouts, so every entry must be
# specific to self-correction ("but" alone is not: it is only accepted right after a copied prefix, see _OPENERS).
MARKERS = (
    "wait",
    "hmm",
    "actually",
    "let me re-check",
    "let me recheck",
    "let me double-check",
    "let me double check",
    "let me verify",
    "i made a mistake",
    "i made an error",
    "that's wrong",
    "that is wrong",
    "that's not right",
    "this is wrong",
    "re-examine",
    "on second thought",
    "oops",
)

# Right after the copied prefix a contrastive opener is evidence enough that the copy ended on purpose.
_OPENERS = MARKERS + ("but", "however", "no")


def _phrase_at_start(phrases: tuple[str, ...]) -> re.Pattern:
    """Matches one of `phrases` as whole words at the start, after optional whitespace and up to 3 punctuation marks."""
    alternatives = (re.escape(m).replace("'", "['’]") for m in sorted(phrases, key=len, reverse=True))
    return re.compile(r"\s*[^\w\s]{0,3}\s*(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE)


_OPENER_AT_START = _phrase_at_start(_OPENERS)
_MARKER_AT_START = _phrase_at_start(MARKERS)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")

_TAG = re.compile(r"<\s*(/?)\s*(analysis|reconstruction)\s*>", re.IGNORECASE)
_CLOSE_RECONSTRUCTION = "</reconstruction>"
_COPY_UNTIL = {"before_error": "but not including", "after_error": "and including"}

# Why a synthesis gave no trajectory; the trainer logs them as tapo/rejected_<reason>. Assembly decides the first
# four; the trainer decides wrong_answer (the trajectory does not re-verify) and too_long (over the length budget).
UNPARSED, COPY_MISMATCH, NO_REFLECTION, NO_CORRECTION = "unparsed", "copy_mismatch", "no_reflection", "no_correction"
WRONG_ANSWER, TOO_LONG = "wrong_answer", "too_long"
REJECTIONS = (UNPARSED, COPY_MISMATCH, NO_REFLECTION, NO_CORRECTION, WRONG_ANSWER, TOO_LONG)
PREFIX_MATCHES = ("strict", "longest")


def is_blank(rollout) -> bool:
    """A rollout with nothing to repair or copy (only whitespace: the completion was just its terminator)."""
    return not isinstance(rollout, str) or not rollout.strip()


def build_synthesis_prompt(problem: str, wrong: str, reference: str, cut: str = "before_error") -> str:
    """The synthesis request for one (wrong, reference) pair; braces in the inputs are safe (str.format values).

    Raises on a blank input (`is_blank`): callers leave blank rollouts out of pairing."""
    for name, value in (("problem", problem), ("wrong", wrong), ("reference", reference)):
        if is_blank(value):
            raise ValueError(f"build_synthesis_prompt: {name} must be a non-empty string, got {value!r:.80}")
    check_cut(cut)
    return SYNTHESIS_PROMPT.format(
        problem=problem.strip(), wrong=wrong.strip(), reference=reference.strip(), copy_until=_COPY_UNTIL[cut]
    )


@dataclass(frozen=True)
class Synthesis:
    analysis: str  # raw text between <analysis> and </analysis>
    reconstruction: str  # raw text between <reconstruction> and </reconstruction> (or the end, if truncated)


def parse_synthesis(text: str) -> Synthesis | None:
    """The final <analysis>/<reconstruction> block of a synthesis output, or None (rules in the module docstring)."""
    tags = [(m, m.group(2).lower(), m.group(1) == "/") for m in _TAG.finditer(text)]
    # Walk backwards to the last <analysis> that has a </analysis> and then a <reconstruction> after it.
    seen_open_reconstruction = seen_usable_close = False
    start = None
    for index in range(len(tags) - 1, -1, -1):
        _, kind, closing = tags[index]
        if kind == "reconstruction" and not closing:
            seen_open_reconstruction = True
        elif kind == "analysis" and closing and seen_open_reconstruction:
            seen_usable_close = True
        elif kind == "analysis" and not closing and seen_usable_close:
            start = index
            break
    if start is None:
        return None
    close_analysis = next(i for i in range(start + 1, len(tags)) if tags[i][1:] == ("analysis", True))
    open_reconstruction = next(
        i for i in range(close_analysis + 1, len(tags)) if tags[i][1:] == ("reconstruction", False)
    )
    close_reconstruction = next(
        (i for i in range(len(tags) - 1, open_reconstruction, -1) if tags[i][1:] == ("reconstruction", True)), None
    )
    analysis = text[tags[start][0].end() : tags[close_analysis][0].start()]
    body_start = tags[open_reconstruction][0].end()
    if close_reconstruction is not None:
        reconstruction = text[body_start : tags[close_reconstruction][0].start()]
    else:
        reconstruction = text[body_start:]
        tail = reconstruction[reconstruction.rfind("<") :] if "<" in reconstruction else ""
        if tail and _CLOSE_RECONSTRUCTION.startswith(re.sub(r"\s", "", tail.lower())):
            reconstruction = reconstruction[: -len(tail)]
        if extract_answer(reconstruction) is None:
            return None
    if not analysis.strip() or not reconstruction.strip():
        return None
    return Synthesis(analysis=analysis, reconstruction=reconstruction)


def _match_ignoring_space(wrong: str, copy: str, limit: int | None = None) -> tuple[int, int, int]:
    """(i, j, n): wrong[:i] and copy[:j] hold the same n non-whitespace chars; i and j end just after the last one.

    Matching stops at the first differing character, at the end of either text, or after `limit` characters.
    """
    i = j = a = b = matched = 0
    while matched != limit:
        while a < len(wrong) and wrong[a].isspace():
            a += 1
        while b < len(copy) and copy[b].isspace():
            b += 1
        if a == len(wrong) or b == len(copy) or wrong[a] != copy[b]:
            break
        a, b, matched = a + 1, b + 1, matched + 1
        i, j = a, b
    return i, j, matched


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _verbatim_copy_end(wrong: str, copy: str) -> tuple[int, int]:
    """(i, j): wrong[:i] and copy[:j] hold the same non-whitespace chars, as far as they agree; never mid-word."""
    i, j, matched = _match_ignoring_space(wrong, copy)
    # A match that stops inside a word on either side ("W|ait" against "W|e", "No|, wait" against "No|te") backs off to
    # the start of that word: a prefix never ends inside a word, and a reflection never starts inside one.
    inside_word = (j < len(copy) and _is_word_char(copy[j])) or (i < len(wrong) and _is_word_char(wrong[i]))
    partial_word = 0
    while inside_word and partial_word < j and _is_word_char(copy[j - partial_word - 1]):
        partial_word += 1
    if partial_word:
        i, j, _ = _match_ignoring_space(wrong, copy, limit=matched - partial_word)
    return i, j


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _whole_step_end(wrong: str, step: str, after: int) -> int | None:
    """End of the first step of `wrong` that ends after char `after` and equals `step` with whitespace ignored."""
    target = _squeeze(step)
    ends = (end for start, end in split_steps(wrong) if end > after and _squeeze(wrong[start:end]) == target)
    return next(ends, None)


@dataclass(frozen=True)
class Assembly:
    """The outcome of assembling one synthesis: a trajectory, or why there is none."""

    trajectory: Trajectory | None
    rejection: str | None = None  # one of REJECTIONS, set exactly when trajectory is None


def assemble_synthesis(
    wrong: str,
    synthesis: Synthesis,
    min_prefix_chars: int = 0,
    prefix_match: str = "strict",
    cut: str = "before_error",
) -> Assembly:
    """Trajectory from a wrong rollout and a synthesis of it, or why not (rules in the module docstring)."""
    if prefix_match not in PREFIX_MATCHES:
        raise ValueError(f"prefix_match must be one of {PREFIX_MATCHES}, got {prefix_match!r}")
    check_cut(cut)
    copy = synthesis.reconstruction.strip()
    prefix_end, reflection_start = _verbatim_copy_end(wrong, copy)
    if not _OPENER_AT_START.match(copy, reflection_start):
        steps = split_steps(copy)
        later = (k for k, (start, _) in enumerate(steps) if start >= reflection_start)
        reflection_step = next((k for k in later if _MARKER_AT_START.match(copy, steps[k][0])), None)
        if reflection_step is None:
            return Assembly(None, NO_REFLECTION)
        if prefix_match == "strict" or reflection_step == 0:
            return Assembly(None, COPY_MISMATCH)
        # "longest": the copy's step before the reflection, found whole in the wrong rollout past the deviation.
        anchor_start, anchor_end = steps[reflection_step - 1]
        step_end = _whole_step_end(wrong, copy[anchor_start:anchor_end], after=prefix_end)
        if step_end is None:
            return Assembly(None, COPY_MISMATCH)
        prefix_end, reflection_start = step_end, anchor_end
    opener = _OPENER_AT_START.match(copy, reflection_start)
    end = _SENTENCE_END.search(copy, opener.end())
    if end is None or not copy[end.end() :].strip():
        return Assembly(None, NO_CORRECTION)
    prefix = wrong[:prefix_end]
    # before_error: the error lies in the part not kept; after_error: the kept part holds the erroneous step.
    fits_cut = bool(wrong[prefix_end:].strip()) if cut == "before_error" else bool(prefix.strip())
    if not fits_cut or len(prefix) < min_prefix_chars:
        return Assembly(None, COPY_MISMATCH)
    reflection, correction = copy[reflection_start : end.end()], copy[end.end() :]
    return Assembly(build_trajectory(prefix, reflection, correction, len(wrong)))


def assemble_output(wrong: str, output: str, **options) -> Assembly:
    """Parse a synthesis writer's raw output and assemble it (`assemble_synthesis` options); unparsed -> UNPARSED."""
    synthesis = parse_synthesis(output)
    return Assembly(None, UNPARSED) if synthesis is None else assemble_synthesis(wrong, synthesis, **options)


def assemble_trajectory(wrong: str, synthesis: Synthesis, **options) -> Trajectory | None:
    """The trajectory of `assemble_synthesis` (same options), or None when it rejects."""
    return assemble_synthesis(wrong, synthesis, **options).trajectory


def format_synthesis(analysis: str, reconstruction: str) -> str:
    """A synthesis in the layout `SYNTHESIS_PROMPT` asks for: the target text a policy learns to write."""
    return f"<analysis>\n{analysis.strip()}\n</analysis>\n<reconstruction>\n{reconstruction}\n</reconstruction>"


def write_rule_synthesis(wrong: str, reference: str, gold: str | None = None, cut: str = "before_error") -> str | None:
    """A real synthesis written by rule, no model, for step-checkable solutions (cold-start data for small models).

    The splice's checker (`tapo.core.splice.splice_at_first_error`, which also refuses a reference with a false step)
    locates the first critical error; the analysis names it ("The first critical error is step 2: it claims
    37 + 45 = 72, but 37 + 45 = 82."; steps as `split_steps` counts them, from 1) and the reconstruction is the
    spliced trajectory: the wrong attempt verbatim up to the cut, the "Wait, ..." reflection, the reference's
    reasoning to its boxed answer. None when the splice gives nothing, or when parsing and strict assembly of the
    written text would not give back the spliced trajectory (text and prefix), so every synthesis it writes is one the
    trainer reads back exactly.
    """
    spliced = splice_at_first_error(wrong, reference, gold, cut=cut)
    if spliced is None:
        return None
    error, trajectory = spliced.error, spliced.trajectory
    where = f"The first critical error is step {error.step + 1}"
    if error.is_claim:
        analysis = f"{where}: it claims {error.bad}, but {error.fix}."
    else:
        analysis = f'{where}: "{error.bad}" is wrong; the correct step is "{error.fix}".'
    text = format_synthesis(analysis, trajectory.text)
    read_back = assemble_output(wrong, text, cut=cut).trajectory
    if read_back is None or (read_back.text, read_back.prefix_span) != (trajectory.text, trajectory.prefix_span):
        return None
    return text
