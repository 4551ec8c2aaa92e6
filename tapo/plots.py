"""Training plots from RUN/metrics.jsonl (matplotlib, Agg: works headless)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tapo.runfolder import read_metrics  # noqa: E402

# (panel title, [(metric key, legend label), ...])
PANELS = [
    ("reward / accuracy", [("reward", "reward"), ("tapo/accuracy", "accuracy")]),
    ("constructions", [("tapo/eligible_frac", "eligible queries"), ("tapo/parse_rate", "parsed"),
                       ("tapo/accept_rate", "accepted")]),
    ("loss", [("tapo/loss_grpo", "L_GRPO"), ("tapo/loss_ref", "L_ref"), ("loss", "total")]),
    ("OOD token suppression weights", [("tapo/ots_weight_mean", "mean"), ("tapo/ots_weight_min", "min"), ("tapo/ots_weight_max", "max")]),
]


def plot_training(metrics_path: str | Path, out_png: str | Path) -> Path:
    """One figure, four panels; a metric absent from the run (e.g. TAPO stats of a GRPO run) is simply not drawn."""
    rows = read_metrics(Path(metrics_path))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (title, series) in zip(axes, PANELS):
        for key, label in series:
            points = [(r["step"], r[key]) for r in rows
                      if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
