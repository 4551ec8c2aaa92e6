"""End-to-end `tapo eval`: the run folder, resuming, config checks, the CLI and --compare.

The tiny model has random weights, so its accuracy is ~0; a scripted sampler checks grading end to end instead.
"""

import argparse
import json
from pathlib import Path

import pytest

from tapo.evaluation import runner
from tapo.evaluation.cli import register
from tapo.evaluation.compare import compare_runs
from tapo.evaluation.errors import EvalConfigError
from tapo.evaluation.generate import Completion
from tapo.evaluation.runner import evaluate, read_samples

PROBLEMS = [
    {"id": "add", "problem": "What is 2 + 3?", "answer": "5"},
    {"id": "mul", "problem": "What is 6 * 7?", "answer": "42"},
    {"id": "sub", "problem": "What is 10 - 4?", "answer": "6"},
]
# 3 problems x k=2 in batches of 3: the second batch mixes problems, which resuming must handle.
SETTINGS = dict(k=2, max_tokens=16, batch_size=3, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Matmuls of the tiny model are too small to split: on a busy 2-core machine extra threads just spin (~10x)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny3.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROBLEMS))
    return path


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, data_file, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "full"
    return out, evaluate(str(tiny_model_dir), [str(data_file)], out=out, **SETTINGS)


def sample_texts(run_dir: Path) -> dict:
    records, _ = read_samples(run_dir / "samples.jsonl")
    return {(r["problem_id"], r["sample_index"]): r["text"] for r in records}


def test_run_folder_contents(full_run):
    out, summary = full_run
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "samples.jsonl",
        "summary.json",
        "report.md",
        "pass_at_k.png",
        "dsr_err.png",
    }
    records, _ = read_samples(out / "samples.jsonl")
    assert sorted((r["problem_id"], r["sample_index"]) for r in records) == sorted(
        (p["id"], s) for p in PROBLEMS for s in range(2)
    )
    for r in records:
        assert r["benchmark"] == "tiny3" and r["gold"] in {"5", "42", "6"}
        assert 1 <= r["n_tokens"] <= 16
        assert r["n_tokens"] == 16 or not r["truncated"]  # only max_tokens can truncate
        assert set(r["reflection"]) == {"reflected", "marker", "char_index", "first_answer", "first_correct"}
    assert json.loads((out / "summary.json").read_text()) == summary
    bench = summary["benchmarks"]["tiny3"]
    assert bench["n_problems"] == 3 and bench["n_samples"] == 6 and bench["complete"]
    assert set(bench["pass@k"]) == {"1", "2"}
    report = (out / "report.md").read_text()
    for text in ("## tiny3", "avg@2", "pass@2", "DSR", "ERR", "truncated", "## Definitions"):
        assert text in report
    for png in ("pass_at_k.png", "dsr_err.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_resume_after_interruption_matches_uninterrupted_run(full_run, tiny_model_dir, data_file, tmp_path):
    def crash(benchmark, batch_index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(str(tiny_model_dir), [str(data_file)], out=tmp_path, after_batch=crash, **SETTINGS)
    assert len(read_samples(tmp_path / "samples.jsonl")[0]) == 3
    with (tmp_path / "samples.jsonl").open("a") as file:  # a crash in the middle of writing a line
        file.write('{"benchmark": "tiny3", "problem_id": "mu')
    summary = evaluate(str(tiny_model_dir), [str(data_file)], out=tmp_path, **SETTINGS)
    assert summary == full_run[1]
    assert sample_texts(tmp_path) == sample_texts(full_run[0])


def test_limit_then_full_run_matches_uninterrupted_run(full_run, tiny_model_dir, data_file, tmp_path):
    partial = evaluate(str(tiny_model_dir), [str(data_file)], out=tmp_path, limit=1, **SETTINGS)
    assert partial["benchmarks"]["tiny3"]["n_problems"] == 1
    assert evaluate(str(tiny_model_dir), [str(data_file)], out=tmp_path, **SETTINGS) == full_run[1]
    assert sample_texts(tmp_path) == sample_texts(full_run[0])  # random weights: the texts differ, not the summary


def test_resuming_with_other_settings_is_refused(full_run, tiny_model_dir, data_file):
    with pytest.raises(EvalConfigError, match=r"temperature: 0\.6 -> 0\.5.*another --out"):
        evaluate(str(tiny_model_dir), [str(data_file)], out=full_run[0], **{**SETTINGS, "temperature": 0.5})


@pytest.mark.parametrize("bad", [{"k": 0}, {"limit": 0}, {"batch_size": 0}, {"temperature": -1.0}, {"top_p": 0.0}])
def test_impossible_settings_are_refused_before_loading_anything(bad, tmp_path):
    with pytest.raises(EvalConfigError):
        evaluate("tiny", [str(tmp_path / "never-read.jsonl")], out=tmp_path / "run", **{**SETTINGS, **bad})
    assert not (tmp_path / "run").exists()


def test_damaged_samples_file_is_an_error(full_run, tmp_path):
    (tmp_path / "samples.jsonl").write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="samples.jsonl line 2"):
        read_samples(tmp_path / "samples.jsonl")


class ScriptedTokenizer:
    chat_template = None

    def __call__(self, text):
        return {"input_ids": [len(text)]}


class ScriptedSampler:
    """Sample 0 answers right at once; sample 1 answers 0 first, then reflects to the right answer."""

    tokenizer = ScriptedTokenizer()

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, batch_seed, sample_seeds):
        completions = []
        for seed in sample_seeds:
            problem, sample = self.answers[seed]
            text = f"\\boxed{{{problem}}}" if sample == 0 else f"It is \\boxed{{0}}. Wait, it is \\boxed{{{problem}}}"
            completions.append(Completion(text, n_tokens=8 + sample, truncated=False))
        return completions


