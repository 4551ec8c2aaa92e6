"""Sampling metrics as pure functions: unbiased pass@k, avg@k, length statistics and a benchmark's summary."""

from collections.abc import Sequence

import numpy as np

DEFINITIONS = {
    "avg@k": "mean over problems of the share of the k samples that are correct",
    "pass@k'": "mean over problems of the unbiased estimator 1 - C(n-c, k')/C(n, k') (Chen et al. 2021) for n "
    "samples of which c are correct",
    "first-pass answer": "the answer stated before the first reflection marker: extract_answer on the text before it, "
    "else the last number written there; for a response that never reflects, its final answer",
    "DSR": "direct solution rate: responses whose first-pass answer is correct / all responses",
    "ERR": "effective reflection rate: responses that reflect after a wrong or missing first-pass answer and end "
    "correct / responses that reflect after a wrong or missing first-pass answer",
    "broken_by_reflection": "responses that reflect after a correct first-pass answer and end wrong / responses that "
    "reflect after a correct first-pass answer",
    "length_tokens": "generated tokens per response, EOS included",
    "truncation": "responses that reached max_tokens without EOS / all responses",
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): the chance that k of the n samples, drawn without replacement, hold at
    least one of the c correct ones.

        pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)

    The product form never builds the huge binomials (C(64, 32) ~ 1.8e18) and is exact where n-c < k (pass@k = 1).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def reported_ks(k: int) -> list[int]:
    """The k' shown in tables and plots: powers of two up to k, and k itself."""
    return sorted({2**e for e in range(k.bit_length()) if 2**e <= k} | {k})


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Response lengths in tokens; p90 interpolates linearly between order statistics (numpy's default)."""
    values = np.asarray(lengths, dtype=float)
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def ratio(count: int, total: int) -> dict:
    """A rate with its numerator and denominator, so reports can say 3/7 rather than a bare 0.43 (None when 0/0)."""
    return {"value": count / total if total else None, "count": count, "total": total}


def reflection_metrics(samples: Sequence[dict]) -> dict:
    """DSR and ERR from the per-sample `reflection` records (see reflection.py for the first-pass answer).

    DSR (direct solution rate) = #responses whose first-pass answer is correct / #responses.
    ERR (effective reflection rate) = #responses that reflect after a wrong (or missing) first-pass answer and end
        correct / #responses that reflect after a wrong (or missing) first-pass answer.
    Also: how often responses reflect at all, and how often a reflection after a correct answer ends wrong.
    """
    reflected = [s for s in samples if s["reflection"]["reflected"]]
    after_wrong = [s for s in reflected if not s["reflection"]["first_correct"]]
    after_right = [s for s in reflected if s["reflection"]["first_correct"]]
    return {
        "dsr": ratio(sum(s["reflection"]["first_correct"] for s in samples), len(samples)),
        "err": ratio(sum(s["correct"] for s in after_wrong), len(after_wrong)),
        "reflection_rate": ratio(len(reflected), len(samples)),
        "broken_by_reflection": ratio(sum(not s["correct"] for s in after_right), len(after_right)),
    }


def benchmark_summary(samples_by_problem: dict[str, list[dict]], k: int) -> dict:
    """Summarise one benchmark from its sample records (the rows of samples.jsonl), grouped by problem id.

    avg@k: mean over problems of c/n (the share of correct samples), which equals pass@1.
    pass@k': mean over problems of pass_at_k(n, c, k') for every k' <= min n (a problem with n < k is incomplete).
    """
    samples = [s for group in samples_by_problem.values() for s in group]
    counts = {pid: (len(group), sum(s["correct"] for s in group)) for pid, group in samples_by_problem.items()}
    min_n = min(n for n, _ in counts.values())
    return {
        "n_problems": len(counts),
        "n_samples": len(samples),
        "complete": all(n == k for n, _ in counts.values()),
        "avg@k": float(np.mean([c / n for n, c in counts.values()])),
        "pass@k": {
            str(kk): float(np.mean([pass_at_k(n, c, kk) for n, c in counts.values()])) for kk in range(1, min_n + 1)
        },
        **reflection_metrics(samples),
        "length_tokens": length_stats([s["n_tokens"] for s in samples]),
        "truncation": ratio(sum(s["truncated"] for s in samples), len(samples)),
        "problems": [{"id": pid, "n": n, "correct": c} for pid, (n, c) in counts.items()],
    }
