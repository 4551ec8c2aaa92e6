"""Does TAPO beat GRPO at an equal number of optimizer steps? Held-out accuracy before, during and after training.

Every arm trains the same model on the same training split with the same seed for the same number of steps; only the
algorithm (or one TAPO switch) differs. Arms: "grpo", "tapo" (the embedded default: constructor splice,
ref_baseline orig, OTS on), the ablations "tapo:ref_baseline=ref", "tapo:ots_enabled=false",
"tapo:constructor=self", and "opsd" when `tapo.opsd` is installed. Each is exactly `tapo train --algorithm ... --key
value`, built through the CLI's parser (see common.py).

Held-out accuracy, measured on problems that are not in the training split every `--eval-every` steps by a callback:
  greedy   share of problems whose greedy answer is correct
  avg@k    mean over problems of the share of k samples (training temperature) that are correct
Both are generated with the training prompt (tapo.data.PROMPT_TEMPLATE in the chat template) and the training
completion budget, from fixed seeds (the same draws for every arm), and graded by tapo.core.verify.is_correct.
Results go to results/learning_<mode>.json (finished runs are kept: rerunning resumes; other seeds or arms, also from
concurrent processes, are added to the same file) and
results/learning_<mode>.png.

    python benchmarks/learning.py --quick     # tiny random model: proves the pipeline in minutes, learns nothing
    python benchmarks/learning.py             # SmolLM2-135M on CPU (slow: see README.md for a cut-down run)
    python benchmarks/learning.py --full      # SmolLM2-135M on a GPU, more steps, problems and seeds
"""

from __future__ import annotations

import fcntl
import json
import statistics
import time

import torch
from common import (
    RESULTS,
    TASK,
    benchmark_parser,
    load_split,
    machine,
    make_config,
    opsd_available,
    parse_settings,
    set_threads,
    write_json,
)
from transformers import TrainerCallback

from tapo.core.verify import is_correct
from tapo.evaluation.generate import TransformersSampler, prompt_ids
from tapo.evaluation.runner import derive_seed
from tapo.models import load_model_and_tokenizer
from tapo.run import build_trainer

MODES = {
    "quick": dict(train=dict(model="tiny", dataset=TASK, per_device_train_batch_size=8,
                             gradient_accumulation_steps=1, num_generations=4, n_pos=1, n_neg=2,
                             max_completion_length=32, synthesis_max_tokens=64, max_steps=4),
                  n_train=64, n_eval=8, k=2, eval_every=2, seeds=[0, 1]),
    "default": dict(train=dict(model="smollm2-135m", dataset=TASK), n_train=256, n_eval=64, k=4, eval_every=4,
                    seeds=[0, 1, 2]),  # training: the embedded CPU default (8 steps of 2 queries x 8 rollouts)
    "full": dict(train=dict(model="smollm2-135m", dataset=TASK, per_device_train_batch_size=64,
                            gradient_accumulation_steps=1, max_completion_length=256, synthesis_max_tokens=512,
                            max_steps=200, bf16=True),
                 n_train=4096, n_eval=256, k=8, eval_every=25, seeds=[0, 1, 2]),
}
ARMS = {
    "grpo": dict(algorithm="grpo"),
    "tapo": dict(algorithm="tapo"),
    "tapo:ref_baseline=ref": dict(algorithm="tapo", ref_baseline="ref"),
    "tapo:ots_enabled=false": dict(algorithm="tapo", ots_enabled=False),
    "tapo:constructor=self": dict(algorithm="tapo", constructor="self"),
    "opsd": dict(algorithm="opsd"),
}
EVAL_SEED = 1234  # the held-out sampling seeds are fixed: every arm and seed is graded on the same draws


