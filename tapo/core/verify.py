"""Math answer checking: `extract_answer`, `is_correct`, and the TRL reward function `math_reward`.

The reward is binary: r = 1 if the completion's final answer is mathematically equal to the gold answer (as judged by
math-verify: sympy equality, numeric equality to 6 decimals, sets, intervals, ...), else 0.

Safety design. sympy can hang or eat memory on a hostile answer (20 nested `\\frac` already take minutes), so the
math-verify call runs in the killable worker processes of `tapo.verifier_pool` (the processes, their lifetime and
the time bound live there; this file stays functions). Most rewards never reach a worker: an extracted answer that
equals the gold string after light normalisation is accepted in-process. Memory guard: only the last
`MAX_COMPLETION_CHARS` characters of a completion are read (a final answer lives at the end).
"""

import re
from concurrent.futures import ThreadPoolExecutor

from tapo.verifier_pool import N_WORKERS, check_in_worker, shutdown

__all__ = ["extract_answer", "is_correct", "math_reward", "shutdown"]  # shutdown: the pool's, kept importable here

MAX_COMPLETION_CHARS = 100_000  # longer completions are cut to their last part before extraction
FULL_TEXT_FALLBACK_CHARS = 1_000  # without a boxed/"answer is" answer, only this short a text goes to math-verify whole
MAX_ANSWER_CHARS = 10_000  # a longer box argument or "answer is" line is not an answer (and would stall sympy)

# `.*` is greedy, so each pattern finds the LAST occurrence by backtracking from the end once; the possessive `*+`
# never gives back what it took, so the whole search is linear time.
_LAST_BOX_COMMAND = re.compile(r".*\\(?:boxed|fbox)(?![A-Za-z])", re.DOTALL)
_LAST_ANSWER_PHRASE = re.compile(r".*answer[\s*]*+(?::|is\b)[\s*:$]*+(?=[^\s*:$])", re.DOTALL | re.IGNORECASE)
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)  # `\{` and `\}` are literal braces, not grouping
_SPACES = re.compile(r"\s*")
_TOKEN = re.compile(r"[^\s$]*")


def _box_argument(text: str, start: int) -> str | None:
    """The argument of a box command ending at `start`: a balanced `{...}` group, or the next token (`\\boxed 5`).
    None when the group is unbalanced within MAX_ANSWER_CHARS (e.g. a completion truncated inside its answer)."""
    start = _SPACES.match(text, start).end()
    if text[start : start + 1] != "{":
        token = _TOKEN.match(text, start).group()
        return token if 0 < len(token) <= MAX_ANSWER_CHARS else None
    depth = 0
    for brace in _BRACE_OR_ESCAPE.finditer(text, start, start + MAX_ANSWER_CHARS + 2):  # `{`, content, `}`
        depth += {"{": 1, "}": -1}.get(brace.group(), 0)
        if depth == 0:
            return text[start + 1 : brace.start()].strip()
    return None


def _last_box(text: str) -> str | None:
    box = _LAST_BOX_COMMAND.match(text)
    return _box_argument(text, box.end()) if box else None


