"""The deterministic splice: a trajectory built without any model, from a wrong and a correct rollout.

`split_steps` cuts a solution into steps (lines, then sentences), `find_first_error` walks the wrong rollout's steps
with an exact arithmetic checker (claims `a op b ... = c`, evaluated with fractions over an ast, never eval()) and
`splice_trajectory` joins the wrong rollout's verbatim prefix, a templated reflection and the reference's steps
(`splice_at_first_error` also returns the located error, for writers that describe it).
"""

import ast
import operator
import re
from dataclasses import dataclass
from fractions import Fraction

from tapo.core.trajectory import Trajectory, build_trajectory, check_cut
from tapo.core.verify import extract_answer

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


def split_steps(text: str) -> list[tuple[int, int]]:
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


@dataclass(frozen=True)
class StepError:
    """The first critical error of a wrong rollout, located against a correct reference."""

    step: int  # index of the bad step in split_steps(wrong)
    bad: str  # what it claims: the false claim "23 + 45 = 63", else the bad step as a clause
    fix: str  # what is right: "23 + 45 = 68", else the reference step the correction resumes at, as a clause
    is_claim: bool  # bad/fix are a false arithmetic claim and its true value (else a step and a reference step)
    resume: int  # index in split_steps(reference) of the step the correction starts at


def find_first_error(wrong: str, reference: str, target: str) -> StepError | None:
    """The wrong rollout's first bad step against `reference` and the target answer (rules in `splice_trajectory`)."""
    reference_spans, wrong_spans = split_steps(reference), split_steps(wrong)
    reference_steps = [reference[start:end] for start, end in reference_spans]
    reference_norms = [_normalise_step(step) for step in reference_steps]
    reference_claims = [{claim.key for claim in _claims(step)} for step in reference_steps]
    reference_numbers = _numbers(reference)
    wrong_steps = [wrong[start:end] for start, end in wrong_spans]
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
            resume = min(resume, len(reference_steps) - 1)
            if false_claim:
                bad = f"{false_claim.lhs} = {false_claim.stated}"
                fix = f"{false_claim.lhs} = {_format_number(false_claim.true)}"
            else:
                bad, fix = _summary(step), _summary(reference_steps[resume])
            return StepError(step=index, bad=bad, fix=fix, is_claim=bool(false_claim), resume=resume)
        keys = {claim.key for claim in claims}
        for r in range(resume, len(reference_steps)):
            if reference_norms[r] == norm or keys & reference_claims[r]:
                resume = r + 1
                break
    return None


def has_false_step(text: str) -> bool:
    """Whether any step of `text` states a false arithmetic claim (a right answer reached through cancelling errors,
    66 + 16 = 84 then 84 - 22 = 60, has one)."""
    return any(not claim.holds for start, end in split_steps(text) for claim in _claims(text[start:end]))


@dataclass(frozen=True)
class Splice:
    trajectory: Trajectory
    error: StepError  # the error the trajectory reflects on


def splice_at_first_error(
    wrong: str,
    reference: str,
    gold: str | None = None,
    reflection_template: str = DEFAULT_REFLECTION,
    cut: str = "before_error",
    check_reference: bool = True,
) -> Splice | None:
    """Deterministic trajectory: the wrong rollout cut at its first bad step, a templated reflection, the reference.

    Both texts are split into steps (lines, then sentences). Walking the wrong rollout's steps, the first bad step is
    the first that
      * states an arithmetic claim `a op b ... = c` that is false (evaluated exactly with fractions over an ast of
        numbers and + - * /; a decimal result may be rounded), or
      * states the rollout's final answer (the last step where `extract_answer` finds one) and it differs from the
        target answer, or
      * is not a step of the reference (case/whitespace-insensitive) and states a number the reference never states
        (so paraphrased set-up prose is kept, while a step resting on an unsupported number is not).
    The prefix is the wrong rollout up to the end of the step before it (`cut="before_error"`, empty if the first
    step is bad) or up to the end of the bad step itself (`cut="after_error"`, so the reflection follows the claim it
    names). The reference resumes at its step that makes the same computation as the bad claim (same left-hand side),
    else right after the last reference step a kept step matched (same text, or a shared true claim); it always
    includes at least the reference's last step. The reflection is `reflection_template.format(bad=..., fix=...)`:
    for a false claim bad = "23 + 45 = 63" and fix = "23 + 45 = 68"; otherwise bad is the bad step and fix the step
    the reference resumes at. The target answer is `gold` if given, else the reference's answer; if the reference
    states no answer, "The answer is \\boxed{gold}." is appended.

    check_reference: a reference whose right answer rests on a false step (`has_false_step`: errors that cancel out)
    is refused rather than copied into the correction, so that no trajectory teaches a wrong step as the fix. On by
    default; off reproduces the splice that trusts any reference with the right answer.

    Returns None if there is no target answer, no bad step (answers equal, or an unfinished but so far correct
    rollout: nothing to reflect on), or the reference is refused.
    """
    try:
        reflection_template.format(bad="", fix="")
        usable = "{bad}" in reflection_template and "{fix}" in reflection_template
    except (KeyError, IndexError, ValueError):
        usable = False
    if not usable:
        raise ValueError(f"reflection_template must use the fields {{bad}} and {{fix}} only: {reflection_template!r}")
    check_cut(cut)
    reference_answer = extract_answer(reference)
    target = gold if gold is not None else reference_answer
    if target is None or not reference.strip() or (check_reference and has_false_step(reference)):
        return None
    error = find_first_error(wrong, reference, target)
    if error is None:
        return None
    wrong_steps, reference_steps = split_steps(wrong), split_steps(reference)
    # Reuse each text's own whitespace between steps, so the seams read like the rollouts they came from.
    if cut == "before_error":
        prefix_end = wrong_steps[error.step - 1][1] if error.step else 0
        gap = wrong[prefix_end : wrong_steps[error.step][0]]
    else:
        prefix_end = wrong_steps[error.step][1]
        gap = wrong[prefix_end : wrong_steps[error.step + 1][0]] if error.step + 1 < len(wrong_steps) else "\n"
    reflection = gap + reflection_template.format(bad=error.bad, fix=error.fix)
    resume_start = reference_steps[error.resume][0]
    reference_gap = reference[reference_steps[error.resume - 1][1] : resume_start] if error.resume else "\n"
    correction = reference_gap + reference[resume_start:].rstrip()
    if reference_answer is None:
        correction += f"\nThe answer is \\boxed{{{target}}}."
    return Splice(build_trajectory(wrong[:prefix_end], reflection, correction, len(wrong)), error)


def splice_trajectory(wrong: str, reference: str, gold: str | None = None, **options) -> Trajectory | None:
    """The trajectory of `splice_at_first_error` (same arguments, options and rules), or None."""
    spliced = splice_at_first_error(wrong, reference, gold, **options)
    return spliced.trajectory if spliced else None
