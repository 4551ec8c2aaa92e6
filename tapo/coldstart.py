"""`tapo coldstart build | train`: the cold-start SFT data that teaches the synthesis format, and the SFT run itself.

The paper starts every arm from a model fine-tuned to (a) reason step by step to a boxed answer and (b) write the
synthesis format (`<analysis>` / `<reconstruction>`) that TAPO's self-constructor asks for. A build:

1. samples K attempts per problem (`sample_attempts`: the policy itself, a stronger local model or an endpoint, on
   the training prompt `tapo.data.PROMPT_TEMPLATE`), or reads attempts sampled earlier (`--attempts FILE`,
   `read_attempts`); either way they are written to OUT/attempts.jsonl so an expensive sampling is done once;
2. `build_examples` verifies them (`tapo.core.verify.math_reward`) and keeps up to `correct_per_problem` distinct
   correct attempts as plain examples (user prompt -> assistant attempt);
3. pairs wrong/right attempts as TAPO's DCS does (`select_candidates`; blank attempts never enter a pair), each wrong
   attempt with up to `references_per_wrong` distinct right siblings, and has the synthesis writer write a synthesis
   of each (wrong, reference, cut) for each cut asked for. The writer works on structured requests
   (`tapo.construct.ConstructionRequest`): `prompt_writer(generate)` has a model answer `build_synthesis_prompt`
   (`--teacher model`, the default); `rule_writer` writes it without any model with
   `tapo.core.synthesis.write_rule_synthesis` (`--teacher rule`: step-checkable arithmetic only; it locates the first
   wrong step with the splice's checker and writes a real analysis and reconstruction). A synthesis is kept only
   when it parses (`parse_synthesis`; a writer's None counts as unparsed), assembles onto the wrong attempt
   (`assemble_synthesis`) and the assembled trajectory's answer re-verifies against the gold answer;
4. writes a kept synthesis as (synthesis prompt -> `format_synthesis(analysis, TRAJECTORY)`), where TRAJECTORY is the
   assembled text: the wrong attempt's verbatim prefix, the reflection and the correction. So the target copies the
   wrong attempt exactly (whitespace included), even where the writer's copy was loose, and parsing + assembling the
   target gives back the same trajectory. Assembly is `prefix_match="strict"` by default: only syntheses that copy
   and then turn with a reflection phrase ("Wait, ...") are kept, which is the format the synthesis prompt asks for.

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

from tapo.construct import ConstructionRequest
from tapo.core.selection import select_candidates
from tapo.core.synthesis import (
    assemble_synthesis,
    build_synthesis_prompt,
    format_synthesis,
    is_blank,
    parse_synthesis,
    write_rule_synthesis,
)
from tapo.core.verify import is_correct, math_reward
from tapo.data import PROMPT_TEMPLATE, DataError, load_problems
from tapo.models import DEFAULT_MODEL

Generator = Callable[[list[str]], list[str]]
# (requests, cut) -> one synthesis text per request, None where the writer has none (counted as unparsed).
SynthesisWriter = Callable[[list[ConstructionRequest], str], list[str | None]]

DROP_REASONS = ("no_pair", "unparsed", "unassembled", "wrong_answer")
CUTS = ("before_error", "after_error")
DATA_FILE, STATS_FILE = "sft.jsonl", "stats.json"


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _generate_checked(generate: Generator, messages: list[str], what: str) -> list[str]:
    texts = generate(messages)
    if len(texts) != len(messages):
        raise ValueError(f"the {what} generator returned {len(texts)} texts for {len(messages)} prompts")
    return [t if isinstance(t, str) else "" for t in texts]


def prompt_writer(generate: Generator) -> SynthesisWriter:
    """A model writes the syntheses: `generate` answers the synthesis prompt of each request (one batched call)."""

    def write(requests: list[ConstructionRequest], cut: str) -> list[str | None]:
        prompts = [build_synthesis_prompt(r.problem, r.wrong, r.reference, cut) for r in requests]
        return _generate_checked(generate, prompts, "synthesis")

    return write


def rule_writer(requests: list[ConstructionRequest], cut: str) -> list[str | None]:
    """No model: `write_rule_synthesis` (the splice's step checker) writes each synthesis, or None where it cannot."""
    return [write_rule_synthesis(r.wrong, r.reference, r.gold, cut) for r in requests]


def sample_attempts(problems: Iterable[Mapping], generate: Generator, *, k: int = 8, template: str = PROMPT_TEMPLATE,
                    batch_problems: int = 16, on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """K attempts per problem from `generate` on the training prompt, batched over `batch_problems` problems (one
    call each; `on_batch(n_done)` after each): rows {problem, answer, attempts}, the format of `read_attempts`."""
    if k < 2:
        raise ValueError(f"k={k}: need at least 2 attempts per problem to pair a wrong with a right one")
    rows = [{"problem": str(row["problem"]), "answer": str(row["answer"])} for row in problems]
    for start in range(0, len(rows), batch_problems):
        batch = rows[start : start + batch_problems]
        prompts = [template.replace("{problem}", row["problem"]) for row in batch for _ in range(k)]
        texts = _generate_checked(generate, prompts, "attempt")
        for i, row in enumerate(batch):
            row["attempts"] = texts[i * k : (i + 1) * k]
        if on_batch is not None:
            on_batch(len(batch))
    return rows


def build_examples(
    rows: Iterable[Mapping],
    write_synthesis: SynthesisWriter,
    *,
    n_pos: int = 1,
    n_neg: int = 1,
    m_max: int = 4,
    correct_per_problem: int = 1,
    references_per_wrong: int = 1,
    cuts: Sequence[str] = ("before_error",),
    prefix_match: str = "strict",
    template: str = PROMPT_TEMPLATE,
    seed: int = 0,
    batch_problems: int = 16,
) -> tuple[list[dict], dict[str, int]]:
    """(SFT chat examples, counts) from attempt rows {problem, answer, attempts} (steps in the module docstring).

    Each DCS pair's wrong attempt is paired with up to `references_per_wrong` distinct right siblings (the DCS draw
    first) and written once per cut in `cuts`; every (wrong, reference, cut) is one counted pair. `write_synthesis`
    is called once per cut per `batch_problems` problems."""
    if not cuts or any(cut not in CUTS for cut in cuts):
        raise ValueError(f"cuts must be a non-empty subset of {CUTS}, got {cuts!r}")
    if references_per_wrong < 1:
        raise ValueError(f"references_per_wrong must be >= 1, got {references_per_wrong}")
    rng = random.Random(seed)
    stats = dict.fromkeys(("problems", "attempts", "correct_attempts", "blank_attempts", "plain_examples", "pairs",
                           "synthesis_examples", *(f"dropped_{r}" for r in DROP_REASONS)), 0)
    examples: list[dict] = []
    rows = list(rows)
    for start in range(0, len(rows), batch_problems):
        batch = rows[start : start + batch_problems]
        attempts = [a for row in batch for a in row["attempts"]]
        rewards = iter(math_reward(None, attempts, [str(row["answer"]) for row in batch for _ in row["attempts"]]))
        requests = []
        for row in batch:
            prompt = template.replace("{problem}", str(row["problem"]))
            group = [(text, next(rewards) == 1.0) for text in row["attempts"]]
            stats["problems"] += 1
            stats["attempts"] += len(group)
            stats["correct_attempts"] += sum(ok for _, ok in group)
            usable = [(text, ok) for text, ok in group if not is_blank(text)]  # nothing to repair or copy
            stats["blank_attempts"] += len(group) - len(usable)
            distinct_right = list(dict.fromkeys(text for text, ok in usable if ok))
            examples += [chat(prompt, text) for text in distinct_right[:correct_per_problem]]
            stats["plain_examples"] += min(len(distinct_right), correct_per_problem)
            pairs = select_candidates([ok for _, ok in usable], n_pos, n_neg, m_max, rng)
            stats["dropped_no_pair"] += not pairs
            for wrong, reference in pairs:
                first = usable[reference][0]
                others = [text for text in distinct_right if text != first]
                for text in [first, *rng.sample(others, min(len(others), references_per_wrong - 1))]:
                    requests.append(ConstructionRequest(prompt, usable[wrong][0], text, str(row["answer"])))
        for cut in cuts:
            outputs = write_synthesis(requests, cut) if requests else []
            if len(outputs) != len(requests):
                raise ValueError(f"the synthesis writer returned {len(outputs)} texts for {len(requests)} requests")
            for request, output in zip(requests, outputs, strict=True):
                stats["pairs"] += 1
                synthesis = parse_synthesis(output) if isinstance(output, str) else None
                if synthesis is None:
                    stats["dropped_unparsed"] += 1
                    continue
                assembly = assemble_synthesis(request.wrong, synthesis, prefix_match=prefix_match, cut=cut)
                if assembly.trajectory is None:
                    stats["dropped_unassembled"] += 1
                elif not is_correct(assembly.trajectory.text, request.gold):
                    stats["dropped_wrong_answer"] += 1
                else:
                    prompt = build_synthesis_prompt(request.problem, request.wrong, request.reference, cut)
                    examples.append(chat(prompt, format_synthesis(synthesis.analysis, assembly.trajectory.text)))
                    stats["synthesis_examples"] += 1
    return examples, stats


ATTEMPTS_FILE = "attempts.jsonl"


def _jsonl_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a text file; an unreadable file is a DataError naming it."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def read_attempts(path: str | Path) -> list[dict]:
    """Attempts sampled earlier (OUT/attempts.jsonl of a build, or any jsonl of the same rows): one row per problem with
    `problem` (str), `answer` (str or number) and `attempts` (a list of >= 2 strings). A malformed row is a DataError
    naming the file, the line and the field."""
    rows = []
    for number, line in _jsonl_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number}: not JSON ({err})") from err
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: not a JSON object")
        for field, ok, want in (
            ("problem", lambda v: isinstance(v, str) and v.strip(), "a non-empty string"),
            ("answer", lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip(),
             "a non-empty string or number"),
            ("attempts", lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(a, str) for a in v),
             "a list of at least 2 strings"),
        ):
            if field not in row:
                raise DataError(f"{path}: line {number}: missing field '{field}'")
            if not ok(row[field]):
                raise DataError(f"{path}: line {number}: field '{field}' must be {want}, got {row[field]!r:.80}")
        rows.append({"problem": row["problem"], "answer": str(row["answer"]), "attempts": row["attempts"]})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def write_attempts(rows: Sequence[Mapping], out_dir: str | Path) -> Path:
    """OUT/attempts.jsonl, the rows `read_attempts` reads (so a build can reuse this sampling); returns OUT."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ATTEMPTS_FILE).write_text("".join(json.dumps({key: row[key] for key in ("problem", "answer", "attempts")},
                                                        ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return out


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
    for number, line in _jsonl_lines(path):
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
                max_length: int = 2048, batch_size: int = 4, grad_accum: int = 1, max_steps: int = -1, seed: int = 0,
                lora_r: int = 0):
    """TRL's SFTTrainer for `model` (anything `tapo.models.resolve_model` accepts) on a chat jsonl. Each chat is a
    prompt/completion pair, so TRL's completion-only loss covers the last (assistant) turn only. `lora_r` > 0 trains
    a LoRA adapter of that rank on all linear layers (peft) instead of every weight."""
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
    peft_config = None
    if lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=policy, args=config, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config)


def train_sft(data: str | Path, model: str, out: str | Path, **options) -> Path:
    """Run `sft_trainer(data, model, out, **options)` and save the model (a LoRA adapter merged into its weights, so
    `out` loads as a plain model) and the tokenizer to `out`."""
    trainer = sft_trainer(data, model, out, **options)
    trainer.train()
    if options.get("lora_r", 0) > 0:
        trainer.model.merge_and_unload().save_pretrained(str(out))
    else:
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
    attempt_defaults = _defaults(sample_attempts)
    sft_defaults = _defaults(sft_trainer)
    parser = subparsers.add_parser("coldstart", help="build cold-start SFT data (synthesis format) and run the SFT",
                                   description="Cold start: `build` the SFT dataset, then `train` on it.")
    sub = parser.add_subparsers(dest="coldstart_command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    build = sub.add_parser("build", formatter_class=defaults, help="sample, verify, pair, synthesize -> OUT/sft.jsonl",
                           description="Sample K attempts per problem, verify them, pair wrong/right attempts, have a "
                           "model write syntheses, keep the verified ones; writes OUT/sft.jsonl and OUT/stats.json.")
    build.add_argument("--data", help="problems (required unless --attempts): a .jsonl/.parquet file, a reasoning-gym task or a hub set")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--model", default=DEFAULT_MODEL, help="attempt writer: a model name/folder, or the endpoint's "
                       "model name with --base-url")
    build.add_argument("--base-url", help="OpenAI-compatible endpoint for --model, e.g. http://localhost:8000/v1")
    build.add_argument("--teacher", choices=("model", "rule"), default="model",
                       help="synthesis writer: a model (--teacher-model, else the --model generator) or 'rule': "
                       "tapo.core.synthesis.write_rule_synthesis, no model (step-checkable arithmetic)")
    build.add_argument("--teacher-model", help="synthesis writer for --teacher model (default: the --model generator)")
    build.add_argument("--teacher-base-url", help="OpenAI-compatible endpoint for --teacher-model")
    build.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the endpoints' API key")
    build.add_argument("--attempts", help="reuse attempts sampled earlier (jsonl rows with problem, answer, attempts; "
                       "e.g. OUT/attempts.jsonl of an earlier build) instead of sampling; --data is then not read")
    build.add_argument("--n", type=int, help="number of problems (reasoning-gym: generated; files: a random subset)")
    build.add_argument("--k", type=int, default=attempt_defaults["k"], help="attempts per problem")
    build.add_argument("--n-pos", type=int, default=build_defaults["n_pos"],
                       help="pair only problems with at least this many right attempts")
    build.add_argument("--n-neg", type=int, default=build_defaults["n_neg"],
                       help="... and at least this many wrong ones")
    build.add_argument("--m-max", type=int, default=build_defaults["m_max"], help="syntheses per problem at most")
    build.add_argument("--correct-per-problem", type=int, default=build_defaults["correct_per_problem"],
                       help="plain correct solutions kept per problem")
    build.add_argument("--references-per-wrong", type=int, default=build_defaults["references_per_wrong"],
                       help="distinct right siblings each paired wrong attempt gets a synthesis with")
    build.add_argument("--cuts", nargs="+", choices=CUTS, default=list(build_defaults["cuts"]),
                       help="cuts to write each synthesis with (more cuts: more examples)")
    build.add_argument("--prefix-match", choices=("strict", "longest"), default=build_defaults["prefix_match"],
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
    train.add_argument("--lora-r", type=int, default=sft_defaults["lora_r"], help="LoRA rank (0: full fine-tuning)")
    train.add_argument("--seed", type=int, default=sft_defaults["seed"])
    train.set_defaults(func=train_command)


def build_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    if not args.data and not args.attempts:
        console.print("[red]error:[/] give --data (problems to sample attempts for) or --attempts (attempts to reuse)")
        return 2
    try:
        if args.attempts:
            rows = read_attempts(args.attempts)
        else:
            problems, skipped = load_problems(args.data, n=args.n, seed=args.seed, problem_field=args.problem_field,
                                              answer_field=args.answer_field, skip_bad_rows=args.skip_bad_rows)
            if skipped:
                console.print(f"skipped {skipped} bad rows of {args.data}")
    except DataError as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    generate = None
    if not args.attempts:
        generate = make_generator(args.model, args.base_url, args.api_key_env, args.max_tokens, args.temperature,
                                  args.batch_size)
        with Progress(console=console) as progress:
            task = progress.add_task("attempts", total=len(problems))
            rows = sample_attempts(problems, generate, k=args.k, on_batch=lambda n: progress.advance(task, n))
    write_attempts(rows, args.out)
    if args.teacher == "rule":
        writer = rule_writer
    elif args.teacher_model:
        writer = prompt_writer(make_generator(args.teacher_model, args.teacher_base_url, args.api_key_env,
                                              args.synthesis_max_tokens, args.temperature, args.batch_size))
    elif args.base_url or generate is None:
        writer = prompt_writer(make_generator(args.model, args.base_url, args.api_key_env, args.synthesis_max_tokens,
                                              args.temperature, args.batch_size))
    else:
        synthesize = copy.copy(generate)  # shares the loaded model; only the generation budget differs
        synthesize.max_new_tokens = args.synthesis_max_tokens
        writer = prompt_writer(synthesize)
    examples, stats = build_examples(
        rows, writer, n_pos=args.n_pos, n_neg=args.n_neg, m_max=args.m_max,
        correct_per_problem=args.correct_per_problem, references_per_wrong=args.references_per_wrong, cuts=args.cuts,
        prefix_match=args.prefix_match, seed=args.seed,
    )
    out = write_examples(examples, stats, args.out)
    console.print(stats_table(stats))
    console.print(f"wrote {len(examples)} examples to {out / DATA_FILE}, counts to {out / STATS_FILE} and the "
                  f"attempts to {out / ATTEMPTS_FILE}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        out = train_sft(args.data, args.model, args.out, epochs=args.epochs, lr=args.lr, max_length=args.max_length,
                        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps, seed=args.seed,
                        lora_r=args.lora_r)
    except DataError as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    console.print(f"saved the fine-tuned model to {out}")
    return 0
