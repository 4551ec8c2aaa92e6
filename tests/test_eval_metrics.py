"""pass@k, avg@k, lengths, DSR/ERR and reflection detection, against hand-computed numbers."""

import itertools
import math

import pytest

from tapo.core.synthesis import MARKERS
from tapo.evaluation.metrics import benchmark_summary, length_stats, pass_at_k, reflection_metrics, reported_ks
from tapo.evaluation.reflection import analyze_reflection, first_pass_answer, marker_pattern


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (5, 0, 3, 0.0),
        (3, 2, 2, 1.0),  # n - c < k: every pair holds a correct sample
        (10, 3, 1, 0.3),  # pass@1 = c/n
        (16, 1, 16, 1.0),
        (1024, 1, 512, 0.5),  # binomials of ~1e306 would overflow; the product form does not
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_enumerating_all_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))  # samples 0..c-1 are the correct ones
                hits = sum(any(i < c for i in subset) for subset in subsets)
                assert pass_at_k(n, c, k) == pytest.approx(hits / math.comb(n, k), abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


def test_reported_ks_are_powers_of_two_and_k():
    assert reported_ks(16) == [1, 2, 4, 8, 16]
    assert reported_ks(12) == [1, 2, 4, 8, 12]
    assert reported_ks(1) == [1]


def test_length_stats_by_hand():
    assert length_stats(range(1, 11)) == {"mean": 5.5, "median": 5.5, "p90": pytest.approx(9.1), "max": 10.0}


def record(
    correct: bool, reflected: bool = False, first_correct: bool | None = None, n_tokens: int = 10, truncated=False
):
    first = correct if first_correct is None else first_correct
    return {
        "correct": correct,
        "n_tokens": n_tokens,
        "truncated": truncated,
        "reflection": {"reflected": reflected, "first_correct": first},
    }


def test_benchmark_summary_by_hand():
    samples = {
        "p1": [record(True), record(False), record(False), record(False, n_tokens=16, truncated=True)],
        "p2": [record(True, n_tokens=4)] * 4,
    }
    summary = benchmark_summary(samples, k=4)
    assert summary["avg@k"] == pytest.approx((1 / 4 + 1) / 2)
    assert summary["pass@k"]["1"] == pytest.approx(0.625)
    assert summary["pass@k"]["2"] == pytest.approx((0.5 + 1) / 2)
    assert summary["pass@k"]["4"] == 1.0
    assert summary["complete"] and summary["n_samples"] == 8 and summary["n_problems"] == 2
    assert summary["truncation"] == {"value": 1 / 8, "count": 1, "total": 8}
    assert summary["length_tokens"]["max"] == 16
    assert summary["problems"] == [{"id": "p1", "n": 4, "correct": 1}, {"id": "p2", "n": 4, "correct": 4}]


def test_benchmark_summary_flags_incomplete_problems():
    summary = benchmark_summary({"p1": [record(True)] * 2, "p2": [record(False)]}, k=2)
    assert not summary["complete"]
    assert list(summary["pass@k"]) == ["1"]  # pass@2 needs 2 samples of every problem


def test_avg_at_k_averages_over_problems_when_sample_counts_differ():
    # p1: 1 of 1 right, p2: 1 of 4 right. Per problem: (1 + 1/4) / 2 = 0.625; pooled over samples it would be 2/5.
    summary = benchmark_summary({"p1": [record(True)], "p2": [record(True)] + [record(False)] * 3}, k=4)
    assert summary["avg@k"] == pytest.approx(0.625)
    assert summary["pass@k"] == {"1": pytest.approx(0.625)}  # pass@1 = avg@k, also per problem
    assert not summary["complete"] and summary["n_samples"] == 5


def test_reflection_metrics_counts():
    samples = [
        record(True),  # direct and right
        record(False),  # direct and wrong
        record(True, reflected=True, first_correct=False),  # reflection fixes
        record(False, reflected=True, first_correct=False),  # reflection does not fix
        record(False, reflected=True, first_correct=True),  # reflection breaks a right answer
        record(True, reflected=True, first_correct=True),  # reflection keeps a right answer
        record(True, reflected=True, first_correct=True),  # ... twice: broken and kept counts differ (1 vs 2)
    ]
    metrics = reflection_metrics(samples)
    assert metrics["dsr"] == {"value": 4 / 7, "count": 4, "total": 7}
    assert metrics["err"] == {"value": 1 / 2, "count": 1, "total": 2}
    assert metrics["reflection_rate"] == {"value": 5 / 7, "count": 5, "total": 7}
    assert metrics["broken_by_reflection"] == {"value": 1 / 3, "count": 1, "total": 3}
    assert reflection_metrics([record(True)])["err"] == {"value": None, "count": 0, "total": 0}


def test_marker_pattern_whole_words_any_case():
    pattern = marker_pattern(["wait", "let me re-check"])
    assert pattern.search("so 5. WAIT, no").group(0) == "WAIT"
    assert pattern.search("Let me   re-check that").group(0) == "Let me   re-check"
    assert pattern.search("awaiting the waiter") is None
    assert pattern.search("let me re-checking") is None
    with pytest.raises(ValueError):
        marker_pattern([])


def test_default_markers_come_from_synthesis():
    pattern = marker_pattern()
    for marker in MARKERS:
        assert pattern.search(f"x = 3. {marker.capitalize()} y") is not None, marker


def test_first_pass_answer_prefers_extracted_answer_then_last_number():
    assert first_pass_answer("so \\boxed{12} and 7 more") == "12"
    assert first_pass_answer("6 * 7 = 41. ") == "41"
    assert first_pass_answer("no numbers here") is None


def analyze(text: str, gold: str = "42"):
    """Reflection info the way the runner computes it (final answer and correctness from tapo.core.verify)."""
    from tapo.core.verify import extract_answer, is_correct

    final_correct = is_correct(text, gold)
    return analyze_reflection(text, gold, extract_answer(text), final_correct, marker_pattern()), final_correct


def test_dsr_err_on_hand_written_responses():
    responses = [
        "6 times 7 is 42, so the answer is \\boxed{42}.",  # no reflection, right
        "6 times 7 is 41, so the answer is \\boxed{41}.",  # no reflection, wrong
        "So \\boxed{41}. Wait, I made a mistake: 6 times 7 is 42. The answer is \\boxed{42}.",  # reflection fixes
        "So \\boxed{42}. Wait, let me re-check: I think it is \\boxed{43}.",  # reflection breaks a right answer
        "So \\boxed{42}. Wait, let me verify: yes, \\boxed{42}.",  # reflection after a right answer, kept
        "We have 6 * 7 = 41. Wait, 6 * 7 = 42, so \\boxed{42}.",  # unboxed draft answer (last number), fixed
        "So \\boxed{40}. Wait, maybe \\boxed{39}.",  # reflection after a wrong answer, still wrong
    ]
    analyzed = [analyze(text) for text in responses]
    first = [(r.reflected, r.first_answer, r.first_correct, final) for r, final in analyzed]
    assert first == [
        (False, "42", True, True),
        (False, "41", False, False),
        (True, "41", False, True),
        (True, "42", True, False),
        (True, "42", True, True),
        (True, "41", False, True),
        (True, "40", False, False),
    ]
    assert analyzed[2][0].marker == "Wait" and responses[2][analyzed[2][0].char_index :].startswith("Wait")
    samples = [
        {"correct": final, "reflection": {"reflected": r.reflected, "first_correct": r.first_correct}}
        for r, final in analyzed
    ]
    metrics = reflection_metrics(samples)
    assert (metrics["dsr"]["count"], metrics["dsr"]["total"]) == (3, 7)
    assert (metrics["err"]["count"], metrics["err"]["total"]) == (2, 3)
    assert (metrics["broken_by_reflection"]["count"], metrics["broken_by_reflection"]["total"]) == (1, 2)
