"""`tapo coldstart build | train`: the cold-start SFT data that teaches the synthesis format, and the SFT run itself.

The paper starts every arm from a model fine-tuned to (a) reason step by step to a boxed answer and (b) write the
synthesis format (`<analysis>` / `<reconstruction>`) that TAPO's self-constructor asks for. `build_examples`:

1. samples K attempts per problem from `generate` (the policy itself, a stronger local model or an endpoint) on the
   training prompt (`tapo.data.PROMPT_TEMPLATE`), and verifies them (`tapo.core.verify.math_reward`);
2. keeps up to `correct_per_problem` distinct correct attempts as plain examples (user prompt -> assistant attempt);
3. pairs wrong/right attempts as TAPO's DCS does (`select_candidates`; blank attempts never enter a pair), asks
   `synthesize` (default: `generate`) for a synthesis of each pair (`build_synthesis_prompt`), and keeps it only when
   it parses (`parse_synthesis`), assembles onto the wrong attempt (`assemble_trajectory`) and the assembled
   trajectory's answer re-verifies against the gold answer;
4. writes a kept synthesis as (synthesis prompt -> "<analysis>..</analysis>\n<reconstruction>TRAJECTORY
   </reconstruction>"), where TRAJECTORY is the assembled text: the wrong attempt's verbatim prefix, the reflection
   and the correction. So the target copies the wrong attempt exactly (whitespace included), even where the
   generator's copy was loose, and parsing + assembling the target gives back the same trajectory. Assembly is
   `prefix_match="strict"` by default: only syntheses that copy and then turn with a reflection phrase ("Wait, ...")
   are kept, which is the format the synthesis prompt asks for.

Every pair ends in exactly one of: kept, unparsed, unassembled, wrong_answer; a problem with no pair is counted as
no_pair. The counts go to stats.json and a rich table. `train_sft` runs TRL's SFTTrainer with the loss on the
assistant turn only (each chat becomes a prompt/completion pair, TRL's completion-only loss).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from tapo.core.selection import select_candidates
from tapo.core.synthesis import (
    assemble_trajectory,
    build_synthesis_prompt,
    parse_synthesis,
)
from tapo.core.verify import is_correct, math_reward
from tapo.data import PROMPT_TEMPLATE, DataError, load_problems
from tapo.models import DEFAULT_MODEL

Generator = Callable[[list[str]], list[str]]

DROP_REASONS = ("no_pair", "unparsed", "unassembled", "wrong_answer")
DATA_FILE, STATS_FILE = "sft.jsonl", "stats.json"


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def synthesis_target(analysis: str, trajectory_text: str) -> str:
    """The assistant side of a synthesis example, in the format `tapo.core.synthesis.SYNTHESIS_PROMPT` asks for."""
    return f"<analysis>\n{analysis.strip()}\n</analysis>\n<reconstruction>\n{trajectory_text}\n</reconstruction>"


def _generate_checked(generate: Generator, messages: list[str], what: str) -> list[str]:
    texts = generate(messages)
    if len(texts) != len(messages):
        raise ValueError(f"the {what} generator returned {len(texts)} texts for {len(messages)} prompts")
    return [t if isinstance(t, str) else "" for t in texts]


def build_examples(
    problems: Iterable[Mapping],
    generate: Generator,
    synthesize: Generator | None = None,
    *,
    k: int = 8,
    n_pos: int = 1,
    n_neg: int = 1,
    m_max: int = 4,
    correct_per_problem: int = 1,
    prefix_match: str = "strict",
    template: str = PROMPT_TEMPLATE,
    seed: int = 0,
    batch_problems: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """(SFT chat examples, counts) from rows with `problem` and `answer` (steps in the module docstring).

    Generation is batched over `batch_problems` problems at a time (one attempts call, one synthesis call);
    `on_batch(n_done)` is called after each batch (progress display)."""
    if k < 2:
        raise ValueError(f"k={k}: need at least 2 attempts per problem to pair a wrong with a right one")
    synthesize = synthesize or generate
    rng = random.Random(seed)
    stats = dict.fromkeys(("problems", "attempts", "correct_attempts", "blank_attempts", "plain_examples", "pairs",
                           "synthesis_examples", *(f"dropped_{r}" for r in DROP_REASONS)), 0)
    examples: list[dict] = []
    rows = list(problems)
    for start in range(0, len(rows), batch_problems):
        batch = rows[start : start + batch_problems]
        prompts = [template.replace("{problem}", str(row["problem"])) for row in batch]
        answers = [str(row["answer"]) for row in batch]
        attempts = _generate_checked(generate, [p for p in prompts for _ in range(k)], "attempt")
        rewards = math_reward(None, attempts, [a for a in answers for _ in range(k)])

        requests = []  # (prompt, wrong attempt, synthesis prompt, gold)
        for i, (prompt, gold) in enumerate(zip(prompts, answers, strict=True)):
            group = [(text, reward == 1.0) for text, reward in zip(attempts[i * k : (i + 1) * k], rewards[i * k : (i + 1) * k],
                                                                    strict=True)]
            stats["problems"] += 1
            stats["attempts"] += k
            stats["correct_attempts"] += sum(ok for _, ok in group)
            usable = [(text, ok) for text, ok in group if text.strip()]  # a blank attempt has nothing to repair or copy
            stats["blank_attempts"] += k - len(usable)
            right = list(dict.fromkeys(text for text, ok in usable if ok))[:correct_per_problem]
            examples += [chat(prompt, text) for text in right]
            stats["plain_examples"] += len(right)
            pairs = select_candidates([ok for _, ok in usable], n_pos, n_neg, m_max, rng)
            stats["dropped_no_pair"] += not pairs
            for wrong, reference in pairs:
                wrong_text = usable[wrong][0]
                requests.append((prompt, wrong_text, build_synthesis_prompt(prompt, wrong_text, usable[reference][0]), gold))

        outputs = _generate_checked(synthesize, [r[2] for r in requests], "synthesis") if requests else []
        for (_, wrong_text, synthesis_prompt, gold), output in zip(requests, outputs, strict=True):
            stats["pairs"] += 1
            synthesis = parse_synthesis(output)
            trajectory = assemble_trajectory(wrong_text, synthesis, prefix_match=prefix_match) if synthesis else None
            if synthesis is None:
                stats["dropped_unparsed"] += 1
            elif trajectory is None:
                stats["dropped_unassembled"] += 1
            elif not is_correct(trajectory.text, gold):
                stats["dropped_wrong_answer"] += 1
            else:
                examples.append(chat(synthesis_prompt, synthesis_target(synthesis.analysis, trajectory.text)))
                stats["synthesis_examples"] += 1
        if on_batch is not None:
            on_batch(len(batch))
    return examples, stats


def write_examples(examples: Sequence[dict], stats: Mapping[str, int], out_dir: str | Path) -> Path:
    """OUT/sft.jsonl (one chat per line) and OUT/stats.json; returns OUT."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATA_FILE).write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    (out / STATS_FILE).write_text(json.dumps(dict(stats), indent=2) + "\n")
    return out