def _answer_phrase(text: str) -> str | None:
    """X in the last "answer is X" / "Answer: X" / "**Final Answer:** $X$." (to the end of that line or sentence)."""
    match = _LAST_ANSWER_PHRASE.match(text)
    if match is None:
        return None
    line_end = text.find("\n", match.end())
    value = text[match.end() : line_end if line_end >= 0 else len(text)]
    value = value.partition(". ")[0]  # "The answer is 5. Indeed, ..." -> "5"
    value = value.lstrip(" \t*$").rstrip(" \t*$.")  # markdown bold, inline math, final period
    value = value.removeprefix("\\(").removeprefix("\\[").removesuffix("\\)").removesuffix("\\]").strip()
    return value if 0 < len(value) <= MAX_ANSWER_CHARS else None


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: the content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces allowed,
    also `\\boxed 5`), else X of the last "answer is X" / "answer: X" (case-insensitive, `$`, `**` and a final period
    stripped), else None. Linear time: 1 MB of text takes milliseconds."""
    if not isinstance(text, str):
        return None
    answer = _last_box(text)
    return answer if answer is not None else _answer_phrase(text)


def _normalize(answer: str) -> str:
    """Whitespace collapsed, `$...$` unwrapped, `\\dfrac`/`\\tfrac` -> `\\frac`: strings equal after this are equal
    answers, so the fast path never accepts what math-verify would reject."""
    answer = " ".join(answer.split())
    if len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer.strip("$")
    return answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def is_correct(completion: str, gold: str, timeout_s: float = 5.0) -> bool:
    """True iff the final answer of `completion` equals `gold` (any type; str(gold) is used) per math-verify.

    The extracted answer is parsed as `\\boxed{answer}`; if nothing was extracted, math-verify's own extraction runs on
    the whole completion only when it has at most FULL_TEXT_FALLBACK_CHARS characters (else False: a long text with no
    marked answer would otherwise be scored by whatever number comes last). Gold without `$` or `\\boxed` is parsed as
    both `$gold$` and `\\boxed{gold}`. `timeout_s` bounds the parse+verify work; waiting for a free worker and a
    worker's start-up are not counted. Thread-safe; never raises on bad input (non-str completion, None gold -> False).
    """
    if not isinstance(completion, str) or not completion.strip() or gold is None:
        return False
    gold = str(gold).strip()
    if not gold:
        return False
    text = completion[-MAX_COMPLETION_CHARS:]
    answer = extract_answer(text)
    if answer == "":
        return False
    if answer is not None and _normalize(answer) == _normalize(_last_box(gold) or gold):
        return True
    if answer is None and len(text) > FULL_TEXT_FALLBACK_CHARS:
        return False
    if "$" not in gold and "\\boxed" not in gold:
        gold = _expand_plus_minus(gold)
    if answer is not None:
        answer = _expand_plus_minus(answer)
    return check_in_worker(answer, gold, text if answer is None else None, timeout_s)


def _completion_text(completion) -> str | None:
    """A TRL completion as text: a plain string, or a chat message list whose last message's content is taken."""
    if isinstance(completion, list) and completion:
        completion = completion[-1]
    if isinstance(completion, dict):
        completion = completion.get("content")
    return completion if isinstance(completion, str) else None


def math_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL reward function: r_i = 1.0 if completion i's final answer equals answer[i], else 0.0.

    `completions` are strings or chat message lists; `answer` is the dataset column of gold answers, one per
    completion. Checks run concurrently (one thread per worker process), each under its own 5 s bound."""
    if len(answer) != len(completions):
        raise ValueError(f"math_reward: got {len(completions)} completions but {len(answer)} gold answers")
    texts = [_completion_text(completion) for completion in completions]
    with ThreadPoolExecutor(max_workers=N_WORKERS) as threads:
        return [float(correct) for correct in threads.map(is_correct, texts, answer)]


_PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![A-Za-z])|[±∓]")
_SIGNS = {"\\pm": "+-", "±": "+-", "\\mp": "-+", "∓": "-+"}  # the sign in the first and in the second value


def _expand_plus_minus(latex: str) -> str:
    """A bare answer with ± as the two values it stands for: `\\frac{-1\\pm\\sqrt{17}}{2}` ->
    `\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}` (all ± signs move together, ∓ the other way); unchanged
    without ±. math-verify reads a top-level `a \\pm b` as that two-value set itself, but not a ± nested in a fraction
    or a root. So such an answer equals a gold listing both values (in any order, both being a set), and a single one
    of them stays wrong against a two-value gold, as math-verify compares sets."""
    if not _PLUS_MINUS.search(latex):
        return latex
    plus = _PLUS_MINUS.sub(lambda sign: _SIGNS[sign.group()][0], latex)
    minus = _PLUS_MINUS.sub(lambda sign: _SIGNS[sign.group()][1], latex)
    return f"{plus}, {minus}"