def test_grading_end_to_end_with_scripted_answers(data_file, tmp_path, monkeypatch):
    seeds = {runner.derive_seed(0, "tiny3", p["id"], s): (p["answer"], s) for p in PROBLEMS for s in range(2)}
    monkeypatch.setattr(runner, "load_sampler", lambda *args: ScriptedSampler(seeds))
    bench = evaluate("scripted", [str(data_file)], out=tmp_path, **SETTINGS)["benchmarks"]["tiny3"]
    assert bench["avg@k"] == 1.0 and bench["pass@k"] == {"1": 1.0, "2": 1.0}
    assert bench["dsr"] == {"value": 0.5, "count": 3, "total": 6}
    assert bench["err"] == {"value": 1.0, "count": 3, "total": 3}
    assert bench["length_tokens"]["mean"] == 8.5


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tapo")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_eval_and_compare(full_run, tiny_model_dir, data_file, tmp_path, capsys):
    run_dir = tmp_path / "cli-run"
    args = parse(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data_file),
            "--k",
            "2",
            "--max-tokens",
            "16",
            "--batch-size",
            "3",
            "--out",
            str(run_dir),
        ]
    )
    assert args.func(args) == 0
    # The CLI's defaults are evaluate()'s, so this is the same run as full_run.
    assert json.loads((run_dir / "summary.json").read_text()) == full_run[1]
    args = parse(["eval", "--compare", str(full_run[0]), str(run_dir), "--out", str(tmp_path / "cmp")])
    assert args.func(args) == 0
    assert "avg@k" in capsys.readouterr().out
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| avg@k |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    args = parse(["eval", "--model", "tiny", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")])
    assert args.func(args) == 2
    assert "file not found" in " ".join(capsys.readouterr().out.split())
    args = parse(["eval"])
    assert args.func(args) == 2


def write_run(run_dir: Path, correct: dict[str, list[bool]]) -> Path:
    """A run folder written by hand: config.json and samples.jsonl, no summary.json (compare must compute it)."""
    run_dir.mkdir()
    config = {"model": run_dir.name, "k": 2, "benchmarks": {"b": {"source": "hand"}}}
    (run_dir / "config.json").write_text(json.dumps(config))
    lines = [
        {
            "benchmark": "b",
            "problem_id": pid,
            "sample_index": s,
            "correct": ok,
            "n_tokens": 10 * (s + 1),
            "truncated": False,
            "reflection": {"reflected": False, "first_correct": ok},
        }
        for pid, oks in correct.items()
        for s, ok in enumerate(oks)
    ]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def test_compare_deltas_by_hand(tmp_path):
    run_a = write_run(tmp_path / "a", {"p1": [True, False], "p2": [False, False]})
    run_b = write_run(tmp_path / "b", {"p1": [True, True], "p2": [False, True]})
    table = compare_runs(run_a, run_b, out=tmp_path / "cmp")["benchmarks"]["b"]
    assert table["avg@k"] == {"a": 0.25, "b": 0.75, "delta": 0.5}
    assert table["pass@2"] == {"a": 0.5, "b": 1.0, "delta": 0.5}
    assert table["DSR"]["delta"] == 0.5 and table["ERR"] == {"a": None, "b": None, "delta": None}
    assert table["mean length"] == {"a": 15.0, "b": 15.0, "delta": 0.0}
    assert "| avg@k | 25.0% | 75.0% | +50.0 |" in (tmp_path / "cmp" / "compare.md").read_text()
