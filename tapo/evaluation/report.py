"""Human-readable output of a run: report.md with one table per benchmark, and PNG plots (matplotlib, no display)."""

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure renders through Agg: no pyplot, no display needed

from tapo.evaluation.metrics import reported_ks


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def rate(entry: dict) -> str:
    """A ratio entry as '42.0% (21/50)'."""
    return f"{percent(entry['value'])} ({entry['count']}/{entry['total']})"


def benchmark_table(summary: dict, k: int) -> list[str]:
    lengths = summary["length_tokens"]
    rows = [
        (f"avg@{k}", percent(summary["avg@k"])),
        *((f"pass@{kk}", percent(summary["pass@k"][str(kk)])) for kk in reported_ks(k) if str(kk) in summary["pass@k"]),
        ("DSR", rate(summary["dsr"])),
        ("ERR", rate(summary["err"])),
        ("reflection rate", rate(summary["reflection_rate"])),
        ("broken by reflection", rate(summary["broken_by_reflection"])),
        (
            "length mean / median / p90 / max",
            " / ".join(f"{lengths[key]:.0f}" for key in ("mean", "median", "p90", "max")),
        ),
        ("truncated", rate(summary["truncation"])),
    ]
    return ["| metric | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def write_report(summary: dict, run_dir: Path) -> None:
    """report.md, pass_at_k.png and dsr_err.png in `run_dir`."""
    config, k = summary["config"], summary["k"]
    lines = [
        f"# Evaluation of `{summary['model']}`",
        "",
        f"k={k}, backend={config['backend']}, max_tokens={config['max_tokens']}, temperature={config['temperature']}, "
        f"top_p={config['top_p']}, seed={config['seed']}",
    ]
    for name, bench in summary["benchmarks"].items():
        source = config["benchmarks"][name]["source"]
        complete = "" if bench["complete"] else f", **incomplete: fewer than {k} samples for some problems**"
        lines += [
            "",
            f"## {name}",
            "",
            f"{bench['n_problems']} problems from `{source}`, {bench['n_samples']} samples{complete}",
            "",
        ]
        lines += benchmark_table(bench, k)
    lines += ["", "![pass@k](pass_at_k.png)", "", "![DSR and ERR](dsr_err.png)", "", "## Definitions", ""]
    lines += [f"- **{name}**: {text}" for name, text in summary["definitions"].items()]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    curves = [(name, bench["pass@k"], "-") for name, bench in summary["benchmarks"].items()]
    plot_pass_at_k(curves, run_dir / "pass_at_k.png", f"pass@k of {summary['model']}")
    plot_dsr_err(summary["benchmarks"], run_dir / "dsr_err.png")


def plot_pass_at_k(curves: Sequence[tuple[str, dict[str, float], str]], path: Path, title: str) -> None:
    """One line per (label, pass@k dict, line style), k on a log2 axis."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    for label, pass_at, style in curves:
        ks = sorted(int(kk) for kk in pass_at)
        axes.plot(ks, [pass_at[str(kk)] for kk in ks], style, marker="o", markersize=3, label=label)
    axes.set_xscale("log", base=2)
    ticks = reported_ks(max(int(kk) for _, pass_at, _ in curves for kk in pass_at))
    axes.set_xticks(ticks, [str(kk) for kk in ticks])
    axes.minorticks_off()
    axes.set(xlabel="k", ylabel="pass@k", ylim=(0, 1), title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)


def plot_dsr_err(benchmarks: dict[str, dict], path: Path) -> None:
    """DSR and ERR side by side per benchmark, labelled with their counts; an undefined ERR (0/0) is drawn as 0."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    names = list(benchmarks)
    for offset, metric in ((-0.2, "dsr"), (0.2, "err")):
        entries = [benchmarks[name][metric] for name in names]
        bars = axes.bar(
            [i + offset for i in range(len(names))],
            [e["value"] or 0.0 for e in entries],
            width=0.4,
            label=metric.upper(),
        )
        axes.bar_label(bars, [f"{e['count']}/{e['total']}" for e in entries], fontsize=8)
    axes.set_xticks(range(len(names)), names)
    axes.set(ylabel="rate", ylim=(0, 1), title="direct solution rate and effective reflection rate")
    axes.legend()
    figure.savefig(path, dpi=120)