def stats_table(stats: Mapping[str, int]):
    from rich.table import Table

    table = Table(title="cold-start data")
    table.add_column("count")
    table.add_column("n", justify="right")
    for name in ("problems", "attempts", "correct_attempts", "blank_attempts", "plain_examples", "pairs",
                 "synthesis_examples"):
        table.add_row(name, str(stats[name]))
    for reason in DROP_REASONS:
        table.add_row(f"dropped: {reason}" + (" (problems)" if reason == "no_pair" else " (pairs)"),
                      str(stats[f"dropped_{reason}"]))
    return table


# ---------------------------------------------------------------------------------------------------------------------
# SFT


def read_chats(path: str | Path) -> list[dict]:
    """The chat examples of a jsonl file, as prompt/completion pairs (all turns but the last -> the last, which must
    be the assistant's). A malformed line is a DataError naming the file and line."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            ok = (isinstance(messages, list) and len(messages) >= 2 and messages[-1]["role"] == "assistant"
                  and all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in messages))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}: line {number}: not a {{'messages': [...]}} chat ({err!r})") from err
        if not ok:
            raise DataError(f"{path}: line {number}: 'messages' needs >= 2 turns with string role/content, the last "
                            "one the assistant's")
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def sft_trainer(data: str | Path, model: str, out: str | Path, *, epochs: float = 1.0, lr: float = 1e-5,
                max_length: int = 2048, batch_size: int = 4, grad_accum: int = 1, max_steps: int = -1, seed: int = 0):
    """TRL's SFTTrainer for `model` (anything `tapo.models.resolve_model` accepts) on a chat jsonl. Each chat is a
    prompt/completion pair, so TRL's completion-only loss covers the last (assistant) turn only."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tapo.models import load_model_and_tokenizer

    dataset = Dataset.from_list(read_chats(data))
    policy, tokenizer = load_model_and_tokenizer(model)
    config = SFTConfig(
        output_dir=str(out), num_train_epochs=epochs, learning_rate=lr, max_length=max_length,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum, max_steps=max_steps, seed=seed,
        completion_only_loss=True, bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True,
    )
    return SFTTrainer(model=policy, args=config, train_dataset=dataset, processing_class=tokenizer)


