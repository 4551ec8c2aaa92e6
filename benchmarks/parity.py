"""Is TAPOTrainer with TAPO off the same as TRL's own GRPOTrainer? Same config, same seed, same model and data.

Two checks:
1. Numbers: the first steps' losses and rewards (and other logged metrics) of the two trainers; the max abs difference
   should be 0 (same sampling RNG stream, same rollouts, same loss code).
2. Speed: wall time per step, measured in rounds that alternate which trainer runs first (A B, B A, ...), dropping
   each run's warm-up steps; the ratio TAPOTrainer(TAPO off) / GRPOTrainer is the median over rounds of the per-round
   ratio of mean step times, so slow phases of a shared machine hit both sides of a ratio.

    python benchmarks/parity.py --quick     # tiny model, ~1 min
    python benchmarks/parity.py             # SmolLM2-135M, CPU
    python benchmarks/parity.py --full      # SmolLM2-135M, GPU
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from common import (
    RESULTS,
    TASK,
    benchmark_parser,
    StepClock,
    machine,
    make_config,
    parse_settings,
    peak_rss_gib,
    reset_peak_rss,
    set_threads,
    warm_verifier,
    write_json,
)
from trl import GRPOConfig, GRPOTrainer

from tapo.run import build_trainer, load_train_set

MODES = {
    "quick": dict(model="tiny", dataset=TASK, n_train=64, per_device_train_batch_size=16,
                  gradient_accumulation_steps=1, num_generations=8,
                  max_completion_length=64, max_steps=6),
    "default": dict(model="smollm2-135m", dataset=TASK, max_steps=3),  # the rest: the embedded CPU default
    "full": dict(model="smollm2-135m", dataset=TASK, n_train=1024, per_device_train_batch_size=64,
                 gradient_accumulation_steps=1,
                 max_completion_length=512, max_steps=8, bf16=True),
}
ROUNDS = {"quick": 3, "default": 1, "full": 2}
WARMUP = {"quick": 1, "default": 1, "full": 2}
# Logged per step by both trainers; compared value by value.
COMPARED = ("loss", "reward", "reward_std", "grad_norm", "entropy", "completions/mean_length", "clip_ratio/region_mean")


def run_one(kind: str, settings: dict) -> dict:
    """kind: 'tapo-off' (TAPOTrainer, algorithm=grpo) or 'trl' (GRPOTrainer with the same explicit settings)."""
    reset_peak_rss()
    run, config, explicit = make_config({**settings, "algorithm": "grpo"})
    cls = None
    if kind == "trl":
        fields = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
        config, cls = GRPOConfig(**{k: v for k, v in explicit.items() if k in fields}), GRPOTrainer
    clock = StepClock()
    trainer = build_trainer(run, config, load_train_set(run, config.seed), callbacks=[clock], trainer_cls=cls)
    trainer.train()
    logs = [{k: r[k] for k in COMPARED if k in r} | {"step": r["step"]} for r in trainer.state.log_history if "loss" in r]
    return {"step_s": [s["wall_s"] for s in clock.steps], "logs": logs, "peak_rss_gib": peak_rss_gib()}


def max_abs_diffs(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Per metric: max over steps of |a - b| (NaN on both sides counts as equal)."""
    out = {}
    for key in COMPARED:
        diffs = [abs(x[key] - y[key]) for x, y in zip(a, b, strict=True) if key in x and key in y
                 and not (math.isnan(x[key]) and math.isnan(y[key]))]
        if diffs:
            out[key] = max(diffs)
    return out


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--rounds", type=int, help="A/B rounds (alternating order)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, help="leading steps of each run left out of the timing")
    args = parser.parse_args()
    mode_name = args.mode or "default"
    set_threads(args.threads)
    settings = {**MODES[mode_name], "logging_steps": 1, **parse_settings(args.set)}
    if args.steps:
        settings["max_steps"] = args.steps
    rounds = args.rounds or ROUNDS[mode_name]
    warmup = WARMUP[mode_name] if args.warmup is None else args.warmup
    warm_verifier()
    where = machine()
    print(f"parity, mode {mode_name}, {where}")

    runs = {"tapo-off": [], "trl": []}
    for r in range(rounds):
        for kind in (("tapo-off", "trl") if r % 2 == 0 else ("trl", "tapo-off")):
            print(f"round {r + 1}/{rounds}: {kind}", flush=True)
            runs[kind].append(run_one(kind, settings))
            print(f"  step times {[round(t, 2) for t in runs[kind][-1]['step_s']]}, peak RSS "
                  f"{runs[kind][-1]['peak_rss_gib']:.2f} GiB", flush=True)

    def timed(run):
        return statistics.fmean(run["step_s"][warmup:] or run["step_s"])

    ratios = [timed(a) / timed(b) for a, b in zip(runs["tapo-off"], runs["trl"], strict=True)]
    diffs = max_abs_diffs(runs["tapo-off"][0]["logs"], runs["trl"][0]["logs"])
    result = {
        "mode": mode_name, "machine": where, "settings": settings, "rounds": rounds, "warmup_steps": warmup,
        "step_time_ratio_median": statistics.median(ratios), "step_time_ratio_per_round": ratios,
        "mean_step_s": {k: statistics.fmean(timed(r) for r in v) for k, v in runs.items()},
        "peak_rss_gib": {k: max(r["peak_rss_gib"] for r in v) for k, v in runs.items()},
        "max_abs_diff_first_run": diffs, "runs": runs,
    }
    print(f"\nstep time TAPOTrainer(TAPO off) / GRPOTrainer: median {result['step_time_ratio_median']:.3f} "
          f"(per round {', '.join(f'{x:.3f}' for x in ratios)}); mean s/step "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["mean_step_s"].items()) + "; peak RSS GiB "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["peak_rss_gib"].items()))
    print(f"max |diff| over {len(runs['trl'][0]['logs'])} logged steps: "
          + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    write_json(RESULTS / f"parity_{mode_name}.json", result)
    print(f"wrote {RESULTS / f'parity_{mode_name}.json'}")


if __name__ == "__main__":
    main()
