"""The learning testbed: does TAPO beat GRPO? Many seeds, hundreds of steps, a policy small enough for a CPU.

Task: step-checkable arithmetic chains (tapo.arith, dataset spec `arith:...`), a held-out set from the test hash
partition (disjoint from every training draw). Policy: a ~1.4M-parameter Llama with a local tokenizer (numbers and
words as tokens), pre-trained in-process to a sampled accuracy of ~30% with step errors at varied steps, plus
synthesis-format examples (the cold start), cached by a hash of its settings (tapo.arith_policy).

Every arm is a real `tapo train` run: the options go through `tapo.cli.parse_train_args` (the embedded default < this
size's settings < the arm's options < the chosen learning rate), the trainer is `tapo.run.build_trainer`, the one
factory `tapo train` uses. An arm is named by its options, so new TAPOConfig options need no code here:
    grpo                         --algorithm grpo
    tapo                         --algorithm tapo (the embedded default's constructor, splice)
    tapo:constructor=self        the policy writes its own syntheses (the pre-training held its cold start)
    tapo:ref_baseline=ref        ... any `tapo train` option as key=value, comma-separated
    tapo:learning_rate=1e-4      a named rate replaces the swept one (a control for the rate itself)
    opsd                         --algorithm opsd

Per run, every `eval_every` steps, on the held-out set (fixed sampling seeds: every arm is graded on the same draws):
  greedy    share of problems whose greedy answer is correct
  avg@k     mean over problems of the share of k samples (RL temperature) that are correct
  dsr, err  tapo eval's DSR / ERR (tapo.evaluation.metrics.reflection_metrics) over those k samples
plus the training wall-clock (evaluation excluded) and trained tokens (prompt + completion tokens of the rollouts, as
TRL counts them, plus the tokens of accepted constructed rows). Per arm and seed: final values and the area under the
greedy curve (mean greedy accuracy over training, trapezoid rule). Summary: paired (same seed) differences to GRPO with
95% bootstrap confidence intervals over seeds, and whether each excludes 0; `--reference ARM` adds the same table
against another arm (e.g. one that runs at the learning rate of the arms it is compared with).

Learning rates: `--sweep` first runs every arm at each of the size's learning rates on separate seeds and keeps, per
arm, the one with the best mean area under the curve; the main runs use it. An arm that names a rate
(`tapo:learning_rate=1e-4`) runs at that rate instead.

Resumable and parallel: each (arm, learning rate, seed) job's result is merged into the results file under a file
lock as soon as it ends; a rerun skips finished jobs. `--jobs N` runs N jobs at once as child processes with one
torch thread each (on a GPU machine they share the GPU: the policy is tiny).

    python benchmarks/testbed.py --smoke              # plumbing check, < 2 minutes (run by the test suite)
    python benchmarks/testbed.py --policy-only        # pre-train (or load) the default policy, measure it, stop
    python benchmarks/testbed.py --sweep --jobs 2     # the default size, learning rates first
    python benchmarks/testbed.py --size full --sweep --jobs 16   # a 16-core / GPU machine
    python benchmarks/testbed.py --reference tapo:ref_baseline=ref   # also paired differences to another arm
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, StepClock, machine, make_config, set_threads, write_json
from transformers import TrainerCallback

from tapo import arith
from tapo.arith_policy import (
    PolicySettings,
    opsd_teacher_accuracy,
    pretrain_stats,
    pretrained_policy,
    self_synthesis_acceptance,
)
from tapo.core.verify import extract_answer, is_correct
from tapo.evaluation.generate import TransformersSampler, prompt_ids
from tapo.evaluation.metrics import reflection_metrics
from tapo.run import build_trainer, load_train_set
from tapo.evaluation.reflection import analyze_reflection, marker_pattern

# What every arm trains with, over the embedded default: 4 queries x K=8 rollouts per optimizer step (one batch, no
# accumulation), the RL temperature the policy was pre-trained for, room for a splice reflection (~20 tokens with the
# policy's number and word tokens) and for a synthesis (~100 tokens).
TRAIN = dict(num_generations=8, per_device_train_batch_size=32, gradient_accumulation_steps=1, max_completion_length=48,
             ref_max_length=112, synthesis_max_tokens=160, temperature=1.0, lr_scheduler_type="constant",
             warmup_steps=0, beta=0.0, logging_steps=1, n_pos=1, n_neg=2, m_max=4)
# 3-4 one-digit terms with + and -: a ~1.4M-parameter policy learns the format and most steps in ~200 pre-training
# steps (a few CPU minutes) and keeps slipping (injected errors + what it has not learnt yet) at varied steps.
TASK = "arith:terms=3-4,ops=+-,max=9"
# The cold start (after the main phase reaches the target): 1500 steps cycling three synthesis batches, one OPSD
# teacher batch and one solution batch (25% of them correct: the annealed policy's sampled accuracy ends in the band).
POLICY = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, batch_size=64, error_rate=0.5,
              synthesis_every=8, synthesis_batch_size=8, max_steps=2000, check_every=50, target_accuracy=0.3,
              n_check=128, max_new_tokens=48, cold_start_steps=1500,
              cold_start_cycle="synthesis,synthesis,synthesis,teacher,solution", teacher_batch_size=32,
              cold_start_error_rate=0.75)
# The testbed's controls and ablations (ablation seeds), beside the main arms GRPO, TAPO splice and TAPO self.
ABLATIONS = ["tapo:ref_baseline=ref", "tapo:ots_enabled=false", "tapo:construction_control=no_prefix",
             "tapo:construction_control=no_reflection", "tapo:cut=after_error", "tapo:ref_baseline=union",
             "tapo:ref_loss_weight=0.5", "opsd", "tapo:learning_rate=1e-4"]  # the last: TAPO at GRPO's swept rate
SIZES = {
    "smoke": dict(task=TASK, n_train=64, n_eval=16, k=2, eval_every=2, steps=2,
                  train=dict(per_device_train_batch_size=16, num_generations=4),
                  policy=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_steps=4,
                              check_every=4, n_check=8, batch_size=8, synthesis_every=2, synthesis_batch_size=2,
                              teacher_batch_size=4, cold_start_steps=3, cold_start_cycle="synthesis,teacher,solution",
                              max_new_tokens=48),
                  seeds=[0], ablation_seeds=[0], sweep_seeds=[100], learning_rates=[1e-4, 1e-3],
                  arms=["grpo", "tapo", "tapo:constructor=self"]),
    # The size: 8 seeds of the main arms, 4 of the others, 200 steps, 256 held-out problems; the learning-rate
    # sweep runs 100 steps on its own seed (the area under the first half of the curve picks the rate).
    "default": dict(task=TASK, n_train=4096, n_eval=256, k=4, eval_every=50, steps=200, train={}, policy=POLICY,
                    seeds=list(range(8)), ablation_seeds=list(range(4)), sweep_seeds=[100], sweep_steps=100,
                    learning_rates=[3e-5, 1e-4, 3e-4], arms=["grpo", "tapo", "tapo:constructor=self", *ABLATIONS]),
    # A GPU or many-core machine: twice the seeds and steps, a harder task (more terms, bigger numbers, *).
    "full": dict(task="arith:terms=3-6,ops=+-*,max=20,mul_max=5", n_train=8192, n_eval=512, k=8, eval_every=25,
                 steps=400, train={}, policy={**POLICY, "hidden_size": 256, "num_layers": 6, "intermediate_size": 1024},
                 seeds=list(range(16)), ablation_seeds=list(range(8)), sweep_seeds=[100, 101, 102],
                 learning_rates=[1e-4, 3e-4, 1e-3, 3e-3], arms=["grpo", "tapo", "tapo:constructor=self", *ABLATIONS]),
}
MAIN_ARMS = ("grpo", "tapo", "tapo:constructor=self")  # get `seeds`; the other arms get `ablation_seeds`
SWEPT_ARMS = (*MAIN_ARMS, "opsd")  # `--sweep` chooses their learning rates; the tapo:... variants inherit tapo's
EVAL_SEED = 1234
BOOTSTRAP_DRAWS = 10_000


def arm_settings(arm: str) -> dict:
    """'tapo:ref_baseline=ref,ots_enabled=false' -> {'algorithm': 'tapo', 'ref_baseline': 'ref', ...} (strings: the
    CLI parser converts and checks them, so a misspelt option fails with its list of valid ones)."""
    algorithm, _, options = arm.partition(":")
    settings = {"algorithm": algorithm}
    for pair in filter(None, options.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"arm {arm!r}: {pair!r} is not key=value")
        settings[key] = value
    return settings


def job_id(arm: str, lr: float, seed: int) -> str:
    return f"{arm}|lr={lr:g}|seed={seed}"


def parse_job_id(job: str) -> tuple[str, float, int]:
    arm, lr, seed = job.split("|")
    return arm, float(lr.removeprefix("lr=")), int(seed.removeprefix("seed="))


class HeldOut:
    """Greedy, avg@k, DSR and ERR on the held-out problems, batched, from fixed seeds; the caller's RNG is untouched."""

    def __init__(self, rows: list[dict], tokenizer, k: int, temperature: float, max_tokens: int, batch_size: int = 256):
        self.rows, self.tokenizer, self.k = rows, tokenizer, k
        self.temperature, self.max_tokens, self.batch_size = temperature, max_tokens, batch_size
        self.prompts = [prompt_ids(tokenizer, r["problem"]) for r in rows]
        self.pattern = marker_pattern()

    def _texts(self, sampler, repeats: int) -> list[list[str]]:
        items = [i for i in range(len(self.prompts)) for _ in range(repeats)]
        texts = [[] for _ in self.prompts]
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            outs = sampler.generate([self.prompts[i] for i in batch], batch_seed=EVAL_SEED + start, sample_seeds=[0] * len(batch))
            for i, out in zip(batch, outs, strict=True):
                texts[i].append(out.text)
        return texts

    def __call__(self, model) -> dict:
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            greedy = self._texts(TransformersSampler(model, self.tokenizer, self.max_tokens, 0.0, 1.0), 1)
            sampled = self._texts(TransformersSampler(model, self.tokenizer, self.max_tokens, self.temperature, 1.0), self.k)
        model.train(was_training)
        golds = [r["answer"] for r in self.rows]
        greedy_correct = [is_correct(t[0], g) for t, g in zip(greedy, golds, strict=True)]
        samples = []
        for texts, gold in zip(sampled, golds, strict=True):
            for text in texts:
                correct = is_correct(text, gold)
                reflection = analyze_reflection(text, gold, extract_answer(text), correct, self.pattern)
                samples.append({"correct": correct, "reflection": {"reflected": reflection.reflected,
                                                                   "first_correct": reflection.first_correct}})
        reflections = reflection_metrics(samples)
        return {"greedy": statistics.fmean(greedy_correct), "avg@k": statistics.fmean(s["correct"] for s in samples),
                "dsr": reflections["dsr"]["value"], "err": reflections["err"]["value"],
                "reflection_rate": reflections["reflection_rate"]["value"], "eval_s": time.perf_counter() - start}


