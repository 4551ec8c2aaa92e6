"""`tapo eval --compare RUN_A RUN_B`: headline metrics of two run folders side by side, with B - A deltas."""

import json
from pathlib import Path

from rich.table import Table

from tapo.evaluation.report import percent, plot_pass_at_k
from tapo.evaluation.runner import SUMMARY_FILE, summarize_run

# Sign of "better" for colouring deltas: higher is better except truncation; length is neither.
BETTER = {"truncation": -1, "mean length": 0}


def load_summary(run_dir: Path) -> dict:
    """summary.json, or the summary recomputed from the samples of a run that never finished."""
    path = run_dir / SUMMARY_FILE
    if path.exists():
        return json.loads(path.read_text())
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not an evaluation run folder (no {SUMMARY_FILE} or config.json)")
    return summarize_run(run_dir)


def headline(bench: dict, k: int) -> dict[str, float | None]:
    """The compared metrics. pass@k uses the largest k both runs share, given as `k`."""
    return {
        "avg@k": bench["avg@k"],
        "pass@1": bench["pass@k"]["1"],
        f"pass@{k}": bench["pass@k"][str(k)],
        "DSR": bench["dsr"]["value"],
        "ERR": bench["err"]["value"],
        "truncation": bench["truncation"]["value"],
        "mean length": bench["length_tokens"]["mean"],
    }


def compare_runs(run_a: str | Path, run_b: str | Path, out: str | Path | None = None) -> dict:
    """Compare two run folders on their shared benchmarks; writes compare.md and compare.png to `out`
    (default runs/compare/<A>-vs-<B>) and returns {runs, out, benchmarks: {name: {metric: {a, b, delta}}}, only_in}."""
    run_a, run_b = Path(run_a), Path(run_b)
    summary_a, summary_b = load_summary(run_a), load_summary(run_b)
    out = Path(out) if out is not None else Path("runs/compare") / f"{run_a.name}-vs-{run_b.name}"
    shared = [name for name in summary_a["benchmarks"] if name in summary_b["benchmarks"]]
    table = {}
    for name in shared:
        bench_a, bench_b = summary_a["benchmarks"][name], summary_b["benchmarks"][name]
        k = max(set(map(int, bench_a["pass@k"])) & set(map(int, bench_b["pass@k"])))
        metrics_a, metrics_b = headline(bench_a, k), headline(bench_b, k)
        table[name] = {
            metric: {
                "a": metrics_a[metric],
                "b": metrics_b[metric],
                "delta": delta(metrics_a[metric], metrics_b[metric]),
            }
            for metric in metrics_a
        }
    comparison = {
        "runs": [str(run_a), str(run_b)],
        "out": str(out),
        "benchmarks": table,
        "only_in": {
            str(run_a): sorted(set(summary_a["benchmarks"]) - set(shared)),
            str(run_b): sorted(set(summary_b["benchmarks"]) - set(shared)),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(compare_markdown(comparison))
    curves = [
        (f"{name} ({label})", summary["benchmarks"][name]["pass@k"], style)
        for name in shared
        for label, summary, style in (("A", summary_a, "--"), ("B", summary_b, "-"))
    ]
    plot_pass_at_k(curves, out / "compare.png", f"pass@k: A={run_a.name}, B={run_b.name}")
    return comparison


def delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def show(metric: str, value: float | None, signed: bool = False) -> str:
    """Lengths in tokens, everything else in percent (percentage points for deltas)."""
    if value is None:
        return "n/a"
    if metric == "mean length":
        return f"{value:+.0f}" if signed else f"{value:.0f}"
    return f"{100 * value:+.1f}" if signed else percent(value)


def compare_markdown(comparison: dict) -> str:
    run_a, run_b = comparison["runs"]
    lines = ["# Comparison", "", f"A = `{run_a}`, B = `{run_b}`; delta = B - A (percentage points, tokens for length)"]
    for name, metrics in comparison["benchmarks"].items():
        lines += ["", f"## {name}", "", "| metric | A | B | delta |", "|---|---|---|---|"]
        lines += [
            f"| {m} | {show(m, v['a'])} | {show(m, v['b'])} | {show(m, v['delta'], True)} |" for m, v in metrics.items()
        ]
    for run, names in comparison["only_in"].items():
        if names:
            lines += ["", f"Only in `{run}`: {', '.join(names)}"]
    lines += ["", "![pass@k](compare.png)"]
    return "\n".join(lines) + "\n"


def comparison_table(comparison: dict) -> Table:
    """The comparison as one rich table: benchmark, metric, A, B, delta."""
    run_a, run_b = comparison["runs"]
    table = Table(title=f"A = {run_a}   B = {run_b}")
    for column in ("benchmark", "metric", "A", "B", "delta (B - A)"):
        table.add_column(column, justify="left" if column in ("benchmark", "metric") else "right")
    for name, metrics in comparison["benchmarks"].items():
        for index, (metric, values) in enumerate(metrics.items()):
            shown = show(metric, values["delta"], True)
            direction = BETTER.get(metric, 1) * (values["delta"] or 0)
            if direction:
                shown = f"[{'green' if direction > 0 else 'red'}]{shown}[/]"
            table.add_row(
                name if index == 0 else "", metric, show(metric, values["a"]), show(metric, values["b"]), shown
            )
        table.add_section()
    return table
