"""`evaluate()`: sample k responses per problem, grade them, and keep everything in a resumable run folder.

Run folder:
  config.json    every setting that shapes the samples; resuming with other settings is refused
  samples.jsonl  one line per (benchmark, problem, sample), appended and flushed after every batch
  summary.json   metrics computed from samples.jsonl alone, plus report.md, pass_at_k.png, dsr_err.png

Resuming: the batches are a fixed cut of all (problem, sample) pairs, each with a seed derived from (seed, benchmark,
batch index), so a batch that is re-run after a crash produces what the first attempt would have. Pairs already on file
are skipped, and the summary only reads the file: an interrupted-then-resumed run ends with the uninterrupted summary.
`--limit N` only selects which pairs get written, not how batches are cut, so a later run without it continues.
"""

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tapo.core.synthesis import MARKERS
from tapo.core.verify import extract_answer, is_correct
from tapo.data import PROMPT_TEMPLATE, DataError
from tapo.evaluation.benchmarks import DEFAULT_BENCHMARKS, Benchmark, Problem, load_benchmark
from tapo.evaluation.errors import EvalConfigError
from tapo.evaluation.generate import Completion, load_sampler, prompt_ids, resolve_backend
from tapo.evaluation.metrics import DEFINITIONS, benchmark_summary
from tapo.evaluation.reflection import analyze_reflection, marker_pattern
from tapo.evaluation.report import write_report

SAMPLES_FILE, CONFIG_FILE, SUMMARY_FILE = "samples.jsonl", "config.json", "summary.json"


