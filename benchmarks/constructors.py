"""Which constructor yields accepted constructions at a given model size? Measures "self" vs "splice".

For each problem: sample K rollouts, verify, run DCS, then build the constructions with both constructors from the
SAME pairs and report attempted / parsed / assembled / accepted (re-verified) counts. This is how the embedded
default's constructor was picked (see README.md "Embedded default").

    python benchmarks/constructors.py                      # SmolLM2-135M on the embedded default task
    python benchmarks/constructors.py --model tiny --n 2   # pipeline check in seconds

Cold-start mode (`--coldstart`, issue 11): does an offline cold start teach the embedded model the synthesis format?
One command runs the whole pipeline, each stage cached in --work (delete a stage's file to redo it):

  1. attempts: the policy's own K attempts per problem (--attempts FILE, rows with problem/answer/attempts; sampled
     and written there when the file is missing);
  2. split by problem text: the first --measure-problems rows (more if they give fewer than --min-pairs pairs) are
     measured, the rest (minus any row whose problem text is also measured) are cold-start data;
  3. measurement pairs: seeded DCS (n_pos=1, n_neg=2, m_max=4) over the measured problems' attempts;
  4. before: the base model writes a synthesis of every pair (synthesis prompt in its chat template);
  5. build: `tapo coldstart build --teacher rule` on the cold-start problems' attempts (tapo.coldstart.build_examples
     with the rule writer);
  6. train: `tapo coldstart train` in a subprocess (wall time and peak RSS measured), saved under the tapo cache;
  7. after: the cold-started model writes syntheses of the SAME pairs.
For before/after: parse rate (`parse_synthesis`), strict assembly rate (`assemble_output`, prefix_match="strict"),
accept rate (assembled and the trajectory's answer re-verifies), rejections by reason. Results:
benchmarks/results/constructors_coldstart.json.

    flock /tmp/smollm2.lock python benchmarks/constructors.py --coldstart --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from tapo.coldstart import DATA_FILE, build_examples, read_attempts, rule_writer, sft_trainer, write_examples
from tapo.construct import ConstructionRequest, construct
from tapo.core.selection import select_candidates
from tapo.core.synthesis import REJECTIONS, UNPARSED, WRONG_ANSWER, assemble_output, build_synthesis_prompt, is_blank
from tapo.core.verify import is_correct
from tapo.data import PROMPT_TEMPLATE, load_problems
from tapo.config import EMBEDDED_DEFAULTS, default_synthesis_max_tokens
from tapo.models import default_cache_dir, load_model_and_tokenizer, resolve_model

# A synthesis re-copies the wrong attempt (<= 128 tokens) before its reflection and correction: 384 leaves room.
COLDSTART_SYNTHESIS_TOKENS = 384
SYNTHESIS_TEMPERATURE, ATTEMPT_TEMPERATURE = 0.7, 0.8


def chat_generate(model, tokenizer, messages: list[str], max_new_tokens: int, temperature: float, num: int = 1) -> list[str]:
    if not messages:  # construct() calls its generator even with nothing to build (no eligible pair)
        return []
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
             for m in messages]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                             num_return_sequences=num, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_DEFAULTS["model"])
    p.add_argument("--dataset", default=EMBEDDED_DEFAULTS["dataset"])
    p.add_argument("--n", type=int, default=12, help="problems")
    p.add_argument("--k", type=int, default=8, help="rollouts per problem")
    p.add_argument("--max-tokens", type=int, default=EMBEDDED_DEFAULTS["max_completion_length"])
    p.add_argument("--synthesis-tokens", type=int, help="synthesis budget (default: TAPOConfig's, derived from "
                   f"--max-tokens; cold-start mode {COLDSTART_SYNTHESIS_TOKENS})")
    p.add_argument("--n-pos", type=int, default=EMBEDDED_DEFAULTS["n_pos"])
    p.add_argument("--n-neg", type=int, default=EMBEDDED_DEFAULTS["n_neg"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", help="result json (default: benchmarks/results/constructors[_coldstart].json)")
    cold = p.add_argument_group("cold-start mode")
    cold.add_argument("--coldstart", action="store_true", help="measure the self constructor before/after a cold start")
    cold.add_argument("--attempts", default="benchmarks/results/attempts_smollm2.jsonl",
                      help="the policy's sampled attempts (jsonl: problem, answer, attempts); sampled when missing "
                      "(--n problems from --dataset with --attempts-seed)")
    cold.add_argument("--attempts-seed", type=int, default=2026, help="load_problems seed when sampling attempts")
    cold.add_argument("--measure-problems", type=int, default=48, help="the first rows measured, never cold-start data")
    cold.add_argument("--min-pairs", type=int, default=64, help="measure more rows until DCS gives this many pairs")
    cold.add_argument("--max-pairs", type=int, help="measure only the first this many pairs (CPU time)")
    cold.add_argument("--work", help="stage cache folder (default: the tapo cache's constructors-coldstart)")
    cold.add_argument("--references-per-wrong", type=int, default=2, help="cold-start data: distinct right siblings "
                      "each wrong attempt is paired with")
    cold.add_argument("--cuts", default="before_error", help="cold-start data: comma-separated cuts to write")
    cold.add_argument("--correct-per-problem", type=int, default=2, help="cold-start data: plain solutions per problem")
    cold.add_argument("--epochs", type=float, default=2.0, help="cold-start SFT epochs")
    cold.add_argument("--lr", type=float, help="cold-start SFT learning rate (default: 5e-5 full, 2e-4 LoRA)")
    cold.add_argument("--lora-r", default="auto", help="cold-start SFT: LoRA rank (0: full fine-tuning; auto: whichever "
                      "of full and LoRA rank 16 the probe measured faster per step)")
    cold.add_argument("--sft-budget-s", type=float, default=600, help="cold-start SFT: cut the epochs so the probe's "
                      "seconds per step times the steps fit this budget")
    cold.add_argument("--sft-batch-size", type=int, default=4)
    cold.add_argument("--sft-max-length", type=int, default=1024, help="cold-start SFT: tokens per example")
    cold.add_argument("--max-examples", type=int, help="cold-start SFT: train on this many examples at most (a seeded "
                      "sample; CPU time)")
    cold.add_argument("--probe-steps", type=int, default=3, help="time this many SFT steps of full fine-tuning and of "
                      "LoRA (rank 16) before the run (0: no probe)")
    cold.add_argument("--stages", default="before,build,probe,train,after", help="comma-separated stages to run")
    cold.add_argument("--batch", type=int, default=16, help="sequences per generate() call")
    args = p.parse_args()
    if args.synthesis_tokens is None:
        args.synthesis_tokens = (COLDSTART_SYNTHESIS_TOKENS if args.coldstart
                                 else default_synthesis_max_tokens(args.max_tokens))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.coldstart:
        coldstart_benchmark(args)
    else:
        splice_vs_self(args)


def splice_vs_self(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(resolve_model(args.model))
    problems, _ = load_problems(args.dataset, n=args.n, seed=args.seed)
    counts = {c: dict(attempted=0, parsed=0, assembled=0, accepted=0, seconds=0.0, rejected={}) for c in ("splice", "self")}
    n_correct = n_total = n_eligible = 0
    rng = random.Random(args.seed)
    for row in problems:
        attempts = chat_generate(model, tokenizer, [PROMPT_TEMPLATE.replace("{problem}", row["problem"])],
                                 args.max_tokens, 0.8, num=args.k)
        correct = [is_correct(a, row["answer"]) for a in attempts]
        n_correct, n_total = n_correct + sum(correct), n_total + len(correct)
        pairs = select_candidates(correct, args.n_pos, args.n_neg, m_max=4, rng=rng)
        n_eligible += bool(pairs)
        requests = [ConstructionRequest(row["problem"], attempts[w], attempts[r], row["answer"]) for w, r in pairs]
        for constructor, stats in counts.items():
            start = time.perf_counter()
            built = construct(requests, constructor, lambda msgs: chat_generate(model, tokenizer, msgs,
                                                                                args.synthesis_tokens, 0.7))
            stats["seconds"] += time.perf_counter() - start
            stats["attempted"] += len(built)
            stats["parsed"] += sum(c.parsed for c in built)
            stats["assembled"] += sum(c.trajectory is not None for c in built)
            for c in built:  # one verdict per construction: the rejection, else whether it re-verifies
                reason = c.rejection or (None if is_correct(c.trajectory.text, row["answer"]) else WRONG_ANSWER)
                if reason:
                    stats["rejected"][reason] = stats["rejected"].get(reason, 0) + 1
                else:
                    stats["accepted"] += 1
        print(f"problem {row['id']}: {sum(correct)}/{len(correct)} correct, {len(pairs)} pairs, "
              + ", ".join(f"{c} accepted {s['accepted']}/{s['attempted']}" for c, s in counts.items()), flush=True)
    result = dict(model=args.model, dataset=args.dataset, problems=args.n, k=args.k, base_accuracy=n_correct / n_total,
                  eligible_queries=n_eligible, constructors=counts)
    for stats in counts.values():
        stats["accept_rate"] = stats["accepted"] / stats["attempted"] if stats["attempted"] else None
    print(json.dumps(result, indent=2))
    out = Path(args.out or "benchmarks/results/constructors.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")



# ---------------------------------------------------------------------------------------------------------------------
# Cold-start mode


def batched_generate(model, tokenizer, messages: list[str], max_new_tokens: int, temperature: float, batch: int,
                     num: int = 1) -> list[str]:
    """chat_generate over `batch` messages at a time, shortest first (less padding), in the input order."""
    order = sorted(range(len(messages)), key=lambda i: len(messages[i]))
    out: list[str | None] = [None] * (len(messages) * num)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        texts = chat_generate(model, tokenizer, [messages[i] for i in chunk], max_new_tokens, temperature, num)
        for n, i in enumerate(chunk):
            out[i * num : (i + 1) * num] = texts[n * num : (n + 1) * num]
        print(f"  generated {min(start + batch, len(order))}/{len(order)}", flush=True)
    return out


def sample_attempts(args: argparse.Namespace, path: Path) -> None:
    """The policy's own attempts (K per problem, the training prompt), written as an attempts jsonl."""
    model, tokenizer = load_model_and_tokenizer(resolve_model(args.model))
    problems, _ = load_problems(args.dataset, n=args.n, seed=args.attempts_seed)
    prompts = [PROMPT_TEMPLATE.replace("{problem}", row["problem"]) for row in problems]
    texts = batched_generate(model, tokenizer, prompts, args.max_tokens, ATTEMPT_TEMPERATURE, max(1, args.batch // args.k),
                             num=args.k)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": row["id"], "problem": row["problem"], "answer": row["answer"],
                                        "attempts": texts[i * args.k : (i + 1) * args.k]}) + "\n"
                            for i, row in enumerate(problems)))