def train_sft(data: str | Path, model: str, out: str | Path, **options) -> Path:
    """Run `sft_trainer(data, model, out, **options)` and save the model and tokenizer to `out`."""
    trainer = sft_trainer(data, model, out, **options)
    trainer.train()
    trainer.save_model(str(out))
    trainer.processing_class.save_pretrained(str(out))
    return Path(out)


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def make_generator(model: str, base_url: str | None, api_key_env: str, max_tokens: int, temperature: float,
                   batch_size: int) -> Generator:
    """An OpenAI-compatible endpoint (with base_url; `model` is the endpoint's model name) or a local HF model."""
    from tapo.construct import HFGenerator, OpenAIChatGenerator

    if base_url:
        return OpenAIChatGenerator(base_url, model, api_key_env, max_tokens, temperature)
    return HFGenerator(model, max_tokens, temperature, batch_size)


def _defaults(fn: Callable) -> dict:
    """A function's keyword defaults: the CLI reads them off the signature, so the two cannot drift apart."""
    return {name: p.default for name, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def register(subparsers: argparse._SubParsersAction) -> None:
    build_defaults, data_defaults = _defaults(build_examples), _defaults(load_problems)
    sft_defaults = _defaults(sft_trainer)
    parser = subparsers.add_parser("coldstart", help="build cold-start SFT data (synthesis format) and run the SFT",
                                   description="Cold start: `build` the SFT dataset, then `train` on it.")
    sub = parser.add_subparsers(dest="coldstart_command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    build = sub.add_parser("build", formatter_class=defaults, help="sample, verify, pair, synthesize -> OUT/sft.jsonl",
                           description="Sample K attempts per problem, verify them, pair wrong/right attempts, have a "
                           "model write syntheses, keep the verified ones; writes OUT/sft.jsonl and OUT/stats.json.")
    build.add_argument("--data", required=True, help="problems: a .jsonl/.parquet file, a reasoning-gym task or a hub set")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--model", default=DEFAULT_MODEL, help="attempt writer: a model name/folder, or the endpoint's "
                       "model name with --base-url")
    build.add_argument("--base-url", help="OpenAI-compatible endpoint for --model, e.g. http://localhost:8000/v1")
    build.add_argument("--teacher-model", help="synthesis writer (default: the --model generator)")
    build.add_argument("--teacher-base-url", help="OpenAI-compatible endpoint for --teacher-model")
    build.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the endpoints' API key")
    build.add_argument("--n", type=int, help="number of problems (reasoning-gym: generated; files: a random subset)")
    build.add_argument("--k", type=int, default=build_defaults["k"], help="attempts per problem")
    build.add_argument("--n-pos", type=int, default=build_defaults["n_pos"],
                       help="pair only problems with at least this many right attempts")
    build.add_argument("--n-neg", type=int, default=build_defaults["n_neg"],
                       help="... and at least this many wrong ones")
    build.add_argument("--m-max", type=int, default=build_defaults["m_max"], help="syntheses per problem at most")
    build.add_argument("--correct-per-problem", type=int, default=build_defaults["correct_per_problem"],
                       help="plain correct solutions kept per problem")
    build.add_argument("--prefix-match", choices=("strict", "longest"),
                       default=build_defaults["prefix_match"],
                       help="assembly rule (tapo.core.synthesis.assemble_trajectory)")
    build.add_argument("--temperature", type=float, default=0.8)
    build.add_argument("--max-tokens", type=int, default=1024, help="generation budget of one attempt")
    build.add_argument("--synthesis-max-tokens", type=int, default=2048, help="generation budget of one synthesis")
    build.add_argument("--batch-size", type=int, default=8, help="local models: sequences per generate() call")
    build.add_argument("--problem-field", default=data_defaults["problem_field"])
    build.add_argument("--answer-field", default=data_defaults["answer_field"])
    build.add_argument("--skip-bad-rows", action="store_true", help="drop malformed rows instead of failing")
    build.add_argument("--seed", type=int, default=build_defaults["seed"])
    build.set_defaults(func=build_command)

    train = sub.add_parser("train", formatter_class=defaults, help="SFT a model on a cold-start jsonl",
                           description="TRL SFTTrainer on a chat jsonl, loss on the assistant turn only.")
    train.add_argument("--data", required=True, help="chat jsonl, e.g. OUT/sft.jsonl of `tapo coldstart build`")
    train.add_argument("--model", default=DEFAULT_MODEL, help="model name or folder to fine-tune")
    train.add_argument("--out", required=True, help="folder for the fine-tuned model")
    train.add_argument("--epochs", type=float, default=sft_defaults["epochs"])
    train.add_argument("--lr", type=float, default=sft_defaults["lr"])
    train.add_argument("--max-length", type=int, default=sft_defaults["max_length"], help="tokens per example (longer ones are truncated)")
    train.add_argument("--batch-size", type=int, default=sft_defaults["batch_size"])
    train.add_argument("--grad-accum", type=int, default=sft_defaults["grad_accum"])
    train.add_argument("--max-steps", type=int, default=sft_defaults["max_steps"], help="stop after this many steps (-1: run the epochs)")
    train.add_argument("--seed", type=int, default=sft_defaults["seed"])
    train.set_defaults(func=train_command)


