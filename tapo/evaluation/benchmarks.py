"""Benchmarks: the registered names aime24/aime25/hmmt25 (Hugging Face hub), local files, or any other
`tapo.data.load_problems` spec (a hub dataset `name[:config]`, `rg:TASK`).

Loading and row validation are tapo.data's, so a bad row fails with its file, row and field, exactly as in training.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tapo.data import DataError, load_problems


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: str  # the spec it was loaded from, shown in the report
    problems: tuple[Problem, ...]

    def fingerprint(self) -> str:
        """sha256 over every (id, problem, answer): a resumed run must see exactly the problems it started with."""
        payload = json.dumps([[p.id, p.problem, p.answer] for p in self.problems])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class HubBenchmark:
    dataset: str
    split: str
    id_field: str
    problem_field: str = "problem"
    answer_field: str = "answer"


# Column names as published on each dataset card (MathArena stores integer answers and a 1-based problem_idx).
HUB_BENCHMARKS = {
    "aime24": HubBenchmark("HuggingFaceH4/aime_2024", split="train", id_field="id"),
    "aime25": HubBenchmark("MathArena/aime_2025", split="train", id_field="problem_idx"),
    "hmmt25": HubBenchmark("MathArena/hmmt_feb_2025", split="train", id_field="problem_idx"),
}
DEFAULT_BENCHMARKS = ("aime24", "aime25", "hmmt25")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
OFFLINE_HINT = (
    f"Registered benchmarks: {', '.join(HUB_BENCHMARKS)}. Without hub access evaluate a local copy instead: "
    f"--data FILE (.jsonl/.json/.parquet with 'problem' and 'answer' columns and an optional 'id')"
)


def load_benchmark(spec: str) -> Benchmark:
    """A registered name (see HUB_BENCHMARKS), a file (named by its stem) or any other load_problems spec."""
    is_file = Path(spec).suffix in FILE_SUFFIXES
    try:
        if spec in HUB_BENCHMARKS:
            hub = HUB_BENCHMARKS[spec]
            dataset, _ = load_problems(
                hub.dataset,
                split=hub.split,
                problem_field=hub.problem_field,
                answer_field=hub.answer_field,
                id_field=hub.id_field,
            )
        else:
            dataset, _ = load_problems(spec)
    except DataError as error:
        if is_file:
            raise
        raise DataError(f"{error}\n{OFFLINE_HINT}") from error
    problems = tuple(Problem(row["id"], row["problem"], row["answer"]) for row in dataset)
    if is_file:  # by its resolved path, so `x.jsonl` and `./x.jsonl` resume the same run
        return Benchmark(Path(spec).stem, str(Path(spec).resolve()), problems)
    return Benchmark(spec, spec, problems)
