"""Reflection detection for DSR/ERR: where a response first reflects, and what it had answered before that.

A response *reflects* where the first reflection marker occurs ("wait", "let me re-check", ...: whole words or
phrases, case-insensitive, any whitespace between the words of a phrase).

Its *first-pass answer* is
  - without a reflection: the final answer, extract_answer(full response);
  - with one: extract_answer(text before the first marker) (last \\boxed{} or "answer is X"), falling back to the last
    number written in that text (``-?\\d+(\\.\\d+)?``), since drafts often state "... = 42. Wait," without boxing it.
    None when the text before the marker holds neither.
The first-pass answer is graded like a final one: is_correct("\\boxed{answer}", gold).
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tapo.core.synthesis import MARKERS
from tapo.core.verify import extract_answer, is_correct

LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Reflection:
    reflected: bool
    marker: str | None  # the marker text as written in the response
    char_index: int | None  # where the first marker starts
    first_answer: str | None
    first_correct: bool


def marker_pattern(markers: Sequence[str] = MARKERS) -> re.Pattern:
    """One regex for all markers. Lookarounds rather than \\b so markers that start or end in punctuation still work."""
    if not markers:
        raise ValueError("at least one reflection marker is needed")
    phrases = sorted({m.strip().lower() for m in markers}, key=len, reverse=True)
    alternatives = "|".join(r"\s+".join(map(re.escape, phrase.split())) for phrase in phrases)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def first_pass_answer(prefix: str) -> str | None:
    """The answer stated in the text before the first reflection (see the module docstring)."""
    answer = extract_answer(prefix)
    if answer is not None:
        return answer
    numbers = LAST_NUMBER.findall(prefix)
    return numbers[-1] if numbers else None


def analyze_reflection(
    text: str, gold: str, final_answer: str | None, final_correct: bool, pattern: re.Pattern, timeout_s: float = 5.0
) -> Reflection:
    match = pattern.search(text)
    if match is None:
        return Reflection(False, None, None, final_answer, final_correct)
    answer = first_pass_answer(text[: match.start()])
    correct = answer is not None and is_correct(f"\\boxed{{{answer}}}", gold, timeout_s=timeout_s)
    return Reflection(True, match.group(0), match.start(), answer, correct)