def evaluate(
    model: str,
    benchmarks: Sequence[str] = DEFAULT_BENCHMARKS,
    k: int = 16,
    *,
    backend: str = "auto",
    max_tokens: int = 4096,
    temperature: float = 0.6,
    top_p: float = 0.95,
    batch_size: int = 16,
    limit: int | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    markers: Sequence[str] = MARKERS,
    progress: bool = True,
    after_batch: Callable[[str, int], None] | None = None,
) -> dict:
    """Evaluate `model` (a tapo.models name, hub id or path) on `benchmarks` (registered names or .jsonl/.parquet files)
    with k samples per problem; returns the summary also written to `out`/summary.json.

    `limit` keeps the first N problems of each benchmark; `after_batch(benchmark, batch_index)` runs after every batch
    has been written (progress hooks, tests that interrupt a run).
    """
    counts = {"k": k, "batch_size": batch_size, "max_tokens": max_tokens, "limit": 1 if limit is None else limit}
    for name, value in counts.items():
        if value < 1:
            raise EvalConfigError(f"{name} must be >= 1, got {value}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise EvalConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    loaded = [load_benchmark(spec) for spec in benchmarks]
    names = [bench.name for bench in loaded]
    if len(set(names)) != len(names):
        raise EvalConfigError(f"benchmark names must be unique, got {names}")
    backend = resolve_backend(backend)
    run_dir = Path(out) if out is not None else default_run_dir(model)
    config = run_config(model, loaded, k, backend, max_tokens, temperature, top_p, batch_size, seed, markers)
    claim_run_dir(run_dir, config)

    samples_path = run_dir / SAMPLES_FILE
    records, complete_bytes = read_samples(samples_path)
    if samples_path.exists():
        with samples_path.open("r+b") as file:  # drop a line cut short by a crash before appending after it
            file.truncate(complete_bytes)
    done = {(r["benchmark"], r["problem_id"], r["sample_index"]) for r in records}
    selected = {bench.name: bench.problems[:limit] for bench in loaded}

    def missing(bench: Benchmark, batch: list[tuple[int, int]]) -> list[tuple[int, int]]:
        n_selected = len(selected[bench.name])
        return [(p, s) for p, s in batch if p < n_selected and (bench.name, bench.problems[p].id, s) not in done]

    work = [
        (bench, index, batch)
        for bench in loaded
        for index, batch in enumerate(plan_batches(len(bench.problems), k, batch_size))
        if missing(bench, batch)
    ]
    if work:
        sampler = load_sampler(model, backend, max_tokens, temperature, top_p, seed)
        pattern = marker_pattern(markers)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with samples_path.open("a", encoding="utf-8") as sink, Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("sampling", total=sum(len(missing(bench, batch)) for bench, _, batch in work))
            for bench, index, batch in work:
                bar.update(task, description=f"sampling {bench.name}")
                prompts = {p: prompt_ids(sampler.tokenizer, bench.problems[p].problem) for p, _ in batch}
                completions = sampler.generate(
                    [prompts[p] for p, _ in batch],
                    batch_seed=derive_seed(seed, bench.name, index),
                    sample_seeds=[derive_seed(seed, bench.name, bench.problems[p].id, s) for p, s in batch],
                )
                wanted = set(missing(bench, batch))
                lines = [
                    json.dumps(sample_record(bench.name, bench.problems[p], s, completion, pattern)) + "\n"
                    for (p, s), completion in zip(batch, completions, strict=True)
                    if (p, s) in wanted
                ]
                sink.write("".join(lines))
                sink.flush()
                bar.advance(task, len(lines))
                if after_batch is not None:
                    after_batch(bench.name, index)

    summary = summarize_run(run_dir, {name: [p.id for p in problems] for name, problems in selected.items()})
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    write_report(summary, run_dir)
    return summary


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (Python's own hash() of strings changes between processes)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def plan_batches(n_problems: int, k: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """All (problem index, sample index) pairs in order, cut into batches: fixed by data and settings alone."""
    pairs = [(p, s) for p in range(n_problems) for s in range(k)]
    return [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]


def sample_record(
    benchmark: str, problem: Problem, sample_index: int, completion: Completion, pattern: re.Pattern
) -> dict:
    answer = extract_answer(completion.text)
    correct = is_correct(completion.text, problem.answer)
    reflection = analyze_reflection(completion.text, problem.answer, answer, correct, pattern)
    return {
        "benchmark": benchmark,
        "problem_id": problem.id,
        "sample_index": sample_index,
        "gold": problem.answer,
        "answer": answer,
        "correct": correct,
        "n_tokens": completion.n_tokens,
        "truncated": completion.truncated,
        "reflection": asdict(reflection),
        "text": completion.text,
    }


def default_run_dir(model: str) -> Path:
    """runs/eval/<last part of the model name>: the same command twice resumes instead of starting over."""
    return Path("runs/eval") / re.sub(r"[^\w.-]+", "_", model.rstrip("/").split("/")[-1])


def run_config(
    model: str,
    benchmarks: Sequence[Benchmark],
    k: int,
    backend: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    markers: Sequence[str],
) -> dict:
    """Every setting that shapes samples.jsonl (not `limit`, `out` or `progress`), in its JSON form."""
    config = {
        "model": model,
        "benchmarks": {
            b.name: {"source": b.source, "n_problems": len(b.problems), "fingerprint": b.fingerprint()}
            for b in benchmarks
        },
        "k": k,
        "backend": backend,
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "batch_size": batch_size,
        "seed": seed,
        "markers": sorted(markers),
        "prompt_template": PROMPT_TEMPLATE,
    }
    return json.loads(json.dumps(config))


def claim_run_dir(run_dir: Path, config: dict) -> None:
    """Start a run folder, or check that the one found was started with the same settings."""
    path = run_dir / CONFIG_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        changed = [
            f"{key}: {saved.get(key)!r} -> {config.get(key)!r}"
            for key in sorted(saved.keys() | config.keys())
            if saved.get(key) != config.get(key)
        ]
        if changed:
            raise EvalConfigError(
                f"{run_dir} holds a run with other settings ({'; '.join(changed)}); "
                f"resume it with the same settings or pass another --out"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


def read_samples(path: Path) -> tuple[list[dict], int]:
    """The records of samples.jsonl and the byte length of its complete lines.

    A last line without its newline was cut short by a crash mid-write and is left out; any other unreadable line
    means the file was damaged otherwise and is an error.
    """
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    complete_bytes = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:complete_bytes].splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path} line {number}: not valid JSON ({error.msg}); the samples file is damaged"
            ) from error
    return records, complete_bytes


def summarize_run(run_dir: str | Path, selection: dict[str, list[str]] | None = None) -> dict:
    """The summary of a run folder, from config.json and samples.jsonl only.

    `selection` maps benchmark -> problem ids to include (default: every problem with samples, in file order).
    A (problem, sample) pair found twice counts once.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    records, _ = read_samples(run_dir / SAMPLES_FILE)
    grouped: dict[str, dict[str, dict[int, dict]]] = {name: {} for name in config["benchmarks"]}
    for record in records:
        grouped[record["benchmark"]].setdefault(record["problem_id"], {}).setdefault(record["sample_index"], record)
    selection = selection or {name: list(problems) for name, problems in grouped.items()}
    benchmarks = {}
    for name, problem_ids in selection.items():
        by_problem = {
            pid: [grouped[name][pid][s] for s in sorted(grouped[name][pid])]
            for pid in problem_ids
            if pid in grouped[name]
        }
        if by_problem:
            benchmarks[name] = benchmark_summary(by_problem, config["k"])
    return {
        "model": config["model"],
        "k": config["k"],
        "config": config,
        "definitions": DEFINITIONS,
        "benchmarks": benchmarks,
    }
