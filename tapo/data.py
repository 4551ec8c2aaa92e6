"""Problem sets: load, validate, and turn into TRL's conversational `prompt` column.

Every source becomes a `datasets.Dataset` with string columns `id`, `problem`, `answer` (plus `solution`, a gold
worked solution, when the source has one). Rows are checked before any training starts; a bad row is reported with
its file, row and field. Row numbers: `line N` is the 1-based line of a .jsonl file; `row N` is the 0-based index in
a .json array, a parquet file, a reasoning-gym set or a hub split.
"""

import json
import math
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import yaml

PROMPT_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
# Used when the requested field is the default one and a source names it otherwise.
FIELD_ALIASES = {"problem": ("problem", "question", "prompt"), "answer": ("answer", "final_answer")}
SOLUTION_FIELD = "solution"
MAX_REPORTED_ROWS = 5


class DataError(ValueError):
    """A problem set that cannot be used as given; the message names the file, the row and the field."""


def load_problems(
    spec: str,
    *,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str = "id",
    skip_bad_rows: bool = False,
) -> tuple[datasets.Dataset, int]:
    """Loads `spec` and returns (dataset with id/problem/answer[/solution], number of bad rows skipped).

    spec: a `.jsonl`, `.json` (array of objects, or JSON lines) or `.parquet` file; `arith[:key=value,...]` (the
    testbed's arithmetic chains, `n` items, default 1000, from `seed`; keys in tapo.arith); `rg:TASK[:key=value,...]` or a
    bare reasoning-gym task name (generated offline: `n` items, default 1000, from `seed`; the key=values go to
    `reasoning_gym.create_dataset`, e.g. `rg:chain_sum:min_terms=2,max_terms=3`); otherwise a hub dataset
    `name[:config]` loaded with `datasets.load_dataset(..., split=split)` (needs network).
    For files and hub sets, `n` keeps a random subset of `n` valid rows drawn with `seed`.
    Numeric answers (int/float) become strings; other non-strings, empty or missing problems/answers and duplicate
    ids are bad rows: a DataError lists them, or with `skip_bad_rows=True` they are dropped and counted.
    Missing ids are filled with the row's 0-based position. The field names apply to files and hub sets;
    reasoning-gym rows always use `problem` / `answer`.
    """
    source, rows = _read_rows(spec, split=split, n=n, seed=seed)
    if not rows:
        raise DataError(f"{source}: no rows")
    fields = {
        "id": id_field,
        "problem": _pick_field(source, rows, problem_field, "problem"),
        "answer": _pick_field(source, rows, answer_field, "answer"),
    }
    dataset, bad = _validate(rows, fields)
    if bad and not skip_bad_rows:
        listed = "\n".join(f"  {row}, field '{field}': {reason}" for row, field, reason in bad[:MAX_REPORTED_ROWS])
        raise DataError(
            f"{source}: {len(bad)} bad row(s) (first {min(len(bad), MAX_REPORTED_ROWS)} below); fix them or pass "
            f"skip_bad_rows=True to drop them:\n{listed}"
        )
    if len(dataset) == 0:
        raise DataError(f"{source}: no usable rows")
    if n is not None and n < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(n))
    return dataset, len(bad)


def _read_rows(spec: str, *, split: str, n: int | None, seed: int) -> tuple[str, list[tuple[str, object]]]:
    """(source name for messages, [(row label, raw row)]) for any spec form."""
    if Path(spec).suffix in (".jsonl", ".json", ".parquet"):
        return spec, _read_file(Path(spec))
    if spec == "arith" or spec.startswith("arith:"):  # tapo.arith: step-checkable chains, generated locally
        from tapo import arith

        try:
            generated = arith.rows(arith.ArithSpec.parse(spec), n=n or 1000, seed=seed)
        except arith.ArithSpecError as err:
            raise DataError(str(err)) from err
        return spec, [(f"row {i}", r) for i, r in enumerate(generated)]
    import reasoning_gym  # imported here: it is large, and only task specs need it

    if spec.startswith("rg:") or spec.split(":")[0] in reasoning_gym.factory.DATASETS:
        return spec, _generate_reasoning_gym(spec, n=n or 1000, seed=seed)
    name, _, config_name = spec.partition(":")
    try:
        hub = datasets.load_dataset(name, config_name or None, split=split)
    except Exception as err:  # offline, no such dataset, bad config: all end the same way for the user
        raise DataError(f"{spec}: cannot load hub dataset split '{split}' ({type(err).__name__}: {err})") from err
    return f"{spec}[{split}]", [(f"row {i}", r) for i, r in enumerate(hub)]


