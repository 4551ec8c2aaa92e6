"""A model writes the trajectory: the synthesis prompt, its parser, and assembly onto the wrong rollout.

The trajectory (`tapo.core.trajectory`) is `prefix + reflection + correction`, its prefix sliced from the wrong rollout.

Synthesis contract (what `SYNTHESIS_PROMPT` asks for and `parse_synthesis` / `assemble_trajectory` accept):

    <analysis> diagnosis of the first critical error in the wrong attempt </analysis>
    <reconstruction> the wrong attempt copied verbatim up to, not including, that error,
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

Assembly (`assemble_trajectory`): the copy inside the reconstruction is matched against the wrong rollout character by
character with all whitespace ignored on both sides. Where the match ends:
  * if the rest of the reconstruction opens with a reflection marker (`MARKERS`, or a contrastive "But"/"However"/"No",
    optionally after punctuation), the copy ended on purpose: prefix = wrong up to the last matched character,
    reflection = the rest up to the end of its first sentence (".", "!" or "?" before whitespace, or a newline),
    correction = everything after that;
  * otherwise the copy deviated from the wrong rollout (paraphrase, or the model simply wrote the correct solution).
    `prefix_match="strict"` rejects it. `prefix_match="longest"` cuts the matched prefix back to the end of the last
    whole step (line or sentence, as `splice_trajectory` splits them), inserts the analysis as the reflection, and
    keeps the rest of the reconstruction from the cut on, deviating copy included, as the correction: it is the
    model's own continuation from that point, so the trajectory still reads in order.
  Rejected (None): empty reflection or correction; a prefix that covers the whole wrong rollout (the error must lie in
  the part not kept); a prefix shorter than `min_prefix_chars` (with min_prefix_chars > 0 this rejects a copy that
  matches nothing the policy actually wrote).

`tapo.core.splice` builds a trajectory without any model, from a wrong and a correct rollout.
"""

import re
from dataclasses import dataclass

from tapo.core.splice import split_steps
from tapo.core.trajectory import Trajectory, build_trajectory
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
The incorrect attempt copied exactly, character for character, up to but not including the first critical error. \
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
_OPENER_AT_START = re.compile(
    r"\s*[^\w\s]{0,3}\s*(?:"
    + "|".join(re.escape(m).replace("'", "['’]") for m in sorted(_OPENERS, key=len, reverse=True))
    + r")\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")

_TAG = re.compile(r"<\s*(/?)\s*(analysis|reconstruction)\s*>", re.IGNORECASE)
_CLOSE_RECONSTRUCTION = "</reconstruction>"


def build_synthesis_prompt(problem: str, wrong: str, reference: str) -> str:
    """The synthesis request for one (wrong, reference) pair; braces in the inputs are safe (str.format values)."""
    for name, value in (("problem", problem), ("wrong", wrong), ("reference", reference)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"build_synthesis_prompt: {name} must be a non-empty string, got {value!r:.80}")
    return SYNTHESIS_PROMPT.format(problem=problem.strip(), wrong=wrong.strip(), reference=reference.strip())


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


def assemble_trajectory(
    wrong: str, synthesis: Synthesis, min_prefix_chars: int = 0, prefix_match: str = "longest"
) -> Trajectory | None:
    """Trajectory from a wrong rollout and the policy's synthesis of it, or None (rules in the module docstring)."""
    if prefix_match not in ("longest", "strict"):
        raise ValueError(f"prefix_match must be 'longest' or 'strict', got {prefix_match!r}")
    copy = synthesis.reconstruction
    i, j, matched = _match_ignoring_space(wrong, copy)
    # A match that stops inside a word on either side ("W|ait" against "W|e", "No|, wait" against "No|te") backs off to
    # the start of that word: a prefix never ends inside a word, and a reflection never starts inside one.
    inside_word = (j < len(copy) and _is_word_char(copy[j])) or (i < len(wrong) and _is_word_char(wrong[i]))
    partial_word = 0
    while inside_word and partial_word < j and _is_word_char(copy[j - partial_word - 1]):
        partial_word += 1
    if partial_word:
        i, j, matched = _match_ignoring_space(wrong, copy, limit=matched - partial_word)
    rest = copy[j:]
    opener = _OPENER_AT_START.match(rest)
    if opener:
        end = _SENTENCE_END.search(rest, opener.end())
        if end is None:
            return None  # the reflection runs to the end: there is no correction
        reflection, correction = rest[: end.end()], rest[end.end() :]
    elif prefix_match == "strict":
        return None
    else:
        cut = max((end for _, end in split_steps(wrong) if end <= i), default=0)
        i, j, _ = _match_ignoring_space(wrong, copy, limit=sum(not char.isspace() for char in wrong[:cut]))
        reflection = ("\n" if i else "") + synthesis.analysis.strip()
        correction = "\n" + copy[j:].lstrip()
    prefix = wrong[:i]
    if not reflection.strip() or not correction.strip() or not wrong[i:].strip() or len(prefix) < min_prefix_chars:
        return None
    return build_trajectory(prefix, reflection, correction, len(wrong))
