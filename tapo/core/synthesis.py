"""Micro-reflective trajectories: the synthesis prompt, its parser, trajectory assembly, and a deterministic splice.

A trajectory is `prefix + reflection + correction`:
  prefix      a verbatim prefix of the policy's wrong rollout, ending before its first critical error. It is always
              sliced from the wrong rollout itself, never taken from a model's copy, so its tokens are the policy's own.
  reflection  one short natural-language diagnosis at the point of the error ("Wait, 23 + 45 = 63 is wrong: ...").
  correction  corrected reasoning from there to the right final answer.

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

Splice (`splice_trajectory`) builds a trajectory without any model, from a wrong and a correct rollout; see there.
"""

import ast
import operator
import re
from dataclasses import dataclass
from fractions import Fraction

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


@dataclass(frozen=True)
class Trajectory:
    """text == prefix + reflection + correction; the spans are (start, end) char offsets into text that tile it."""

    text: str
    prefix_span: tuple[int, int]
    reflection_span: tuple[int, int]
    correction_span: tuple[int, int]
    prefix_fraction: float  # kept prefix chars / len(wrong rollout)

    def __post_init__(self):
        bounds = (*self.prefix_span, *self.reflection_span, *self.correction_span)
        tiled = bounds[0] == 0 and bounds[1] == bounds[2] and bounds[3] == bounds[4] and bounds[5] == len(self.text)
        if not tiled or list(bounds) != sorted(bounds):
            raise ValueError(f"Trajectory spans {bounds} do not tile a text of {len(self.text)} chars")

    def parts(self) -> tuple[str, str, str]:
        """(prefix, reflection, correction) as strings."""
        spans = (self.prefix_span, self.reflection_span, self.correction_span)
        return tuple(self.text[start:end] for start, end in spans)


def _trajectory(prefix: str, reflection: str, correction: str, wrong_length: int) -> Trajectory:
    a, b = len(prefix), len(prefix) + len(reflection)
    return Trajectory(
        text=prefix + reflection + correction,
        prefix_span=(0, a),
        reflection_span=(a, b),
        correction_span=(b, b + len(correction)),
        prefix_fraction=len(prefix) / wrong_length if wrong_length else 0.0,
    )


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
        cut = max((end for _, end in _steps(wrong) if end <= i), default=0)
        i, j, _ = _match_ignoring_space(wrong, copy, limit=sum(not char.isspace() for char in wrong[:cut]))
        reflection = ("\n" if i else "") + synthesis.analysis.strip()
        correction = "\n" + copy[j:].lstrip()
    prefix = wrong[:i]
    if not reflection.strip() or not correction.strip() or not wrong[i:].strip() or len(prefix) < min_prefix_chars:
        return None
    return _trajectory(prefix, reflection, correction, len(wrong))


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic splice

DEFAULT_REFLECTION = "Wait, {bad} is wrong: {fix}. Let me redo this from there."

# "1." / "a)" / "Step 2:" on their own are enumerators, not sentences: never split after them, never read them as data.
_ENUMERATOR = re.compile(r"\s*(?:step\s*)?(?:\d+|[a-z])[.:)]", re.IGNORECASE)
_SENTENCE_GAP = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_OPERATOR_SPELLINGS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "·": "*", "÷": "/", "−": "-"}
# A claim "lhs = rhs": rhs is one number or a plain fraction, not followed by more of a term (5x, 2^3, 1.5.2).
_CLAIM_RHS = re.compile(r"=\s*(-?\d+(?:\.\d+)?(?:/\d+)?)(?![\w^/]|\.\d)")
_ARITHMETIC_CHARS = set("0123456789()+-*/ \t")
_BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _steps(text: str) -> list[tuple[int, int]]:
    """(start, end) spans of the steps of a solution: its lines, split further at sentence ends; stripped, non-empty."""
    steps = []

    def add(start: int, end: int):
        piece = text[start:end]
        if piece.strip():
            steps.append((start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())))

    for line in re.finditer(r"[^\n]+", text):
        start = line.start()
        for gap in _SENTENCE_GAP.finditer(line.group()):
            if not _ENUMERATOR.fullmatch(text[start : line.start() + gap.start()]):
                add(start, line.start() + gap.start())
                start = line.start() + gap.end()
        add(start, line.end())
    return steps