class HeldOutEval:
    """greedy and avg@k on held-out problems for a model in memory; the caller's RNG state is left untouched."""

    def __init__(self, problems, tokenizer, k: int, temperature: float, max_tokens: int, batch_size: int):
        self.problems, self.tokenizer = problems, tokenizer
        self.k, self.temperature, self.max_tokens, self.batch_size = k, temperature, max_tokens, batch_size
        self.prompts = [prompt_ids(tokenizer, p) for p in problems["problem"]]

    def _correct(self, sampler, repeats: int) -> list[float]:
        """Share of correct samples per problem, `repeats` samples each."""
        items = [(i, s) for i in range(len(self.prompts)) for s in range(repeats)]
        hits = [0] * len(self.prompts)
        for b in range(0, len(items), self.batch_size):
            batch = items[b : b + self.batch_size]
            outs = sampler.generate([self.prompts[i] for i, _ in batch], batch_seed=derive_seed(EVAL_SEED, repeats, b),
                                    sample_seeds=[0] * len(batch))
            for (i, _), out in zip(batch, outs, strict=True):
                hits[i] += is_correct(out.text, self.problems["answer"][i])
        return [h / repeats for h in hits]

    def __call__(self, model) -> dict:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        with torch.random.fork_rng(devices=devices):  # training samples the same rollouts with or without evals
            greedy = self._correct(TransformersSampler(model, self.tokenizer, self.max_tokens, 0.0, 1.0), 1)
            sampled = self._correct(TransformersSampler(model, self.tokenizer, self.max_tokens, self.temperature, 1.0),
                                    self.k)
        model.train(was_training)
        return {"greedy": statistics.fmean(greedy), "avg@k": statistics.fmean(sampled),
                "eval_s": time.perf_counter() - start}


class EvalEvery(TrainerCallback):
    def __init__(self, evaluate: HeldOutEval, every: int, curve: list):
        self.evaluate, self.every, self.curve = evaluate, every, curve

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            point = {"step": state.global_step, **self.evaluate(model)}
            self.curve.append(point)
            print(f"    step {point['step']}: greedy {point['greedy']:.3f}  avg@k {point['avg@k']:.3f}", flush=True)


def train_arm(arm: str, seed: int, spec: dict, train_set, evaluate: HeldOutEval, base: dict) -> dict:
    run, config, _ = make_config({**spec["train"], **ARMS[arm], "seed": seed})
    curve = [{"step": 0, **base}]
    trainer = build_trainer(run, config, train_set, callbacks=[EvalEvery(evaluate, spec["eval_every"], curve)])
    start = time.perf_counter()
    trainer.train()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    keep = ("step", "reward", "loss", "tapo/accuracy", "tapo/eligible_frac", "tapo/constructions_attempted",
            "tapo/constructions_accepted", "tapo/parse_rate", "tapo/accept_rate", "tapo/loss_ref")
    return {"curve": curve, "train_logs": [{k: r[k] for k in keep if k in r} for r in logs],
            "wall_s": time.perf_counter() - start, "machine": machine()}


def same_setup(a: dict | None, b: dict) -> bool:
    """Runs are comparable when everything but the list of seeds is equal."""
    return a is not None and {**a, "seeds": None} == {**b, "seeds": None}


def merge_runs(runs: dict, saved: dict) -> None:
    """Add the saved (arm, seed) runs that `runs` does not have yet."""
    for arm, by_seed in saved.get("runs", {}).items():
        for seed, run in by_seed.items():
            runs.setdefault(arm, {}).setdefault(int(seed), run)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict) -> dict:
    """Per arm over seeds: final greedy / avg@k (mean, std), and the paired difference to GRPO on the same seeds."""
    out = {}
    for arm, by_seed in runs.items():
        final = {s: r["curve"][-1] for s, r in by_seed.items()}
        row = {"n_seeds": len(final), "final_step": next(iter(final.values()))["step"]}
        for metric in ("greedy", "avg@k"):
            row[metric] = mean_std([p[metric] for p in final.values()])
            paired = [final[s][metric] - runs["grpo"][s]["curve"][-1][metric] for s in final if s in runs.get("grpo", {})]
            if arm != "grpo" and paired:
                row[f"{metric} - grpo"] = mean_std(paired)
        out[arm] = row
    return out


def print_summary(base: dict, summary: dict) -> None:
    print(f"\nbefore training: greedy {base['greedy']:.3f}  avg@k {base['avg@k']:.3f}")
    print(f"{'arm':<26} {'seeds':>5} {'greedy':>15} {'avg@k':>15} {'greedy-GRPO':>16} {'avg@k-GRPO':>16}")
    for arm, row in summary.items():
        cells = [f"{row[m][0]:.3f} ± {row[m][1]:.3f}" for m in ("greedy", "avg@k")]
        deltas = [f"{row[m][0]:+.3f} ± {row[m][1]:.3f}" if m in row else "" for m in ("greedy - grpo", "avg@k - grpo")]
        print(f"{arm:<26} {row['n_seeds']:>5} {cells[0]:>15} {cells[1]:>15} {deltas[0]:>16} {deltas[1]:>16}")
    print("(mean ± sample std over seeds; differences are paired by seed)")