class Curve(TrainerCallback):
    """Held-out metrics every `every` steps and at the end, with the training wall-clock and trained tokens so far.
    Added after the StepClock, so the evaluation's own time is not in the step times."""

    def __init__(self, evaluate: HeldOut, every: int, clock: StepClock, start: dict):
        self.evaluate, self.every, self.clock, self.points = evaluate, every, clock, [start]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        logs = [r for r in state.log_history if "num_tokens" in r]
        constructed = sum(r.get("tapo/constructed_tokens", 0.0) for r in logs)
        point = {"step": state.global_step, "train_s": sum(s["wall_s"] for s in self.clock.steps),
                 "tokens": (logs[-1]["num_tokens"] if logs else 0) + constructed, **self.evaluate(model)}
        self.points.append(point)
        print(f"    step {point['step']}: greedy {point['greedy']:.3f}  avg@k {point['avg@k']:.3f}  "
              f"({point['train_s']:.0f} s training)", flush=True)


def area_under_curve(points: list[dict], metric: str = "greedy") -> float:
    """Mean of `metric` over training: trapezoid rule over steps, divided by the last step."""
    steps = [p["step"] for p in points]
    values = [p[metric] for p in points]
    if steps[-1] == 0:
        return values[-1]
    return float(np.trapezoid(values, steps) / steps[-1])


