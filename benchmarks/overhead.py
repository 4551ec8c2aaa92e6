"""What does TAPO cost per training step? GRPO vs TAPO (constructor "splice" and "self") on the same batches.

Every arm trains the same model from the same seed on the same prompts with learning_rate=0, so the policy never
moves and GRPO and TAPO-splice sample identical rollouts (TAPO-self draws extra samples for its syntheses, so its
later rollouts differ in the draw, not in distribution). With --rounds R every arm runs R times in alternating order
(A B C, C B A, ...) and the TAPO/GRPO ratio is the median over rounds, so a machine whose load drifts (other jobs)
weighs on both sides of each ratio. Trainer methods are wrapped with timers (on the class, in
this process only; tapo is not modified) and each step's wall time is split into:

  rollout generation   TRL's _generate_single_turn for the K rollouts
  scoring              the reward functions (math-verify) on the rollouts
  construction         everything in TAPOTrainer._attach_constructions: DCS, synthesis generation (constructor
                       "self"), parsing + assembly + tokenization, re-verification, old/ref log-probs of the new rows
  loss + backward      compute_loss (GRPO loss and L_ref forward) and accelerator.backward
  other                TRL bookkeeping (prompt tokenization, advantages, logging), optimizer step

    python benchmarks/overhead.py --quick        # tiny model: pipeline check (it never solves a problem, so no
                                                 # construction happens), ~1 min
    python benchmarks/overhead.py                # SmolLM2-135M, CPU
    python benchmarks/overhead.py --full         # SmolLM2-135M, GPU, bigger batches
"""

from __future__ import annotations

import statistics

from common import (
    RESULTS,
    TASK,
    benchmark_parser,
    SectionTimer,
    StepClock,
    machine,
    make_config,
    parse_settings,
    peak_rss_gib,
    reset_peak_rss,
    set_threads,
    timed_targets,
    warm_verifier,
    write_json,
)

from tapo.run import build_trainer, load_train_set

MODES = {
    "quick": dict(model="tiny", dataset=TASK, n_train=64, per_device_train_batch_size=16,
                  gradient_accumulation_steps=1, num_generations=8,
                  max_completion_length=64, synthesis_max_tokens=128, max_steps=4),
    "default": dict(model="smollm2-135m", dataset=TASK, max_steps=3),  # the rest: the embedded CPU default
    "full": dict(model="smollm2-135m", dataset=TASK, n_train=1024, per_device_train_batch_size=64,
                 gradient_accumulation_steps=1,
                 max_completion_length=512, synthesis_max_tokens=1024, max_steps=8, bf16=True),
}
WARMUP = {"quick": 1, "default": 1, "full": 2}
ROUNDS = {"quick": 2, "default": 1, "full": 2}
ARMS = {
    "grpo": dict(algorithm="grpo"),
    "tapo-splice": dict(algorithm="tapo", constructor="splice"),
    "tapo-self": dict(algorithm="tapo", constructor="self"),
}
GROUPS = ("rollout generation", "scoring", "construction", "loss + backward", "other")


def section_name(path: tuple[str, ...]) -> str:
    """Which part of a step a timed call path belongs to ("group: detail")."""
    names = set(path)
    if "_attach_constructions" in names:
        if "_generate_single_turn" in names:
            return "construction: synthesis generation"
        if "_calculate_rewards" in names:
            return "construction: re-verification"
        if "_get_per_token_logps_and_entropies" in names:
            return "construction: old/ref log-probs"
        return "construction: DCS + parse + assemble + tokenize"
    if "_generate_single_turn" in names:
        return "rollout generation: generate"
    if "_calculate_rewards" in names:
        return "scoring: reward functions"
    if "backward" in names:  # also L_GRPO's backward run inside compute_loss (TrainerBase._backward_first)
        return "loss + backward: backward"
    if "_ref_loss" in names:
        return "loss + backward: L_ref forward"
    if "compute_loss" in names:
        return "loss + backward: GRPO loss forward"
    if "_generate_and_score_completions" in names:
        return "other: TRL generation bookkeeping"
    return "other: training_step rest"


def split_step(step: dict) -> dict[str, float]:
    """{section detail: seconds} for one step; what no timed call covers is the optimizer step and callbacks."""
    out: dict[str, float] = {}
    for path, seconds in step["sections"].items():
        name = section_name(path)
        out[name] = out.get(name, 0.0) + seconds
    out["other: optimizer step + callbacks"] = step["wall_s"] - sum(step["sections"].values())
    return out


def run_arm(settings: dict, warmup: int) -> dict:
    """One fresh trainer, timed; the steps after the first `warmup` ones (all of them if there are no more), and the
    process's peak resident memory during the arm (GiB; memory an earlier arm freed to the allocator counts too)."""
    reset_peak_rss()
    timer = SectionTimer()
    with timer.patch(timed_targets()):
        run, config, _ = make_config(settings)
        clock = StepClock(timer)
        trainer = build_trainer(run, config, load_train_set(run, config.seed), callbacks=[clock])
        trainer.train()
    first = warmup if len(clock.steps) > warmup else 0
    logs = [r for r in trainer.state.log_history if "reward" in r and r["step"] > first]
    return {"steps": [{"step": s["step"], "wall_s": s["wall_s"], "split": split_step(s)} for s in clock.steps[first:]],
            "logs": logs, "peak_rss_gib": peak_rss_gib()}


