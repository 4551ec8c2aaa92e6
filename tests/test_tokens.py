import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tapo.core.splice import splice_trajectory
from tapo.core.trajectory import Trajectory
from tapo.core.tokens import (
    CORRECTION,
    IGNORE,
    PREFIX,
    REFLECTION,
    SPAN_LABELS,
    label_tokens,
    span_fractions,
    trajectory_token_ids,
)

from scripted import one_token_per_char

P, R, C = PREFIX, REFLECTION, CORRECTION


def _byte_level_bpe() -> Tokenizer:
    corpus = ["23 + 45 = 68\n68 - 12 = 56\nWait, 63 is wrong. The answer is \\boxed{56}."]
    corpus += ["abcdef", "\n\n\n\n", "so Wait, ok"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(corpus * 50, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """A real fast tokenizer (byte-level BPE, GPT-2 style leading-space tokens) trained here, offline."""
    return PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(), eos_token="<eos>")


def trajectory(prefix: str, reflection: str, correction: str) -> Trajectory:
    a, b = len(prefix), len(prefix) + len(reflection)
    return Trajectory(prefix + reflection + correction, (0, a), (a, b), (b, b + len(correction)), 0.5)


def labelled_pieces(tokenizer, t: Trajectory) -> list[tuple[str, int]]:
    ids, labels = label_tokens(tokenizer, t, add_eos=False)
    offsets = tokenizer(t.text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    assert len(ids) == len(labels) == len(offsets)
    return [(t.text[start:end], label) for (start, end), label in zip(offsets, labels)]


def test_labels_follow_the_character_spans(tokenizer):
    t = trajectory("23 + 45 = 68", "\nWait, 63 is wrong.", "\n68 - 12 = 56")
    assert labelled_pieces(tokenizer, t) == [
        ("23", P), (" +", P), (" 45", P), (" =", P), (" 68", P),
        ("\n", R), ("Wait", R), (",", R), (" 63", R), (" is", R), (" wrong", R), (".", R),
        ("\n", C), ("68", C), (" -", C), (" 12", C), (" =", C), (" 56", C),
    ]  # fmt: skip


def test_leading_space_token_goes_to_the_span_of_its_word(tokenizer):
    # The space before "Wait" is the prefix's last char, but the token " Wait" carries reflection text.
    t = trajectory("23 + 45 = ", "Wait, 63 is wrong.", " 68")
    pieces = labelled_pieces(tokenizer, t)
    assert pieces[3] == (" =", P) and pieces[4] == (" Wait", R) and pieces[-1] == (" 68", C)


def test_token_straddling_a_boundary_goes_to_the_later_part(tokenizer):
    # "abcdef" is one token; its chars fall in all three spans: it must not be labelled prefix or reflection.
    assert labelled_pieces(tokenizer, trajectory("abc", "d", "ef")) == [("abcdef", C)]
    # An all-whitespace token "\n\n" over the prefix/reflection seam takes the label of its last char.
    expected = [("x", P), ("\n\n", R), ("\n", C), ("Wait", C)]
    assert labelled_pieces(tokenizer, trajectory("x\n", "\n", "\nWait")) == expected


def test_unicode_pieces_share_the_label_of_their_character(tokenizer):
    # é is 2 bytes and 🙂 is 4: byte-level BPE emits one token per byte, each with the offsets of the whole char.
    t = trajectory("é", "🙂 Wait", " 🙂 ok")
    assert labelled_pieces(tokenizer, t) == [
        ("é", P), ("é", P),
        ("🙂", R), ("🙂", R), ("🙂", R), ("🙂", R), (" Wait", R),
        (" ", C), ("🙂", C), ("🙂", C), ("🙂", C), ("🙂", C), (" ok", C),
    ]  # fmt: skip


def test_eos_is_appended_as_correction(tokenizer):
    t = trajectory("23 + 45 = 68", "\nWait, 63 is wrong.", "\n68 - 12 = 56")
    ids, labels = label_tokens(tokenizer, t)
    plain_ids, plain_labels = label_tokens(tokenizer, t, add_eos=False)
    assert ids == plain_ids + [tokenizer.eos_token_id] and labels == plain_labels + [CORRECTION]
    assert tokenizer.decode(plain_ids) == t.text


def test_spliced_trajectory_labels_run_prefix_then_reflection_then_correction(tokenizer):
    wrong = "23 + 45 = 68\n68 - 12 = 50\nThe answer is \\boxed{50}"
    reference = "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}"
    t = splice_trajectory(wrong, reference)
    ids, labels = label_tokens(tokenizer, t)
    assert labels == sorted(labels) and set(labels) == {P, R, C}
    first_reflection = labels.index(R)
    assert tokenizer.decode(ids[:first_reflection]) == "23 + 45 = 68"
    assert tokenizer.decode(ids[first_reflection : labels.index(C)]).startswith("\nWait, 68 - 12 = 50 is wrong")


# ------------------------------------------------------------------------------- the prefix as the policy sampled it

WRONG = "23 + 45 = 68\n68 - 12 = 50\nThe answer is \\boxed{50}"
RIGHT = "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}"


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The test BPE plus the special tokens of a chat model: a thinking tag, the turn terminator, padding."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(), eos_token="<eos>")
    tokenizer.add_tokens(["<think>", "<|im_end|>", "<pad>"], special_tokens=True)
    return tokenizer


def test_prefix_reuses_a_non_canonical_sampled_split(chat_tokenizer):
    tok = chat_tokenizer
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<pad>")
    sampled = one_token_per_char(tok, WRONG) + [end, pad, pad]
    assert sampled[:-3] != tok(WRONG, add_special_tokens=False)["input_ids"]  # canonical tokenization merges
    for cut in ("before_error", "after_error"):
        t = splice_trajectory(WRONG, RIGHT, cut=cut)
        prefix, _, _ = t.parts()
        ids, labels = trajectory_token_ids(tok, t, sampled, end)
        n = len(prefix)  # one sampled id per prefix char, reused as sampled
        assert ids[:n] == sampled[:n] and labels[:n] == [P] * n
        rest = label_tokens(tok, trajectory("", t.parts()[1], t.parts()[2]), add_eos=False)  # canonical from the cut
        assert ids[n:] == rest[0] + [end] and labels[n:] == rest[1] + [C]
        assert tok.decode(ids[:-1]) == t.text and tok.eos_token_id not in ids


def test_special_tokens_skipped_in_the_rollout_text_stay_in_the_prefix(chat_tokenizer):
    tok = chat_tokenizer
    think, end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("<|im_end|>")
    sampled = [think] + tok(WRONG, add_special_tokens=False)["input_ids"] + [end]
    assert tok.decode(sampled, skip_special_tokens=True) == WRONG  # the rollout text has no <think>
    t = splice_trajectory(WRONG, RIGHT)  # prefix "23 + 45 = 68": 5 canonical tokens
    ids, labels = trajectory_token_ids(tok, t, sampled, end)
    assert ids[:6] == sampled[:6] and labels[:6] == [P] * 6 and labels[6] == R and ids[-1] == end
    # Decoded with the special tokens kept, the sampled text ("<think>23 ...") is not the rollout text: nothing of it
    # agrees with the trajectory, so nothing is reused and the whole text is tokenized as label_tokens does.
    ids, labels = trajectory_token_ids(tok, t, sampled, end, skip_special_tokens=False)
    plain_ids, plain_labels = label_tokens(tok, t, add_eos=False)
    assert (ids, labels) == (plain_ids + [end], plain_labels + [C])


def test_a_char_cut_inside_a_sampled_token_goes_back_to_its_start(chat_tokenizer):
    tok = chat_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    sampled = tok("23 + 45 = 68", add_special_tokens=False)["input_ids"]  # "23", " +", " 45", " =", " 68"
    t = trajectory("23 + 4", "\nWait, no.", "\n23 + 45 = 68")  # the prefix ends inside " 45"
    ids, labels = trajectory_token_ids(tok, t, sampled, end)
    rest = tok(" 4\nWait, no.\n23 + 45 = 68", add_special_tokens=False)["input_ids"]
    assert ids == sampled[:2] + rest + [end]
    n = 2 + len(tok(" 4", add_special_tokens=False)["input_ids"])  # the cut-off " 4" is re-tokenized as prefix
    assert tok.decode(ids[:-1]) == t.text and labels[:n] == [P] * n and labels[n] == R


def test_a_character_split_over_byte_tokens_is_reused_whole(chat_tokenizer):
    tok = chat_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    sampled = one_token_per_char(tok, "é = 5") + [end]  # é is two byte tokens; the first decodes to nothing
    assert len(sampled) == 7
    t = trajectory("é", " = 5\nWait, no.", "\n5")
    ids, labels = trajectory_token_ids(tok, t, sampled, end)
    assert ids[:2] == sampled[:2] and labels[:3] == [P, P, R] and tok.decode(ids[:-1]) == t.text
    ids, _ = trajectory_token_ids(tok, trajectory("", "é = 5", "\n5"), sampled, end)  # empty prefix: nothing reused
    assert ids == tok("é = 5\n5", add_special_tokens=False)["input_ids"] + [end]


def test_bad_tokenizers_are_rejected():
    t = trajectory("a", "b", "c")
    with pytest.raises(ValueError, match="no eos"):
        label_tokens(PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe()), t)

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        label_tokens(SlowTokenizer(), t)
    with pytest.raises(ValueError, match="fast tokenizer"):
        trajectory_token_ids(SlowTokenizer(), t, [1], 0)


def test_span_fractions():
    assert SPAN_LABELS == {"ignore": -1, "prefix": 0, "reflection": 1, "correction": 2}
    labels = [P, P, R, C, C, C, C, C, IGNORE, IGNORE]  # 8 labelled tokens: 2 / 1 / 5
    assert span_fractions(labels) == {"prefix": 0.25, "reflection": 0.125, "correction": 0.625}
    assert span_fractions(torch.tensor(labels)) == span_fractions(labels)
    assert span_fractions([IGNORE]) == {"prefix": 0.0, "reflection": 0.0, "correction": 0.0}