def run_job(job: str, spec: dict, policy: str, held_out: list[dict], base: dict) -> dict:
    """One `tapo train` run of an arm at a learning rate and seed, with its held-out curve."""
    arm, lr, seed = parse_job_id(job)
    steps = spec.get("sweep_steps", spec["steps"]) if seed in spec["sweep_seeds"] else spec["steps"]
    settings = {**TRAIN, **spec["train"], "model": policy, "dataset": spec["task"], "n_train": spec["n_train"],
                "max_steps": steps, **arm_settings(arm), "learning_rate": lr, "seed": seed}
    run, config, _ = make_config(settings)
    train_set = load_train_set(run, config.seed)
    clock = StepClock()
    trainer = build_trainer(run, config, train_set, callbacks=[clock])
    evaluate = HeldOut(held_out, trainer.processing_class, spec["k"], config.temperature, config.max_completion_length)
    curve = Curve(evaluate, spec["eval_every"], clock, {"step": 0, "train_s": 0.0, "tokens": 0, **base})
    trainer.add_callback(curve)
    start = time.perf_counter()
    trainer.train()
    keep = ("step", "reward", "tapo/accuracy", "tapo/constructions_attempted", "tapo/constructions_accepted",
            "tapo/parse_rate", "tapo/accept_rate", "tapo/constructed_tokens", "num_tokens")
    logs = [{k: v for k, v in r.items() if k in keep or k.startswith("tapo/rejected_")}
            for r in trainer.state.log_history if "reward" in r]
    step_s = [s["wall_s"] for s in clock.steps]
    final = curve.points[-1]
    return {"arm": arm, "lr": lr, "seed": seed, "curve": curve.points, "train_logs": logs,
            "final": {m: final[m] for m in ("greedy", "avg@k", "dsr", "err")},
            "auc": {m: area_under_curve(curve.points, m) for m in ("avg@k", "greedy")},
            "step_s": statistics.fmean(step_s), "train_s": sum(step_s), "tokens": final["tokens"],
            "wall_s": time.perf_counter() - start, "machine": machine()}