def plot(runs: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("greedy", "avg@k")):
        for arm, by_seed in runs.items():
            steps = sorted({p["step"] for r in by_seed.values() for p in r["curve"]})
            values = [[p[metric] for r in by_seed.values() for p in r["curve"] if p["step"] == s] for s in steps]
            means = [statistics.fmean(v) for v in values]
            line, = ax.plot(steps, means, marker="o", markersize=3, label=f"{arm} (n={len(by_seed)})")
            if len(by_seed) > 1:
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15,
                                color=line.get_color())
        ax.set_ylim(0, max(0.05, ax.get_ylim()[1]))
        ax.set_title(f"held-out {metric} (mean over seeds, band: min-max)")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all (opsd only if tapo.opsd exists)")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--n-eval", type=int, help="held-out problems")
    parser.add_argument("--k", type=int, help="samples per held-out problem for avg@k")
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--model", help="any `tapo train --model` value (default: the mode's)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished runs in the results file")
    args = parser.parse_args()
    mode_name = args.mode or "default"
    set_threads(args.threads)
    spec = json.loads(json.dumps(MODES[mode_name]))
    spec["train"].update(parse_settings(args.set))
    for key, value in (("max_steps", args.steps), ("model", args.model)):
        if value is not None:
            spec["train"][key] = value
    for key, value in (("seeds", args.seeds), ("n_eval", args.n_eval), ("k", args.k), ("eval_every", args.eval_every)):
        if value is not None:
            spec[key] = value
    spec["train"]["n_train"] = spec["n_train"]
    arms = args.arms or [a for a in ARMS if a != "opsd" or opsd_available()]
    if "opsd" in arms and not opsd_available():
        raise SystemExit("arm opsd: tapo.opsd is not importable")
    if "grpo" not in arms:
        arms = ["grpo", *arms]  # every difference is taken against GRPO

    out_json, out_png = RESULTS / f"learning_{mode_name}.json", RESULTS / f"learning_{mode_name}.png"
    if args.fresh:
        out_json.unlink(missing_ok=True)
    previous = json.loads(out_json.read_text()) if out_json.exists() else {}
    same = same_setup(previous.get("spec"), spec)
    runs = {arm: {} for arm in arms}
    if same:
        merge_runs(runs, previous)
    where = machine()
    print(f"learning, mode {mode_name}, {where}\narms {arms}, seeds {spec['seeds']}")

    run0, config0, _ = make_config(spec["train"])
    train_set, held_out = load_split(run0.dataset, spec["n_train"], spec["n_eval"])
    model, tokenizer = load_model_and_tokenizer(run0.model)
    evaluate = HeldOutEval(held_out, tokenizer, spec["k"], config0.temperature, config0.max_completion_length,
                           args.eval_batch_size)
    if same and "base" in previous:
        base = previous["base"]
    else:
        print(f"evaluating the untrained model on {len(held_out)} held-out problems", flush=True)
        base = evaluate(model.to("cuda") if torch.cuda.is_available() else model)
    del model
    print(f"before training: greedy {base['greedy']:.3f}  avg@k {base['avg@k']:.3f}  ({base['eval_s']:.0f} s)")

    def save():
        # Several processes may fill the same file (e.g. one per seed on a multi-core machine): under a lock, take in
        # whatever the others finished since, then write everything.
        with open(out_json.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(out_json.read_text()) if out_json.exists() else {}
            if same_setup(on_disk.get("spec"), spec):
                merge_runs(runs, on_disk)
                seeds = sorted({*on_disk["spec"]["seeds"], *spec["seeds"]})
            else:
                seeds = spec["seeds"]
            done = {a: r for a, r in runs.items() if r}
            result = {"mode": mode_name, "machine": where, "spec": {**spec, "seeds": seeds},
                      "arms": {a: ARMS[a] for a in done}, "n_train": len(train_set), "n_held_out": len(held_out),
                      "base": base, "runs": runs, "summary": summarize(done)}
            write_json(out_json, result)
        return result

    for seed in spec["seeds"]:  # seed-major: a cut-short run still has every arm of its first seeds
        for arm in arms:
            save()  # also takes in what other processes finished meanwhile
            if seed in runs[arm]:
                print(f"{arm} seed {seed}: already done", flush=True)
                continue
            print(f"{arm} seed {seed}", flush=True)
            runs[arm][seed] = train_arm(arm, seed, spec, train_set, evaluate, base)
            print(f"  {runs[arm][seed]['wall_s']:.0f} s", flush=True)
            save()
    result = save()
    print_summary(base, result["summary"])
    plot({a: r for a, r in runs.items() if r}, out_png)
    print(f"wrote {out_json} and {out_png}")


if __name__ == "__main__":
    main()
