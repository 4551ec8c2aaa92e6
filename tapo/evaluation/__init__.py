"""Evaluation on math benchmarks (AIME24, AIME25, HMMT25 or local files): pass@k, avg@k, DSR, ERR, lengths.

    from tapo.evaluation import evaluate, compare_runs
    summary = evaluate("smollm2-135m", ["aime24"], k=16, out="runs/eval/base")

Modules: benchmarks (loading), generate (transformers/vLLM sampling), reflection (first-pass answers), metrics (pure
formulas), runner (the resumable run folder), report (markdown, plots), compare (two runs), cli (`tapo eval`).
"""

from tapo.evaluation.benchmarks import DEFAULT_BENCHMARKS, HUB_BENCHMARKS, Benchmark, Problem, load_benchmark
from tapo.evaluation.compare import compare_runs
from tapo.evaluation.errors import EvalConfigError
from tapo.evaluation.metrics import pass_at_k
from tapo.evaluation.runner import evaluate, summarize_run

__all__ = [
    "DEFAULT_BENCHMARKS",
    "HUB_BENCHMARKS",
    "Benchmark",
    "EvalConfigError",
    "Problem",
    "compare_runs",
    "evaluate",
    "load_benchmark",
    "pass_at_k",
    "summarize_run",
]
