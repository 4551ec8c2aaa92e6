"""Character spans of a trajectory -> one label per token.

Labels: PREFIX=0 (the wrong rollout's own tokens), REFLECTION=1, CORRECTION=2, and IGNORE=-1 for tokens outside every
span (padding added later by a collator). A token takes the label of the span holding its LAST non-whitespace
character (its last character if it is all whitespace). So a token that straddles a boundary goes to the later part:
no non-whitespace character of the reflection or correction is ever labelled as an earlier part, and a leading-space
token such as " Wait" belongs to the reflection. Only whitespace of a later part can end up in an earlier label (a
token "5 " whose space opens the reflection stays PREFIX). A token with an empty offset (start == end) takes the label
of the character at its start. An appended eos token is CORRECTION: ending the answer is part of the correction.
"""

from bisect import bisect_right
from collections import Counter

from tapo.core.synthesis import Trajectory

IGNORE, PREFIX, REFLECTION, CORRECTION = -1, 0, 1, 2
SPAN_LABELS = {"ignore": IGNORE, "prefix": PREFIX, "reflection": REFLECTION, "correction": CORRECTION}


def label_tokens(tokenizer, trajectory: Trajectory, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(token_ids, labels) of trajectory.text under a Hugging Face fast tokenizer, one label per token."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"label_tokens needs a fast tokenizer (offset mapping), got {type(tokenizer).__name__}")
    text = trajectory.text
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    # Span k covers [starts[k], starts[k+1]): the span of char position p is bisect_right(starts, p) - 1.
    starts = [trajectory.prefix_span[0], trajectory.reflection_span[0], trajectory.correction_span[0]]
    span_labels = (PREFIX, REFLECTION, CORRECTION)
    labels = []
    for start, end in encoding["offset_mapping"]:
        piece = text[start:end]
        stripped = len(piece.rstrip())
        position = start + stripped - 1 if stripped else max(end - 1, start)
        position = min(position, len(text) - 1)
        labels.append(span_labels[max(bisect_right(starts, position) - 1, 0)])
    token_ids = list(encoding["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"label_tokens(add_eos=True): tokenizer {type(tokenizer).__name__} has no eos token")
        token_ids.append(tokenizer.eos_token_id)
        labels.append(CORRECTION)
    return token_ids, labels


def span_fractions(labels) -> dict[str, float]:
    """Share of the labelled (non-IGNORE) tokens in each span, e.g. {"prefix": 0.5, "reflection": 0.1, ...}."""
    counts = Counter(int(label) for label in labels if int(label) != IGNORE)
    total = sum(counts.values())
    return {name: counts[label] / total if total else 0.0 for name, label in SPAN_LABELS.items() if label != IGNORE}