def bootstrap_ci(values: list[float], draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile interval of the mean, resampling the values (one per seed) with replacement; None below 2."""
    if len(values) < 2:
        return None
    data = np.asarray(values, dtype=float)
    means = data[np.random.default_rng(seed).integers(0, len(data), (draws, len(data)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


SWEEP_METRIC = "avg@k"  # the learning rate is chosen by the area under this curve


def chosen_learning_rates(jobs: dict, spec: dict, arms: list[str]) -> dict:
    """Per arm, the swept learning rate with the best mean AUC of SWEEP_METRIC over the sweep seeds (arms not swept:
    absent)."""
    out = {}
    for arm in arms:
        by_lr = {}
        for result in jobs.values():
            if result["arm"] == arm and result["seed"] in spec["sweep_seeds"]:
                by_lr.setdefault(result["lr"], []).append(result["auc"][SWEEP_METRIC])
        complete = {lr: aucs for lr, aucs in by_lr.items() if len(aucs) == len(spec["sweep_seeds"])}
        if len(complete) == len(spec["learning_rates"]):
            out[arm] = max(complete, key=lambda lr: statistics.fmean(complete[lr]))
    return out


def arm_learning_rate(arm: str, lrs: dict, default: float) -> float:
    """The rate an arm names (`tapo:learning_rate=1e-4`: a control for the rate itself); else its swept rate; a
    `tapo:...` variant that was not swept runs at the rate of the arm it varies (`tapo`), so an ablation differs from it
    in its one option only; else the size's middle rate."""
    pinned = arm_settings(arm).get("learning_rate")
    if pinned is not None:
        return float(pinned)
    return lrs.get(arm, lrs.get(arm.partition(":")[0], default))


# avg@k (sampled at the RL temperature) is the primary metric: it is what the reward measures and what RL moves; the
# policy's greedy answer is right far more often (its slips are sampled), so greedy accuracy starts high and moves less.
METRICS = ("final_avg@k", "auc_avg@k", "final_greedy", "auc_greedy", "final_dsr", "final_err")


def _metric(result: dict, name: str) -> float | None:
    if name.startswith("auc_"):
        return result["auc"][name.removeprefix("auc_")]
    return result["final"][name.removeprefix("final_")]


def value_at(points: list[dict], x_key: str, x: float, metric: str) -> float:
    """`metric` of a curve at `x` (e.g. training seconds), linear between evaluations; past the curve's end its last
    value (the run had stopped), before its start its first."""
    return float(np.interp(x, [p[x_key] for p in points], [p[metric] for p in points]))


def paired_difference(diffs: list[float]) -> dict:
    ci = bootstrap_ci(diffs)
    return {"mean": statistics.fmean(diffs), "ci95": ci, "n": len(diffs),
            "excludes_0": ci is not None and (ci[0] > 0 or ci[1] < 0)}


def summarize(jobs: dict, lrs: dict, spec: dict, reference: str = "grpo") -> dict:
    """Per arm (its chosen learning rate, evaluation seeds only): means, and paired differences to `reference` (GRPO,
    or another arm: e.g. one at the same learning rate) with 95% bootstrap intervals over the seeds both arms have."""
    eval_seeds = set(spec["seeds"]) | set(spec["ablation_seeds"])
    by_arm: dict[str, dict[int, dict]] = {}
    for result in jobs.values():
        lr = arm_learning_rate(result["arm"], lrs, spec["default_lr"])
        if result["seed"] in eval_seeds and result["lr"] == lr:
            by_arm.setdefault(result["arm"], {})[result["seed"]] = result
    base = by_arm.get(reference, {})
    summary = {}
    for arm, by_seed in by_arm.items():
        row = {"lr": arm_learning_rate(arm, lrs, spec["default_lr"]), "lr_swept": arm in lrs, "seeds": sorted(by_seed),
               "step_s": statistics.fmean(r["step_s"] for r in by_seed.values()),
               "tokens": statistics.fmean(r["tokens"] for r in by_seed.values())}
        for name in METRICS:
            values = [v for v in (_metric(r, name) for r in by_seed.values()) if v is not None]
            row[name] = statistics.fmean(values) if values else None
            pairs = [(_metric(r, name), _metric(base[s], name)) for s, r in by_seed.items() if s in base]
            diffs = [a - b for a, b in pairs if a is not None and b is not None]
            if arm != reference and diffs:
                row[f"{name} - {reference}"] = paired_difference(diffs)
        # Equal wall-clock: the arm's avg@k when it had trained as long as the reference's whole run (same seed).
        at_base_time = [value_at(r["curve"], "train_s", base[s]["curve"][-1]["train_s"], "avg@k")
                        - base[s]["final"]["avg@k"] for s, r in by_seed.items() if s in base]
        if arm != reference and at_base_time:
            row[f"avg@k at {reference}'s wall-clock - {reference}"] = paired_difference(at_base_time)
        summary[arm] = row
    return summary


def print_summary(summary: dict, reference: str = "grpo") -> None:
    shown = ("final_avg@k", "auc_avg@k", "final_greedy", f"avg@k at {reference}'s wall-clock")
    label = "GRPO" if reference == "grpo" else reference
    print(f"\n{'arm':<40} {'lr':>7} {'seeds':>5} {'avg@k':>6} {'AUC':>6} {'greedy':>6} {'s/step':>6}  "
          + "  ".join(f"{name + ' - ' + label + ' [95% CI]':<31}" for name in shown))
    for arm, row in summary.items():
        cells = []
        for name in shown:
            d = row.get(f"{name} - {reference}")
            if d is None:
                cells.append("")
            else:
                ci = "n<2" if d["ci95"] is None else f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                cells.append(f"{d['mean']:+.3f} {ci}{' *' if d['excludes_0'] else ''}")
        print(f"{arm:<40} {row['lr']:>7.0e} {len(row['seeds']):>5} {row['final_avg@k']:>6.3f} {row['auc_avg@k']:>6.3f} "
              f"{row['final_greedy']:>6.3f} {row['step_s']:>6.2f}  " + "  ".join(f"{c:<31}" for c in cells))
    print("(* : the 95% bootstrap interval of the paired difference excludes 0)")


def plot(jobs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8), squeeze=False)
    # One colour per arm (tab20: the default cycle repeats after 10 arms); GRPO, the reference, in black.
    others = iter(plt.get_cmap("tab20").colors)
    colours = {arm: "black" if arm == "grpo" else next(others) for arm in summary}
    for row_axes, metric in zip(axes, ("avg@k", "greedy")):
        for ax, x_key, label in zip(row_axes, ("step", "train_s", "tokens"),
                                    ("optimizer step", "training wall-clock (s)", "trained tokens")):
            for arm, row in summary.items():
                runs = [r for r in jobs.values() if r["arm"] == arm and r["lr"] == row["lr"] and r["seed"] in row["seeds"]]
                steps = sorted({p["step"] for r in runs for p in r["curve"]})
                points = [[p for r in runs for p in r["curve"] if p["step"] == s] for s in steps]
                ax.plot([statistics.fmean(p[x_key] for p in ps) for ps in points],
                        [statistics.fmean(p[metric] for p in ps) for ps in points], marker="o", markersize=3,
                        color=colours[arm], linewidth=2.5 if arm == "grpo" else 1.5, label=f"{arm} (n={len(runs)})")
            ax.set_xlabel(label)
            ax.set_ylabel(f"held-out {metric} (mean over seeds)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def same_experiment(a: dict | None, b: dict) -> bool:
    """Everything but the lists of seeds and arms is equal."""
    ignored = dict.fromkeys(("seeds", "ablation_seeds", "arms"))
    return a is not None and {**a, **ignored} == {**b, **ignored}


class Results:
    """The results file: one JSON, merged under a file lock so several processes can fill it."""

    def __init__(self, path: Path, spec: dict):
        self.path, self.spec = path, spec

    def load(self) -> dict:
        """What is on disk, if it is the same experiment (more seeds or arms are the same one, resumed)."""
        if not self.path.exists():
            return {}
        saved = json.loads(self.path.read_text())
        return saved if same_experiment(saved.get("spec"), self.spec) else {}

    def update(self, **fields) -> dict:
        """Adds `jobs` entries (and sets any other fields) on top of what is on disk; returns the merged content. A file
        of another experiment (other settings or policy) is not overwritten: it is renamed to
        `<name>.before-<time>.json` first, so no finished job is lost."""
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.load()
            if not data:
                if self.path.exists():
                    kept = self.path.with_name(f"{self.path.stem}.before-{time.strftime('%Y%m%d-%H%M%S')}.json")
                    os.replace(self.path, kept)
                    print(f"{self.path} held another experiment: kept as {kept}", flush=True)
                data = {"spec": self.spec, "jobs": {}}
            data["jobs"].update(fields.pop("jobs", {}))
            data.update(fields)
            write_json(self.path, data)
        return data


def size_spec(args) -> dict:
    spec = json.loads(json.dumps(SIZES[args.size]))
    spec["train"] = {**spec["train"], **dict(kv.split("=", 1) for kv in args.set)}
    for key in ("steps", "n_eval", "k", "eval_every"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    for key in ("seeds", "ablation_seeds", "arms", "learning_rates"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    spec["default_lr"] = spec["learning_rates"][len(spec["learning_rates"]) // 2]
    return spec


def held_out_rows(spec: dict) -> list[dict]:
    task = arith.ArithSpec.parse(spec["task"])
    test = arith.ArithSpec(**{**task.__dict__, "split": "test"})
    return arith.rows(test, spec["n_eval"], seed=0)


def self_synthesis(model, tokenizer, rows: list[dict], spec: dict, policy: str) -> dict:
    """`tapo.arith_policy.self_synthesis_acceptance` of the untrained policy on `rows` with the settings the
    `tapo:constructor=self` arm trains with (K, temperature, lengths, DCS, cut, prefix match: its parsed config)."""
    _, config, _ = make_config({**TRAIN, **spec["train"], "model": policy, "dataset": spec["task"],
                                **arm_settings("tapo:constructor=self")})
    return self_synthesis_acceptance(
        model, tokenizer, rows, k=config.num_generations, temperature=config.temperature,
        max_new_tokens=config.max_completion_length, synthesis_max_tokens=config.synthesis_max_tokens,
        ref_max_length=config.ref_max_length, n_pos=config.n_pos, n_neg=config.n_neg, m_max=config.m_max,
        cut=config.cut, prefix_match=config.prefix_match, seed=EVAL_SEED)


def describe_policy(saved: dict) -> str:
    """The startup log's line on the untrained policy: pre-training, held-out accuracy, OPSD teacher, self syntheses."""
    policy, base, teacher, synth = saved["policy"], saved["base"], saved["opsd_teacher"], saved["self_synthesis"]
    rejected = ", ".join(f"{reason} {n}" for reason, n in synth["rejected"].items() if n)
    return (f"policy {policy['folder']} ({policy['steps']} pre-training steps, {policy.get('cold_start_steps', 0)} of "
            f"them cold start, {policy['wall_s']:.0f} s; sampled accuracy {policy['sampled_accuracy']:.3f}, greedy "
            f"{policy['greedy_accuracy']:.3f})\n  held-out before RL: greedy {base['greedy']:.3f}, avg@k {base['avg@k']:.3f}"
            f"\n  as OPSD's teacher (correct solution in context): greedy {teacher['teacher_greedy']:.3f}, sampled "
            f"{teacher['teacher_sampled']:.3f} (plain prompt: {teacher['student_greedy']:.3f}, "
            f"{teacher['student_sampled']:.3f})\n  own syntheses (constructor=self): {synth['accepted']} of "
            f"{synth['attempted']} accepted ({synth['accept_rate']:.1%}; parsed {synth['parsed']}, rejected: "
            f"{rejected or 'none'}) from {synth['eligible_groups']} eligible groups of {synth['problems']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="default")
    parser.add_argument("--smoke", action="store_const", dest="size", const="smoke")
    parser.add_argument("--arms", nargs="+", help="arm specs (default: the size's)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds of the main arms (grpo, tapo, tapo self)")
    parser.add_argument("--ablation-seeds", nargs="+", type=int, help="seeds of the other arms")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--n-eval", type=int)
    parser.add_argument("--k", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra `tapo train` options, every arm")
    parser.add_argument("--reference", nargs="+", default=[], metavar="ARM",
                        help="also paired differences to these arms (saved under summary_vs; e.g. an arm at the "
                             "learning rate of the arms it is compared with)")
    parser.add_argument("--sweep", action="store_true", help="choose each arm's learning rate on the sweep seeds first")
    parser.add_argument("--sweep-only", action="store_true", help="run the sweep, print the chosen rates and stop")
    parser.add_argument("--learning-rates", nargs="+", type=float,
                        help="the sweep's rates (another set is another experiment: use another --out)")
    parser.add_argument("--jobs", type=int, default=1, help="jobs at once, as child processes with one thread each")
    parser.add_argument("--threads", type=int, help="torch CPU threads of this process")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of testbed[_SIZE].json / .png")
    parser.add_argument("--policy-only", action="store_true",
                        help="pre-train (or load) the policy, measure it before RL (stored in the results), stop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one job id, run by a parent with --jobs
    args = parser.parse_args(argv)
    set_threads(args.threads)
    spec = size_spec(args)
    name = "testbed" if args.size == "default" else f"testbed_{args.size}"
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out / f"{name}.json", spec)

    settings = PolicySettings(task=spec["task"], **spec["policy"])
    policy = str(pretrained_policy(settings))
    held_out = held_out_rows(spec)
    saved = results.load()
    if any(key not in saved for key in ("base", "opsd_teacher", "self_synthesis")):  # the untrained policy, once
        from tapo.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(policy)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        max_tokens = spec["train"].get("max_completion_length", TRAIN["max_completion_length"])
        if "base" not in saved:  # every curve starts here
            base = HeldOut(held_out, tokenizer, spec["k"], TRAIN["temperature"], max_tokens)(model)
            saved = results.update(base=base, policy={"folder": policy, **pretrain_stats(policy)}, machine=machine())
        if "opsd_teacher" not in saved:
            saved = results.update(opsd_teacher=opsd_teacher_accuracy(model, tokenizer, held_out, TRAIN["temperature"],
                                                                      max_tokens, seed=EVAL_SEED))
        if "self_synthesis" not in saved:  # the self arm's first syntheses: does the cold start make it a real arm?
            saved = results.update(self_synthesis=self_synthesis(model, tokenizer, held_out, spec, policy))
    if args.worker:
        results.update(jobs={args.worker: run_job(args.worker, spec, policy, held_out, saved["base"])})
        return 0
    print(f"testbed {args.size}: {describe_policy(saved)}", flush=True)
    if args.policy_only:
        return 0
    for arm in spec["arms"]:  # a misspelt option fails here, before any job starts
        make_config({**TRAIN, **spec["train"], "model": policy, "dataset": spec["task"], **arm_settings(arm)})

    def run_all(jobs: list[str]) -> dict:
        done = results.load().get("jobs", {})
        todo = [j for j in jobs if j not in done]
        print(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already done; running {len(todo)} ({args.jobs} at once)",
              flush=True)
        if args.jobs <= 1:
            for job in todo:
                print(job, flush=True)
                results.update(jobs={job: run_job(job, spec, policy, held_out, saved["base"])})
        else:
            script = str(Path(__file__).resolve())
            passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--sweep", "--sweep-only")]

            def child(job):
                command = [sys.executable, script, *passed, "--worker", job, "--threads", "1"]
                log = results.path.parent / f".{name}-{job.replace('|', '_').replace(':', '_')}.log"
                with open(log, "w") as out:
                    code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ}).returncode
                print(f"{job}: {'done' if code == 0 else f'FAILED (exit {code}, log {log})'}", flush=True)
                return code

            with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
                if any(code != 0 for code in pool.map(child, todo)):
                    raise SystemExit("some jobs failed; rerun to retry them (finished ones are kept)")
        return results.load()["jobs"]

    lrs = {}
    if args.sweep:
        swept = [a for a in spec["arms"] if a in SWEPT_ARMS]
        run_all([job_id(a, lr, s) for a in swept for lr in spec["learning_rates"] for s in spec["sweep_seeds"]])
        lrs = chosen_learning_rates(results.load()["jobs"], spec, swept)
        print(f"chosen learning rates: {lrs}", flush=True)
        if args.sweep_only:
            return 0
    lrs = {**results.load().get("learning_rates", {}), **lrs}
    results.update(learning_rates=lrs)  # kept, so a later run without --sweep (or with fewer arms) uses them
    # The main arms first, then the others, each seed-major: a cut-short run has the main comparison's first seeds
    # for every main arm, and every ablation of its first ablation seeds.
    main = [job_id(a, arm_learning_rate(a, lrs, spec["default_lr"]), s) for s in spec["seeds"] for a in spec["arms"]
            if a in MAIN_ARMS]
    others = [job_id(a, arm_learning_rate(a, lrs, spec["default_lr"]), s) for s in spec["ablation_seeds"]
              for a in spec["arms"] if a not in MAIN_ARMS]
    jobs = run_all(main + others)
    summary = summarize(jobs, lrs, spec)
    results.update(learning_rates=lrs, summary=summary)
    print_summary(summary)
    if args.reference:
        versus = {arm: summarize(jobs, lrs, spec, reference=arm) for arm in args.reference}
        results.update(summary_vs={**results.load().get("summary_vs", {}), **versus})
        for arm, table in versus.items():
            print_summary(table, reference=arm)
    plot(jobs, summary, args.out / f"{name}.png")
    print(f"wrote {results.path} and {args.out / f'{name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