def measurement_pairs(rows: list[dict], measure: int, min_pairs: int, n_pos: int, n_neg: int, seed: int):
    """(requests, number of rows measured): seeded DCS over the first `measure` rows, more until >= min_pairs."""
    rng = random.Random(seed)
    requests: list[ConstructionRequest] = []
    used = 0
    for row in rows:
        if used >= measure and len(requests) >= min_pairs:
            break
        used += 1
        usable = [a for a in row["attempts"] if not is_blank(a)]  # a blank attempt has nothing to repair or copy
        correct = [is_correct(a, row["answer"]) for a in usable]
        prompt = PROMPT_TEMPLATE.replace("{problem}", row["problem"])
        requests += [ConstructionRequest(prompt, usable[w], usable[r], row["answer"])
                     for w, r in select_candidates(correct, n_pos, n_neg, m_max=4, rng=rng)]
    return requests, used


def score(requests: list[ConstructionRequest], outputs: list[str]) -> dict:
    """Parse / strict-assembly / re-verified acceptance counts and rates, and rejections by reason."""
    rejected = dict.fromkeys(REJECTIONS, 0)
    parsed = assembled = accepted = 0
    for request, output in zip(requests, outputs, strict=True):
        assembly = assemble_output(request.wrong, output, prefix_match="strict")
        parsed += assembly.rejection != UNPARSED
        if assembly.trajectory is None:
            rejected[assembly.rejection] += 1
        elif is_correct(assembly.trajectory.text, request.gold):
            assembled += 1
            accepted += 1
        else:
            assembled += 1
            rejected["wrong_answer"] += 1
    n = len(requests)
    return dict(pairs=n, parsed=parsed, assembled=assembled, accepted=accepted, parse_rate=parsed / n,
                assembly_rate=assembled / n, accept_rate=accepted / n,
                rejected={reason: count for reason, count in rejected.items() if count})


