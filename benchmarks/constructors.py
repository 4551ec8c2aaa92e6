"""Which constructor yields accepted constructions at a given model size? Measures "self" vs "splice".

For each problem: sample K rollouts, verify, run DCS, then build the constructions with both constructors from the
SAME pairs and report attempted / parsed / assembled / accepted (re-verified) counts. This is how the embedded
default's constructor was picked (see README.md "Embedded default").

    python benchmarks/constructors.py                      # SmolLM2-135M on the embedded default task
    python benchmarks/constructors.py --model tiny --n 2   # pipeline check in seconds
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from tapo.construct import ConstructionRequest, construct
from tapo.core.selection import select_candidates
from tapo.core.verify import is_correct
from tapo.data import PROMPT_TEMPLATE, load_problems
from tapo.models import load_model_and_tokenizer, resolve_model
from tapo.config import EMBEDDED_DEFAULTS, default_synthesis_max_tokens


def chat_generate(model, tokenizer, messages: list[str], max_new_tokens: int, temperature: float, num: int = 1) -> list[str]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
             for m in messages]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
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
    p.add_argument("--synthesis-tokens", type=int, default=None,
                   help="default: TAPOConfig's, derived from --max-tokens")
    p.add_argument("--n-pos", type=int, default=EMBEDDED_DEFAULTS["n_pos"])
    p.add_argument("--n-neg", type=int, default=EMBEDDED_DEFAULTS["n_neg"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/constructors.json")
    args = p.parse_args()
    if args.synthesis_tokens is None:
        args.synthesis_tokens = default_synthesis_max_tokens(args.max_tokens)

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(resolve_model(args.model))
    problems, _ = load_problems(args.dataset, n=args.n, seed=args.seed)
    counts = {c: dict(attempted=0, parsed=0, assembled=0, accepted=0, seconds=0.0) for c in ("splice", "self")}
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
            stats["accepted"] += sum(c.trajectory is not None and is_correct(c.trajectory.text, row["answer"]) for c in built)
        print(f"problem {row['id']}: {sum(correct)}/{len(correct)} correct, {len(pairs)} pairs, "
              + ", ".join(f"{c} accepted {s['accepted']}/{s['attempted']}" for c, s in counts.items()), flush=True)
    result = dict(model=args.model, dataset=args.dataset, problems=args.n, k=args.k, base_accuracy=n_correct / n_total,
                  eligible_queries=n_eligible, constructors=counts)
    for stats in counts.values():
        stats["accept_rate"] = stats["accepted"] / stats["attempted"] if stats["attempted"] else None
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
