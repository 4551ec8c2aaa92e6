"""Peak resident memory and step time of one training run per arm: tapo, grpo, opsd (through `tapo train`'s own
parser and trainers) and TRL's own GRPOTrainer on the same settings (`trl_grpo`).

Every run is a fresh Python process, so its peak RSS (VmHWM: weights, gradients, AdamW state, activations, the
libraries, allocator slack) is its own. Steps are timed and split into phases with overhead.py's timers, and a thread samples the resident set every 5 ms
to say which step and phase reached the highest values (`rss_peaks_by_phase`). With
`--baseline KEY=VALUE ...` every arm also runs with those settings on top (e.g. the old embedded default), in
alternating order (new old, old new, ...), and the summary gives per arm the median step-time ratio new/old.

    python benchmarks/memory.py --quick                  # tiny model, pipeline check, ~1 min
    flock /tmp/smollm2.lock python benchmarks/memory.py  # SmolLM2-135M, embedded default, 1 step per arm
    flock /tmp/smollm2.lock python benchmarks/memory.py --arms tapo --steps 2 --rounds 2 \\
        --baseline per_device_train_batch_size=16 gradient_accumulation_steps=1   # vs the old default batch
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    RESULTS,
    TASK,
    RssTracer,
    SectionTimer,
    StepClock,
    benchmark_parser,
    machine,
    make_config,
    parse_settings,
    peak_rss_gib,
    set_threads,
    timed_targets,
    warm_verifier,
    write_json,
)

from tapo.run import build_trainer, load_train_set

MODES = {
    "quick": dict(model="tiny", dataset=TASK, n_train=64, max_completion_length=64, synthesis_max_tokens=128,
                  max_steps=2),
    "default": dict(model="smollm2-135m", dataset=TASK, max_steps=1),  # the rest: the embedded CPU default
    "full": dict(model="smollm2-135m", dataset=TASK, n_train=1024, per_device_train_batch_size=64,
                 gradient_accumulation_steps=1,
                 max_completion_length=512, synthesis_max_tokens=1024, max_steps=2, bf16=True),
}
ARMS = {
    "tapo": dict(algorithm="tapo"),
    "grpo": dict(algorithm="grpo"),
    "opsd": dict(algorithm="opsd"),
    "trl_grpo": dict(algorithm="grpo"),  # its settings, given to trl.GRPOTrainer / GRPOConfig
}


def run_child(arm: str, settings: dict) -> dict:
    """In the child process: one run, timed by phase; returns its peak RSS and step times."""
    from overhead import split_step

    warm_verifier()
    timer = SectionTimer()
    with timer.patch(timed_targets()):
        run, config, explicit = make_config({**settings, **ARMS[arm]})
        cls = None
        if arm == "trl_grpo":
            from trl import GRPOConfig, GRPOTrainer

            fields = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
            config, cls = GRPOConfig(**{k: v for k, v in explicit.items() if k in fields}), GRPOTrainer
        clock = StepClock(timer)
        trainer = build_trainer(run, config, load_train_set(run, config.seed), callbacks=[clock], trainer_cls=cls)
        with RssTracer(timer, clock) as tracer:
            trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return {"peak_rss_gib": peak_rss_gib(), "rss_peaks_by_phase": tracer.summary(),
            "step_s": [s["wall_s"] for s in clock.steps],
            "phases": [split_step(s) for s in clock.steps],
            "loss": [r["loss"] for r in logs], "grad_norm": [r.get("grad_norm") for r in logs],
            "reward": [r.get("reward") for r in logs]}


def spawn(arm: str, settings: dict, threads: int | None) -> dict:
    """One arm in a fresh process (its own peak RSS); the child's last stdout line is its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--settings", json.dumps(settings)]
    if threads:
        cmd += ["--threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs per arm and variant, in alternating order")
    parser.add_argument("--baseline", nargs="*", metavar="KEY=VALUE", help="settings of a second variant to compare")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run this one arm in this process
    parser.add_argument("--settings", help=argparse.SUPPRESS)  # internal: the child's settings as JSON
    args = parser.parse_args()
    set_threads(args.threads)
    if args.child:
        print(json.dumps(run_child(args.child, json.loads(args.settings))))
        return

    mode_name = args.mode or "default"
    settings = {**MODES[mode_name], "logging_steps": 1, **parse_settings(args.set)}
    if args.steps:
        settings["max_steps"] = args.steps
    variants = {"new": settings}
    if args.baseline is not None:
        variants["old"] = {**settings, **parse_settings(args.baseline)}
    where = machine()
    print(f"memory, mode {mode_name}, {where}")
    runs = {arm: {v: [] for v in variants} for arm in args.arms}
    out = RESULTS / f"memory_{mode_name}.json"
    for r in range(args.rounds):
        for arm in args.arms:
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for v in order:
                print(f"round {r + 1}/{args.rounds}: {arm} ({v})", flush=True)
                res = spawn(arm, variants[v], args.threads)
                runs[arm][v].append(res)
                print(f"  peak RSS {res['peak_rss_gib']:.2f} GiB, step s {[round(t, 1) for t in res['step_s']]}, "
                      f"loss {res['loss']}", flush=True)
                for peak in res["rss_peaks_by_phase"][:5]:
                    print(f"    step {peak['step']}: {peak['peak_rss_gib']:.2f} GiB in {peak['phase']}", flush=True)
                # Written after every run, so a long benchmark stopped early keeps the arms it finished.
                summary = summarize({a: vs for a, vs in runs.items() if all(vs.values())})
                write_json(out, {"mode": mode_name, "machine": where, "settings": settings, "variants": variants,
                                 "peak_rss_gib": {a: s["new"]["peak_rss_gib"] for a, s in summary.items()},
                                 "summary": summary, "runs": runs})
    print("\narm        variant  peak RSS GiB  median s/step")
    for arm, s in summary.items():
        for v in variants:
            print(f"{arm:<10} {v:<8} {s[v]['peak_rss_gib']:12.2f} {s[v]['median_step_s']:14.1f}")
        if "step_time_ratio_new_old_median" in s:
            print(f"{arm:<10} step time new/old: median {s['step_time_ratio_new_old_median']:.3f} per round "
                  f"{[round(x, 3) for x in s['step_time_ratio_new_old_per_round']]}")
    print(f"wrote {out}")


def summarize(runs: dict) -> dict:
    """Per arm and variant: the peak RSS over its runs and the median step time; with an "old" variant, the step-time
    ratio new/old of each round (runs paired in order) and its median."""
    summary = {}
    for arm, by_variant in runs.items():
        summary[arm] = {v: {"peak_rss_gib": max(x["peak_rss_gib"] for x in rs),
                            "median_step_s": statistics.median(t for x in rs for t in x["step_s"])}
                        for v, rs in by_variant.items()}
        if "old" in by_variant:
            ratios = [statistics.fmean(n["step_s"]) / statistics.fmean(o["step_s"])
                      for n, o in zip(by_variant["new"], by_variant["old"])]  # a stopped run: the rounds both finished
            summary[arm]["step_time_ratio_new_old_median"] = statistics.median(ratios)
            summary[arm]["step_time_ratio_new_old_per_round"] = ratios
    return summary


if __name__ == "__main__":
    main()