def write_syntheses(model_path: str, requests: list[ConstructionRequest], args: argparse.Namespace, path: Path) -> list[str]:
    """The model's synthesis of every pair (cached in `path`, one {"output"} row per pair, with the pair)."""
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()][: len(requests)]
        if [(r["wrong"], r["reference"]) for r in rows] == [(r.wrong, r.reference) for r in requests]:
            print(f"{path}: reusing {len(rows)} syntheses")
            return [r["output"] for r in rows]
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(resolve_model(model_path))
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()  # a GPU, when there is one, writes them in minutes
    start = time.perf_counter()
    outputs = batched_generate(model, tokenizer, [build_synthesis_prompt(r.problem, r.wrong, r.reference) for r in requests],
                               args.synthesis_tokens, SYNTHESIS_TEMPERATURE, args.batch)
    print(f"{len(outputs)} syntheses by {model_path} in {time.perf_counter() - start:.0f} s", flush=True)
    path.write_text("".join(json.dumps({**vars(r), "output": o}) + "\n" for r, o in zip(requests, outputs, strict=True)))
    return outputs


def coldstart_benchmark(args: argparse.Namespace) -> None:
    work = Path(args.work) if args.work else default_cache_dir() / "constructors-coldstart"
    work.mkdir(parents=True, exist_ok=True)
    attempts_path = Path(args.attempts)
    if not attempts_path.exists():
        print(f"{attempts_path} missing: sampling {args.k} attempts for {args.n} problems", flush=True)
        sample_attempts(args, attempts_path)
    rows = read_attempts(attempts_path)
    requests, measured = measurement_pairs(rows, args.measure_problems, args.min_pairs, args.n_pos, args.n_neg, args.seed)
    requests = requests[: args.max_pairs]
    held_out = {row["problem"] for row in rows[:measured]}
    coldstart_rows = [row for row in rows[measured:] if row["problem"] not in held_out]
    print(f"{len(rows)} problems: {measured} measured ({len(requests)} pairs), {len(coldstart_rows)} for the cold start",
          flush=True)
    result = dict(model=args.model, attempts=str(attempts_path), measured_problems=measured,
                  coldstart_problems=len(coldstart_rows), synthesis_tokens=args.synthesis_tokens,
                  synthesis_temperature=SYNTHESIS_TEMPERATURE, seed=args.seed)
    stages = set(args.stages.split(","))
    out = Path(args.out or "benchmarks/results/constructors_coldstart.json")
    if out.exists():  # stages not run this time keep their earlier numbers
        result = {**json.loads(out.read_text()), **result}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    if "before" in stages:
        result["before"] = score(requests, write_syntheses(args.model, requests, args, work / "before.jsonl"))
        print("before:", json.dumps(result["before"]), flush=True)
        save()
    data = work / "data" / DATA_FILE
    if "build" in stages:
        start = time.perf_counter()
        examples, stats = build_examples(coldstart_rows, rule_writer, n_pos=1, n_neg=1, m_max=4,
                                         correct_per_problem=args.correct_per_problem,
                                         references_per_wrong=args.references_per_wrong, cuts=args.cuts.split(","),
                                         seed=args.seed)
        if args.max_examples and len(examples) > args.max_examples:
            examples = random.Random(args.seed).sample(examples, args.max_examples)
        write_examples(examples, stats, data.parent)
        result["coldstart_data"] = dict(stats, examples=len(examples), seconds=round(time.perf_counter() - start, 1),
                                        teacher="rule", references_per_wrong=args.references_per_wrong, cuts=args.cuts,
                                        max_examples=args.max_examples)
        print("cold-start data:", json.dumps(result["coldstart_data"]), flush=True)
        save()
    if "probe" in stages and args.probe_steps:
        result["sft_probe"] = {name: probe_sft(data, args, lora_r, work / f"probe-{name}")
                               for name, lora_r in (("full", 0), ("lora_r16", 16))}
        print("SFT probe:", json.dumps(result["sft_probe"]), flush=True)
        save()
    lora_r, epochs = sft_plan(result.get("sft_probe"), args, sum(1 for _ in data.open()) if data.exists() else 0)
    lr = args.lr or (2e-4 if lora_r else 5e-5)
    result["sft_plan"] = dict(lora_r=lora_r, epochs=epochs, lr=lr)
    options = ["--epochs", str(epochs), "--lr", str(lr), "--batch-size", str(args.sft_batch_size),
               "--max-length", str(args.sft_max_length), "--lora-r", str(lora_r), "--seed", str(args.seed)]
    digest = hashlib.sha256(data.read_bytes() + args.model.encode() + " ".join(options).encode()).hexdigest()[:12] \
        if data.exists() else "none"
    model_dir = default_cache_dir() / f"coldstart-{Path(args.model).name}-{digest}"
    if "train" in stages:
        result["coldstart_sft"] = train_coldstart(data, model_dir, options, args)
        print("cold-start SFT:", json.dumps(result["coldstart_sft"]), flush=True)
        save()
    if "after" in stages:
        result["after"] = score(requests, write_syntheses(str(model_dir), requests, args,
                                                          work / f"after-{digest}.jsonl"))
        result["after"]["model"] = str(model_dir)
        print("after:", json.dumps(result["after"]), flush=True)
        save()


