"""Character spans of a trajectory -> one label per token.

Labels: PREFIX=0 (the wrong rollout's own tokens), REFLECTION=1, CORRECTION=2, and IGNORE=-1 for tokens outside every
span (padding added later by a collator). A token takes the label of the span holding its LAST non-whitespace
character (its last character if it is all whitespace). So a token that straddles a boundary goes to the later part:
no non-whitespace character of the reflection or correction is ever labelled as an earlier part, and a leading-space
token such as " Wait" belongs to the reflection. Only whitespace of a later part can end up in an earlier label (a
token "5 " whose space opens the reflection stays PREFIX). A token with an empty offset (start == end) takes the label
of the character at its start. An appended eos token is CORRECTION: ending the answer is part of the correction.

`label_tokens` tokenizes the whole trajectory text. `trajectory_token_ids` keeps the prefix as the policy sampled it
(its own ids, whatever split or special tokens it used) and tokenizes only the rest.
"""

from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence

from tokenizers.decoders import DecodeStream

from tapo.core.trajectory import Trajectory

IGNORE, PREFIX, REFLECTION, CORRECTION = -1, 0, 1, 2
SPAN_LABELS = {"ignore": IGNORE, "prefix": PREFIX, "reflection": REFLECTION, "correction": CORRECTION}


def _check_fast(tokenizer, caller: str):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{caller} needs a fast tokenizer (offset mapping), got {type(tokenizer).__name__}")


def _span_labels(trajectory: Trajectory, offsets, shift: int = 0) -> list[int]:
    """One label per token from its (start, end) char offsets into trajectory.text[shift:] (rule in the docstring)."""
    text = trajectory.text
    # Span k covers [starts[k], starts[k+1]): the span of char position p is bisect_right(starts, p) - 1.
    starts = [trajectory.prefix_span[0], trajectory.reflection_span[0], trajectory.correction_span[0]]
    span_labels = (PREFIX, REFLECTION, CORRECTION)
    labels = []
    for start, end in offsets:
        start, end = start + shift, end + shift
        stripped = len(text[start:end].rstrip())
        position = start + stripped - 1 if stripped else max(end - 1, start)
        position = min(position, len(text) - 1)
        labels.append(span_labels[max(bisect_right(starts, position) - 1, 0)])
    return labels


def label_tokens(tokenizer, trajectory: Trajectory, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(token_ids, labels) of trajectory.text under a Hugging Face fast tokenizer, one label per token."""
    _check_fast(tokenizer, "label_tokens")
    encoding = tokenizer(trajectory.text, return_offsets_mapping=True, add_special_tokens=False)
    token_ids, labels = list(encoding["input_ids"]), _span_labels(trajectory, encoding["offset_mapping"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"label_tokens(add_eos=True): tokenizer {type(tokenizer).__name__} has no eos token")
        token_ids.append(tokenizer.eos_token_id)
        labels.append(CORRECTION)
    return token_ids, labels


def _reusable_prefix(tokenizer, sampled_ids: Sequence[int], text: str, skip_special_tokens: bool) -> tuple[int, int]:
    """(k, chars): the most sampled ids whose decoding (`skip_special_tokens` as the rollout text was decoded) is
    text[:chars], a prefix of `text`. Incremental decoding (`tokenizers` DecodeStream): linear time, and a token that
    does not complete a character (a partial UTF-8 byte) only counts once a later one completes it."""
    stream, backend = DecodeStream(skip_special_tokens=skip_special_tokens), tokenizer.backend_tokenizer
    k = chars = 0
    for n, token in enumerate(sampled_ids, 1):
        piece = stream.step(backend, int(token))
        if piece is None:
            continue
        if not text.startswith(piece, chars):
            break
        k, chars = n, chars + len(piece)
    return k, chars


def trajectory_token_ids(
    tokenizer, trajectory: Trajectory, sampled_ids: Sequence[int], terminator_id: int, skip_special_tokens: bool = True
) -> tuple[list[int], list[int]]:
    """(token_ids, labels) of a trajectory whose prefix is the wrong rollout's own sampled ids.

    sampled_ids: the wrong rollout's completion ids as sampled, decoded with `skip_special_tokens` into the text the
    trajectory's prefix was sliced from; ids from the first `terminator_id` on (the terminator, padding) are ignored.
    The prefix keeps sampled ids up to the last token boundary at or before the prefix's char end (re-tokenizing the
    prefix could merge or split differently, and would drop special tokens that decoding skipped). Where the decoded
    ids stop agreeing with the trajectory text (a rollout text decoded another way), the reuse stops there. The rest of
    the text, from that char position (so the reflection starts at a token boundary), is tokenized on its own, and
    `terminator_id` ends it: the token the rollouts end with (e.g. <|im_end|>), not necessarily the tokenizer's eos.
    Labels: reused ids PREFIX, the rest by the char-span rule of `label_tokens`, the terminator CORRECTION.
    """
    _check_fast(tokenizer, "trajectory_token_ids")
    sampled = [int(token) for token in sampled_ids]
    if terminator_id in sampled:
        sampled = sampled[: sampled.index(terminator_id)]
    prefix_text = trajectory.text[: trajectory.prefix_span[1]]
    k, chars = _reusable_prefix(tokenizer, sampled, prefix_text, skip_special_tokens)
    rest = tokenizer(trajectory.text[chars:], return_offsets_mapping=True, add_special_tokens=False)
    token_ids = sampled[:k] + list(rest["input_ids"]) + [terminator_id]
    labels = [PREFIX] * k + _span_labels(trajectory, rest["offset_mapping"], shift=chars) + [CORRECTION]
    return token_ids, labels


def span_fractions(labels) -> dict[str, float]:
    """Share of the labelled (non-IGNORE) tokens in each span, e.g. {"prefix": 0.5, "reflection": 0.1, ...}."""
    counts = Counter(int(label) for label in labels if int(label) != IGNORE)
    total = sum(counts.values())
    return {name: counts[label] / total if total else 0.0 for name, label in SPAN_LABELS.items() if label != IGNORE}
