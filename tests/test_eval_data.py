"""Benchmark loading: local jsonl/parquet, bad rows, the hub path (faked: tests are offline) and real shared data."""

import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from tapo.data import DataError
from tapo.evaluation.benchmarks import HUB_BENCHMARKS, Problem, load_benchmark

SHARED_BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_jsonl_rows_become_problems(tmp_path):
    path = write_jsonl(
        tmp_path / "mini.jsonl",
        [
            {"id": "a", "problem": "1+1?", "answer": "2"},
            {"id": 7, "problem": "6*7?", "answer": 42},
            {"problem": "3-1?", "answer": "2"},
        ],
    )
    bench = load_benchmark(str(path))
    assert bench.name == "mini" and bench.source == str(path.resolve())
    assert bench.problems == (Problem("a", "1+1?", "2"), Problem("7", "6*7?", "42"), Problem("2", "3-1?", "2"))


def test_parquet_rows_become_problems(tmp_path):
    path = tmp_path / "mini.parquet"
    table = pyarrow.Table.from_pylist(
        [{"id": "x", "problem": "p", "answer": "1"}, {"id": "y", "problem": "q", "answer": "2"}]
    )
    pyarrow.parquet.write_table(table, path)
    assert load_benchmark(str(path)).problems == (Problem("x", "p", "1"), Problem("y", "q", "2"))


def test_fingerprint_changes_with_any_answer(tmp_path):
    one = load_benchmark(str(write_jsonl(tmp_path / "a.jsonl", [{"problem": "p", "answer": "1"}])))
    two = load_benchmark(str(write_jsonl(tmp_path / "b.jsonl", [{"problem": "p", "answer": "2"}])))
    assert one.fingerprint() != two.fingerprint()


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"problem": "p", "answer": "1"}, {"problem": "q"}], r"line 2, field 'answer': missing"),
        ([{"problem": "", "answer": "1"}], r"line 1, field 'problem': empty"),
        ([{"problem": "p", "answer": "1"}, "not json {"], r"line 2, field '<json>': malformed JSON"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as error:
        load_benchmark(str(path))
    assert str(path) in str(error.value)
    assert "--data" not in str(error.value)  # the offline hint is for hub benchmarks only


def test_unknown_benchmark_offline_gets_the_hint(tmp_path):
    with pytest.raises(DataError, match=r"(?s)aime23.*Registered benchmarks: aime24, aime25, hmmt25.*--data FILE"):
        load_benchmark("aime23")
    with pytest.raises(DataError, match="not found"):
        load_benchmark(str(tmp_path / "nope.jsonl"))


def test_hub_failure_suggests_a_local_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"(?s)HuggingFaceH4/aime_2024.*no network.*--data FILE"):
        load_benchmark("aime24")


def test_hub_benchmarks_use_each_dataset_columns(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"problem_idx": 1, "problem": "p", "answer": 204}, {"problem_idx": 2, "problem": "q", "answer": 7}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bench = load_benchmark("aime25")
    assert calls == [("MathArena/aime_2025", None, "train")]
    assert bench.name == "aime25"
    assert bench.problems == (Problem("1", "p", "204"), Problem("2", "q", "7"))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: [{"problem_idx": 1, "problem": "p"}])
    with pytest.raises(DataError, match=r"MathArena/hmmt_feb_2025"):
        load_benchmark("hmmt25")
    assert {name: hub.dataset for name, hub in HUB_BENCHMARKS.items()} == {
        "aime24": "HuggingFaceH4/aime_2024",
        "aime25": "MathArena/aime_2025",
        "hmmt25": "MathArena/hmmt_feb_2025",
    }


@pytest.mark.skipif(
    not list(SHARED_BENCHMARKS.glob("*.jsonl")), reason=f"no real benchmark files in {SHARED_BENCHMARKS}"
)
def test_shared_benchmark_files_load_and_their_answers_verify():
    from tapo.core.verify import is_correct

    for path in sorted(SHARED_BENCHMARKS.glob("*.jsonl")):
        bench = load_benchmark(str(path))
        assert len(bench.problems) >= 1
        for problem in bench.problems:  # a gold answer the verifier cannot match to itself would score 0 forever
            assert is_correct(f"The answer is \\boxed{{{problem.answer}}}.", problem.answer), (path, problem.id)