def sft_plan(probe: dict | None, args: argparse.Namespace, examples: int) -> tuple[int, float]:
    """(LoRA rank, epochs): --lora-r auto picks the faster per step in the probe; epochs are cut to the budget."""
    if args.lora_r != "auto":
        lora_r, seconds = int(args.lora_r), None
    elif not probe:
        raise SystemExit("--lora-r auto needs the probe stage (or give --lora-r)")
    else:
        name = min(probe, key=lambda n: probe[n]["seconds_per_step"])
        lora_r, seconds = (0 if name == "full" else 16), probe[name]["seconds_per_step"]
    epochs = args.epochs
    if seconds and examples:
        steps_per_epoch = -(-examples // args.sft_batch_size)
        epochs = round(min(epochs, args.sft_budget_s / (seconds * steps_per_epoch)), 2)
    return lora_r, epochs


def probe_sft(data: Path, args: argparse.Namespace, lora_r: int, out: Path) -> dict:
    """Seconds per step of a few SFT steps (model load excluded): the measured basis for full vs LoRA."""
    trainer = sft_trainer(data, args.model, out, lr=args.lr or 5e-5, max_length=args.sft_max_length,
                          batch_size=args.sft_batch_size, max_steps=args.probe_steps, seed=args.seed, lora_r=lora_r)
    metrics = trainer.train().metrics
    return dict(steps=args.probe_steps, batch_size=args.sft_batch_size,
                seconds_per_step=round(metrics["train_runtime"] / args.probe_steps, 2),
                trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))


def train_coldstart(data: Path, model_dir: Path, options: list[str], args: argparse.Namespace) -> dict:
    """`tapo coldstart train` in a subprocess (so its wall time and peak RSS are its own); skipped when built."""
    if (model_dir / "config.json").exists():
        print(f"{model_dir}: reusing the cold-started model", flush=True)
        return json.loads((model_dir / "coldstart_cost.json").read_text())
    command = [sys.executable, "-m", "tapo.cli", "coldstart", "train", "--data", str(data), "--model", args.model,
               "--out", str(model_dir), *options]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or torch.get_num_threads()))
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    cost = dict(command=" ".join(command[1:]), wall_seconds=round(time.perf_counter() - start, 1),
                peak_rss_gib=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
                examples=sum(1 for _ in data.open()), model=str(model_dir))
    (model_dir / "coldstart_cost.json").write_text(json.dumps(cost, indent=2) + "\n")
    return cost


if __name__ == "__main__":
    main()