def summarize(arm: dict) -> dict:
    """Mean seconds per measured step: wall, per group and per detail section."""
    measured = arm["steps"]
    details: dict[str, float] = {}
    for s in measured:
        for name, seconds in s["split"].items():
            details[name] = details.get(name, 0.0) + seconds / len(measured)
    groups = {g: sum(v for k, v in details.items() if k.split(":")[0] == g) for g in GROUPS}
    logs = arm["logs"]

    def mean_log(key):
        values = [r[key] for r in logs if isinstance(r.get(key), (int, float))]
        return statistics.fmean(values) if values else None

    # TAPO's own work, timed inside the same run (so immune to how loaded the machine was in another arm's run);
    # the backward pass through the L_ref rows is inside the shared backward call and is not in it.
    tapo_own = sum(v for k, v in details.items() if k.startswith("construction") or k.endswith("L_ref forward"))
    wall = statistics.fmean(s["wall_s"] for s in measured)
    return {"n_measured": len(measured), "wall_s": wall, "peak_rss_gib": max(arm["peak_rss_gib"]), "tapo_own_s": tapo_own,
            "within_run_ratio_lower_bound": wall / (wall - tapo_own),
            "wall_s_each": [s["wall_s"] for s in measured], "groups": groups, "details": details,
            "mean_completion_tokens": mean_log("completions/mean_length"),
            "constructions_attempted": mean_log("tapo/constructions_attempted"),
            "constructions_accepted": mean_log("tapo/constructions_accepted"), "reward": mean_log("reward")}


def print_report(summary: dict) -> None:
    base = summary["grpo"]["wall_s"]
    print(f"\n{'arm':<12} {'s/step':>8} {'ratio':>6} {'peak GiB':>8}  " + "  ".join(f"{g:>18}" for g in GROUPS))
    for name, s in summary.items():
        print(f"{name:<12} {s['wall_s']:8.2f} {s['wall_s'] / base:6.2f} {s['peak_rss_gib']:8.2f}  "
              + "  ".join(f"{s['groups'][g]:8.2f} ({s['groups'][g] / s['wall_s']:4.0%})" for g in GROUPS))
    for name, s in summary.items():
        if name != "grpo":
            print(f"{name}: TAPO's own work (construction + L_ref forward) {s['tapo_own_s']:.2f} s/step -> within-run "
                  f"ratio >= {s['within_run_ratio_lower_bound']:.3f} (L_ref backward not included)")
    for name, s in summary.items():
        extra = (f", constructions attempted/accepted per step {s['constructions_attempted']:.1f}/"
                 f"{s['constructions_accepted']:.1f}" if s["constructions_attempted"] is not None else "")
        print(f"\n{name}: {s['n_measured']} measured step(s), rollout length {s['mean_completion_tokens']}, "
              f"reward {s['reward']}{extra}")
        for detail, seconds in sorted(s["details"].items(), key=lambda kv: -kv[1]):
            print(f"  {detail:<52} {seconds:8.3f} s")


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--steps", type=int, help="optimizer steps per arm (warm-up included)")
    parser.add_argument("--warmup", type=int, help="leading steps of each run left out of the means")
    parser.add_argument("--rounds", type=int, help="runs per arm, in alternating order (A B C, C B A, ...)")
    args = parser.parse_args()
    mode_name = args.mode or "default"
    set_threads(args.threads)
    warmup = WARMUP[mode_name] if args.warmup is None else args.warmup
    rounds = args.rounds or ROUNDS[mode_name]
    base = {**MODES[mode_name], "learning_rate": 0.0, "logging_steps": 1, **parse_settings(args.set)}
    if args.steps:
        base["max_steps"] = args.steps
    warm_verifier()
    where = machine()
    print(f"overhead, mode {mode_name}, {where}")

    names = ["grpo", *[a for a in args.arms if a != "grpo"]]  # GRPO is the baseline of every ratio
    arms = {name: {"steps": [], "logs": [], "peak_rss_gib": []} for name in names}
    round_means = {name: [] for name in names}  # a machine shared with other jobs drifts: ratios are per round
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            print(f"\n=== {name} (round {r + 1}/{rounds})", flush=True)
            result = run_arm({**base, **ARMS[name]}, warmup)
            arms[name]["steps"] += result["steps"]
            arms[name]["logs"] += result["logs"]
            arms[name]["peak_rss_gib"].append(result["peak_rss_gib"])
            round_means[name].append(statistics.fmean(s["wall_s"] for s in result["steps"]))
            print(f"{name}: {round_means[name][-1]:.2f} s/step, peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
    summary = {name: summarize(arm) for name, arm in arms.items()}
    print_report(summary)
    ratios = {name: statistics.median(a / g for a, g in zip(round_means[name], round_means["grpo"], strict=True))
              for name in names}
    print("\nTAPO/GRPO step time, median over rounds: " + ", ".join(f"{n} {x:.3f}" for n, x in ratios.items()))
    write_json(RESULTS / f"overhead_{mode_name}.json", {
        "mode": mode_name, "machine": where, "settings": base, "warmup_steps": warmup, "rounds": rounds,
        "ratio_vs_grpo": ratios, "round_mean_step_s": round_means, "summary": summary,
        "steps": {n: a["steps"] for n, a in arms.items()}})
    print(f"\nwrote {RESULTS / f'overhead_{mode_name}.json'}")


if __name__ == "__main__":
    main()