def _read_file(path: Path) -> list[tuple[str, object]]:
    """Rows of a local file; a .jsonl line that is not valid JSON becomes a `_BadJson` row, reported with the rest."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".parquet":
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: unreadable parquet file ({err})") from err
        return [(f"row {i}", r) for i, r in enumerate(records)]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err
    if text.lstrip().startswith("["):  # a .json array; anything else is read as JSON lines, as `datasets` does
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: malformed JSON array ({err})") from err
        return [(f"row {i}", r) for i, r in enumerate(records)]
    lines = enumerate(text.splitlines(), start=1)
    return [(f"line {i}", _parse_json_line(line)) for i, line in lines if line.strip()]


def _generate_reasoning_gym(spec: str, *, n: int, seed: int) -> list[tuple[str, object]]:
    """`n` items of `rg:TASK[:key=value,...]`; values are parsed as YAML scalars (`2` -> int, `true` -> bool)."""
    import reasoning_gym

    task, _, options = spec.removeprefix("rg:").partition(":")
    config = {key: yaml.safe_load(value) for key, _, value in (kv.partition("=") for kv in options.split(",") if kv)}
    try:
        items = reasoning_gym.create_dataset(task, size=n, seed=seed, **config)
    except Exception as err:  # unknown task or option: reasoning-gym raises ValueError, TypeError or AssertionError
        raise DataError(f"{spec}: cannot create the reasoning-gym dataset ({type(err).__name__}: {err})") from err
    rows = []
    for i, item in enumerate(items):
        row = {"id": f"{task}-{seed}-{i}", "problem": item["question"], "answer": item["answer"]}
        if "answer_cot" in item["metadata"]:  # gsm_symbolic's worked solution: the gold `solution`
            row[SOLUTION_FIELD] = item["metadata"]["answer_cot"]
        rows.append((f"row {i}", row))
    return rows


class _BadJson(str):
    """The json error message of a malformed line, carried in place of the row."""


class _BadRow(Exception):
    """One row's first problem: which field, and why."""

    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.field, self.reason = field, reason


def _parse_json_line(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return _BadJson(f"{err.msg} at column {err.colno}")


def _pick_field(source: str, rows: list[tuple[str, object]], requested: str, default: str) -> str:
    """The requested field; for a default name (`problem`, `answer`) the first of its aliases that some row has."""
    keys = {k for _, r in rows if isinstance(r, dict) for k in r}
    tried = FIELD_ALIASES[default] if requested == default else (requested,)
    for alias in tried:
        if alias in keys:
            return alias
    raise DataError(f"{source}: no row has a field {' / '.join(map(repr, tried))}; fields seen: {sorted(keys)}")


def _as_text(value: object, field: str) -> str:
    """Strings pass, finite ints/floats become strings (`7`, `0.5`), anything else is a bad row."""
    if value is None:
        raise _BadRow(field, "missing")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise _BadRow(field, f"not a finite number: {value!r}")
        return str(value)
    if not isinstance(value, str):
        raise _BadRow(field, f"expected a string or number, got {type(value).__name__}")
    if not value.strip():
        raise _BadRow(field, "empty")
    return value


def _clean_row(index: int, row: object, fields: dict[str, str]) -> dict[str, str | None]:
    """id/problem/answer/solution of one raw row; raises _BadRow."""
    if isinstance(row, _BadJson):
        raise _BadRow("<json>", f"malformed JSON ({row})")
    if not isinstance(row, dict):
        raise _BadRow("<row>", f"expected an object, got {type(row).__name__}")
    raw_id = row.get(fields["id"])
    solution = row.get(SOLUTION_FIELD)
    if solution is not None and not isinstance(solution, str):
        raise _BadRow(SOLUTION_FIELD, f"expected a string, got {type(solution).__name__}")
    return {
        "id": str(index) if raw_id is None else _as_text(raw_id, fields["id"]),
        "problem": _as_text(row.get(fields["problem"]), fields["problem"]),
        "answer": _as_text(row.get(fields["answer"]), fields["answer"]),
        SOLUTION_FIELD: solution,
    }


def _validate(
    rows: list[tuple[str, object]], fields: dict[str, str]
) -> tuple[datasets.Dataset, list[tuple[str, str, str]]]:
    """The clean rows as a Dataset, plus (row label, field, reason) for each bad row."""
    names = ["id", "problem", "answer"]
    if any(isinstance(r, dict) and r.get(SOLUTION_FIELD) is not None for _, r in rows):
        names.append(SOLUTION_FIELD)
    columns = {name: [] for name in names}
    first_label_of_id: dict[str, str] = {}
    bad = []
    for index, (label, row) in enumerate(rows):
        try:
            clean = _clean_row(index, row, fields)
            if clean["id"] in first_label_of_id:
                raise _BadRow(fields["id"], f"duplicate id {clean['id']!r} (first at {first_label_of_id[clean['id']]})")
        except _BadRow as err:
            bad.append((label, err.field, err.reason))
            continue
        first_label_of_id[clean["id"]] = label
        for name in names:
            columns[name].append(clean[name])
    features = datasets.Features({name: datasets.Value("string") for name in names})
    return datasets.Dataset.from_dict(columns, features=features), bad


def to_conversational(
    dataset: datasets.Dataset, system_prompt: str | None = None, template: str = PROMPT_TEMPLATE
) -> datasets.Dataset:
    """Adds TRL's conversational `prompt` column: [system?] + user message `template` with `{problem}` filled in.

    The fill is a plain string replace, so templates may contain LaTeX braces like `\\boxed{}`. All other columns
    (id, problem, answer, solution) stay: TRL hands them to reward functions as keyword arguments."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def add_prompt(row):
        return {"prompt": head + [{"role": "user", "content": template.replace("{problem}", row["problem"])}]}

    return dataset.map(add_prompt)


def train_eval_split(
    dataset: datasets.Dataset, eval_size: int | float, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out eval): `eval_size` rows, or that fraction, drawn with `seed`; held-out rows whose problem text
    also occurs in the train split are then dropped, so the held-out set can come out smaller (generated tasks such
    as reasoning-gym's repeat items, and a repeated item would grade memorization, not generalization)."""
    parts = dataset.train_test_split(test_size=eval_size, seed=seed)
    seen = set(parts["train"]["problem"])
    return parts["train"], parts["test"].filter(lambda row: row["problem"] not in seen)