def _evaluate(expression: str) -> Fraction | None:
    """Exact value of an expression of numbers, parentheses and + - * /; None if it is anything else (no eval())."""
    if len(expression) > 200:  # bounded: ast recursion depth and cost
        return None
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None

    def value(node) -> Fraction:
        match node:
            case ast.Constant(value=int() | float() as number) if not isinstance(number, bool):
                return Fraction(str(number))
            case ast.UnaryOp(op=ast.USub(), operand=operand):
                return -value(operand)
            case ast.UnaryOp(op=ast.UAdd(), operand=operand):
                return value(operand)
            case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY_OPERATORS:
                return _BINARY_OPERATORS[type(op)](value(left), value(right))
        raise ValueError(node)

    if not any(isinstance(node, ast.BinOp) for node in ast.walk(tree)):
        return None  # "5 = 5" states no computation
    try:
        return value(tree)
    except (ValueError, ZeroDivisionError):
        return None


@dataclass(frozen=True)
class _Claim:
    lhs: str  # "23 + 45"
    stated: str  # "63"
    true: Fraction

    @property
    def key(self) -> tuple[str, Fraction]:
        """What the claim computes, comparable across texts: (lhs without spaces, its true value)."""
        return self.lhs.replace(" ", ""), self.true

    @property
    def holds(self) -> bool:
        stated = Fraction(self.stated)
        decimals = len(self.stated.partition(".")[2].split("/")[0])
        # A decimal result may be rounded ("10 / 3 = 3.33"); an integer or fraction result must be exact.
        return abs(self.true - stated) <= Fraction(1, 2 * 10**decimals) if decimals else self.true == stated


def _normalise_operators(text: str) -> str:
    for spelling, symbol in _OPERATOR_SPELLINGS.items():
        text = text.replace(spelling, symbol)
    return _THOUSANDS_COMMA.sub("", text)


def _claims(step: str) -> list[_Claim]:
    """The checkable arithmetic claims `a op b ... = c` in a step, in order."""
    step = _normalise_operators(step)
    claims = []
    for rhs in _CLAIM_RHS.finditer(step):
        start = rhs.start()  # walk left over the arithmetic run; a "." counts only as a decimal point
        while start > 0 and (
            step[start - 1] in _ARITHMETIC_CHARS
            or (step[start - 1] == "." and step[start - 2 : start - 1].isdigit() and step[start : start + 1].isdigit())
        ):
            start -= 1
        run = step[start : rhs.start()]
        lhs = run.strip()
        while lhs.startswith("(") and lhs.count("(") > lhs.count(")"):
            lhs = lhs[1:].lstrip()
        before = step[start - 1] if start else " "
        attached = before.isalnum() or before in "_^}\\'"
        # "x + 2 + 3 = 5", "x - 3 = 2", "f(2) + 3 = 5": the run continues a term that is not a number, skip it.
        if not lhs or lhs[0] in "+*/)" or (attached and (not run[0].isspace() or lhs[0] == "-")):
            continue
        true = _evaluate(lhs)
        if true is not None:
            claims.append(_Claim(lhs=lhs, stated=rhs.group(1), true=true))
    return claims


def _numbers(step: str) -> set[Fraction]:
    enumerator = _ENUMERATOR.match(step)
    if enumerator and step[enumerator.end() : enumerator.end() + 1].isspace():
        step = step[enumerator.end() :]
    return {Fraction(n) for n in _NUMBER.findall(_THOUSANDS_COMMA.sub("", step))}


def _normalise_step(step: str) -> str:
    return " ".join(_BOXED.sub(r"\1", step).lower().split()).rstrip(".,;: ")


def _summary(step: str) -> str:
    """A step as a clause for the reflection sentence: unboxed, one line, no final punctuation, lower-case start."""
    text = " ".join(_BOXED.sub(r"\1", step).split()).rstrip(".,;: ")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    decimal = f"{float(value):.6f}".rstrip("0")
    return decimal if Fraction(decimal) == value else f"{value.numerator}/{value.denominator}"


def _same_answer(a: str, b: str) -> bool:
    a, b = (re.sub(r"[\s$]", "", x).rstrip(".") for x in (a, b))
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a == b