def build_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    try:
        problems, skipped = load_problems(args.data, n=args.n, seed=args.seed, problem_field=args.problem_field,
                                          answer_field=args.answer_field, skip_bad_rows=args.skip_bad_rows)
    except DataError as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    if skipped:
        console.print(f"skipped {skipped} bad rows of {args.data}")
    generate = make_generator(args.model, args.base_url, args.api_key_env, args.max_tokens, args.temperature,
                              args.batch_size)
    if args.teacher_model:
        synthesize = make_generator(args.teacher_model, args.teacher_base_url, args.api_key_env,
                                    args.synthesis_max_tokens, args.temperature, args.batch_size)
    elif args.base_url:
        synthesize = make_generator(args.model, args.base_url, args.api_key_env, args.synthesis_max_tokens,
                                    args.temperature, args.batch_size)
    else:
        synthesize = copy.copy(generate)  # shares the loaded model; only the generation budget differs
        synthesize.max_new_tokens = args.synthesis_max_tokens
    with Progress(console=console) as progress:
        task = progress.add_task("problems", total=len(problems))
        examples, stats = build_examples(
            problems, generate, synthesize, k=args.k, n_pos=args.n_pos, n_neg=args.n_neg, m_max=args.m_max,
            correct_per_problem=args.correct_per_problem, prefix_match=args.prefix_match, seed=args.seed,
            on_batch=lambda n: progress.advance(task, n),
        )
    out = write_examples(examples, stats, args.out)
    console.print(stats_table(stats))
    console.print(f"wrote {len(examples)} examples to {out / DATA_FILE} and counts to {out / STATS_FILE}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        out = train_sft(args.data, args.model, args.out, epochs=args.epochs, lr=args.lr, max_length=args.max_length,
                        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps, seed=args.seed)
    except DataError as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    console.print(f"saved the fine-tuned model to {out}")
    return 0
