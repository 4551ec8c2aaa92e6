"""DCS (difficulty-aware candidate selection): which incorrect rollouts of a group get a micro-reflective rewrite.

A query's K rollouts split into correct P and incorrect N. Only *mixed* groups with |P| >= n_pos and |N| >= n_neg are
eligible: the policy can already solve the query sometimes (there is a correct reference to learn from) but fails often
enough that repairing failures is worth the extra generation. From an eligible group at most m_max incorrect rollouts
are rewritten, each paired with a correct sibling drawn uniformly at random as the reference solution.
"""

import random
from collections.abc import Sequence


def select_candidates(
    correct: Sequence[bool | None],
    n_pos: int = 2,
    n_neg: int = 4,
    m_max: int = 4,
    rng: random.Random | None = None,
) -> list[tuple[int, int]]:
    """Pick (incorrect_index, correct_reference_index) pairs for one group of rollouts.

    correct[i] is None for a rollout no reward function scored (TRL's NaN reward): it is neither correct nor incorrect,
    so it is never paired and does not count towards n_pos / n_neg.
    Returns [] unless sum(correct) >= n_pos and (len(correct) - sum(correct)) >= n_neg. Otherwise returns
    min(|N|, m_max) pairs, sorted by incorrect index: the incorrect indices are distinct (all of N when |N| <= m_max,
    else a uniform random m_max-subset of N) and each reference is drawn uniformly from P, independently per pair
    (so two pairs may share a reference).

    `rng=None` uses Python's global `random` state, which `transformers.set_seed` seeds: runs are reproducible under
    the trainer's seed, yet successive calls do not repeat the same draws (a fixed default such as Random(0) would
    pick the same pairs for every group with the same correctness pattern, a silent bias). Pass a seeded
    `random.Random` for an independent stream.
    """
    if n_pos < 1 or n_neg < 1 or m_max < 0:
        raise ValueError(f"select_candidates: need n_pos >= 1, n_neg >= 1, m_max >= 0, got {n_pos=} {n_neg=} {m_max=}")
    sampler = rng if rng is not None else random  # the module functions share the global Random instance
    positives = [i for i, ok in enumerate(correct) if ok is not None and ok]
    negatives = [i for i, ok in enumerate(correct) if ok is not None and not ok]
    if len(positives) < n_pos or len(negatives) < n_neg:
        return []
    chosen = negatives if len(negatives) <= m_max else sorted(sampler.sample(negatives, m_max))
    return [(wrong, sampler.choice(positives)) for wrong in chosen]