def _first_bad_step(wrong: str, reference: str, target: str) -> tuple[int, _Claim | None, int] | None:
    """(index of the wrong rollout's first bad step, its false claim or None, reference step to resume at), or None."""
    reference_steps = [reference[start:end] for start, end in _steps(reference)]
    reference_norms = [_normalise_step(step) for step in reference_steps]
    reference_claims = [{claim.key for claim in _claims(step)} for step in reference_steps]
    reference_numbers = _numbers(reference)
    wrong_steps = [wrong[start:end] for start, end in _steps(wrong)]
    # Only the last step stating an answer gives the final one ("The answer is the sum of ..." early on does not).
    answers = [extract_answer(step) for step in wrong_steps]
    final = max((index for index, answer in enumerate(answers) if answer is not None), default=None)
    resume = 0  # the reference step after the last one a kept wrong step matched
    for index, step in enumerate(wrong_steps):
        norm, claims = _normalise_step(step), _claims(step)
        false_claim = next((claim for claim in claims if not claim.holds), None)
        wrong_answer = index == final and not _same_answer(answers[index], target)
        unsupported = norm not in reference_norms and bool(_numbers(step) - reference_numbers)
        if false_claim or wrong_answer or unsupported:
            if false_claim:  # resume where the reference makes the same computation, if it does
                for r in range(resume, len(reference_steps)):
                    if any(lhs == false_claim.key[0] for lhs, _ in reference_claims[r]):
                        resume = r
                        break
            return index, false_claim, min(resume, len(reference_steps) - 1)
        keys = {claim.key for claim in claims}
        for r in range(resume, len(reference_steps)):
            if reference_norms[r] == norm or keys & reference_claims[r]:
                resume = r + 1
                break
    return None


def splice_trajectory(
    wrong: str, reference: str, gold: str | None = None, reflection_template: str = DEFAULT_REFLECTION
) -> Trajectory | None:
    """Deterministic trajectory: the wrong rollout up to its first bad step, a templated reflection, the reference.

    Both texts are split into steps (lines, then sentences). Walking the wrong rollout's steps, the first bad step is
    the first that
      * states an arithmetic claim `a op b ... = c` that is false (evaluated exactly with fractions over an ast of
        numbers and + - * /; a decimal result may be rounded), or
      * states the rollout's final answer (the last step where `extract_answer` finds one) and it differs from the
        target answer, or
      * is not a step of the reference (case/whitespace-insensitive) and states a number the reference never states
        (so paraphrased set-up prose is kept, while a step resting on an unsupported number is not).
    The prefix is the wrong rollout up to the end of the step before it (empty if the first step is bad). The
    reference resumes at its step that makes the same computation as the bad claim (same left-hand side), else right
    after the last reference step a kept step matched (same text, or a shared true claim); it always includes at
    least the reference's last step. The reflection is `reflection_template.format(bad=..., fix=...)`: for a false
    claim bad = "23 + 45 = 63" and fix = "23 + 45 = 68"; otherwise bad is the bad step and fix the step the reference
    resumes at. The target answer is `gold` if given, else the reference's answer; if the reference states no answer,
    "The answer is \\boxed{gold}." is appended. Returns None if there is no target answer, or no bad step (answers
    equal, or an unfinished but so far correct rollout: nothing to reflect on).
    """
    try:
        reflection_template.format(bad="", fix="")
        usable = "{bad}" in reflection_template and "{fix}" in reflection_template
    except (KeyError, IndexError, ValueError):
        usable = False
    if not usable:
        raise ValueError(f"reflection_template must use the fields {{bad}} and {{fix}} only: {reflection_template!r}")
    reference_answer = extract_answer(reference)
    target = gold if gold is not None else reference_answer
    if target is None or not reference.strip():
        return None
    found = _first_bad_step(wrong, reference, target)
    if found is None:
        return None
    index, false_claim, resume = found
    wrong_steps, reference_steps = _steps(wrong), _steps(reference)
    if false_claim:
        bad = f"{false_claim.lhs} = {false_claim.stated}"
        fix = f"{false_claim.lhs} = {_format_number(false_claim.true)}"
    else:
        bad = _summary(wrong[slice(*wrong_steps[index])])
        fix = _summary(reference[slice(*reference_steps[resume])])
    # Reuse each text's own whitespace between steps, so the seams read like the rollouts they came from.
    prefix_end = wrong_steps[index - 1][1] if index else 0
    reflection = wrong[prefix_end : wrong_steps[index][0]] + reflection_template.format(bad=bad, fix=fix)
    resume_start = reference_steps[resume][0]
    reference_gap = reference[reference_steps[resume - 1][1] : resume_start] if resume else "\n"
    correction = reference_gap + reference[resume_start:].rstrip()
    if reference_answer is None:
        correction += f"\nThe answer is \\boxed{{{target}}}."
    return _trajectory(wrong[:prefix_end], reflection, correction, len(wrong))
