import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tapo.core.selection import select_candidates

groups = st.lists(st.sampled_from([True, False, None]), min_size=0, max_size=16)  # None: unscored rollout
thresholds = st.integers(min_value=1, max_value=6)
caps = st.integers(min_value=0, max_value=6)
seeds = st.integers(min_value=0, max_value=2**32)


@given(groups, thresholds, thresholds, caps, seeds)
def test_pairs_respect_every_invariant(correct, n_pos, n_neg, m_max, seed):
    pairs = select_candidates(correct, n_pos, n_neg, m_max, random.Random(seed))
    n_correct, n_wrong = correct.count(True), correct.count(False)
    eligible = n_correct >= n_pos and n_wrong >= n_neg
    wrong = [w for w, _ in pairs]
    assert len(pairs) == (min(n_wrong, m_max) if eligible else 0)
    assert len(set(wrong)) == len(wrong) and wrong == sorted(wrong)
    assert all(correct[w] is False and correct[ref] is True for w, ref in pairs)


@given(groups, thresholds, thresholds, caps, seeds)
def test_equal_seeds_give_equal_pairs(correct, n_pos, n_neg, m_max, seed):
    first = select_candidates(correct, n_pos, n_neg, m_max, random.Random(seed))
    assert select_candidates(correct, n_pos, n_neg, m_max, random.Random(seed)) == first


def test_default_thresholds_on_k8():
    # 2 correct (0, 1), 6 incorrect (2..7): eligible; 6 > m_max=4 so a random 4-subset of the incorrect ones.
    pairs = select_candidates([True, True] + [False] * 6, rng=random.Random(1))
    assert len(pairs) == 4 and {ref for _, ref in pairs} <= {0, 1} and {w for w, _ in pairs} <= set(range(2, 8))
    # 1 correct < n_pos=2; and 5 correct leave 3 incorrect < n_neg=4: both ineligible.
    assert select_candidates([True] + [False] * 7, rng=random.Random(1)) == []
    assert select_candidates([True] * 5 + [False] * 3, rng=random.Random(1)) == []


def test_few_incorrect_are_all_taken():
    # 3 incorrect (indices 1, 3, 4) <= m_max=4: every one is rewritten, no sampling among them.
    pairs = select_candidates([True, False, True, False, False], n_pos=1, n_neg=1, rng=random.Random(0))
    assert [w for w, _ in pairs] == [1, 3, 4]


def test_subset_and_references_vary_with_the_seed():
    correct = [True] * 4 + [False] * 8
    draws = {tuple(select_candidates(correct, rng=random.Random(seed))) for seed in range(20)}
    assert len(draws) > 1


def test_none_rng_follows_the_global_seed():
    correct = [True] * 4 + [False] * 8
    random.seed(123)
    first = select_candidates(correct)
    random.seed(123)
    assert select_candidates(correct) == first


@pytest.mark.parametrize("kwargs", [{"n_pos": 0}, {"n_neg": 0}, {"m_max": -1}])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError, match="select_candidates"):
        select_candidates([True, False], **kwargs)


def test_unscored_rollouts_are_neither_side():
    # 2 correct, 1 incorrect, 1 unscored: with n_neg=2 not eligible (the unscored one is not a failure) ...
    assert select_candidates([True, True, False, None], n_pos=2, n_neg=2, rng=random.Random(0)) == []
    # ... with n_neg=1 only the incorrect one is repaired.
    assert [w for w, _ in select_candidates([True, True, False, None], n_pos=2, n_neg=1, rng=random.Random(0))] == [2]
