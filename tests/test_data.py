import json
import operator
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tapo.data import PROMPT_TEMPLATE, DataError, load_problems, to_conversational, train_eval_split


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD = [
    {"id": "a", "problem": "1+1?", "answer": "2"},
    {"id": "b", "problem": "2*3?", "answer": 6, "solution": "2*3 = 6"},
    {"id": "c", "problem": "1/2?", "answer": 0.5},
]


def test_jsonl_loads_and_numbers_become_strings(tmp_path):
    dataset, skipped = load_problems(write_jsonl(tmp_path / "p.jsonl", GOOD))
    assert skipped == 0
    assert dataset.to_list() == [
        {"id": "a", "problem": "1+1?", "answer": "2", "solution": None},
        {"id": "b", "problem": "2*3?", "answer": "6", "solution": "2*3 = 6"},
        {"id": "c", "problem": "1/2?", "answer": "0.5", "solution": None},
    ]


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps(GOOD, indent=2))
    lines = write_jsonl(tmp_path / "lines.json", GOOD)
    assert load_problems(str(array))[0].to_list() == load_problems(lines)[0].to_list()


def test_parquet_loads(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1?", "answer": "2"}, {"problem": "3-1?", "answer": "2"}]), path)
    dataset, _ = load_problems(str(path))
    assert dataset.to_list() == [
        {"id": "0", "problem": "1+1?", "answer": "2"},  # missing ids: the 0-based row position
        {"id": "1", "problem": "3-1?", "answer": "2"},
    ]


def test_parquet_bad_row_is_named_by_zero_based_index(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1?", "answer": "2"}, {"problem": "x", "answer": ""}]), path)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: 1 bad row.*\n  row 1, field 'answer': empty"):
        load_problems(str(path))


def test_field_aliases_and_custom_fields(tmp_path):
    aliased = write_jsonl(tmp_path / "a.jsonl", [{"question": "1+1?", "final_answer": "2"}])
    assert load_problems(aliased)[0].to_list() == [{"id": "0", "problem": "1+1?", "answer": "2"}]
    custom = write_jsonl(tmp_path / "c.jsonl", [{"key": "k1", "q": "1+1?", "gold": 2}])
    dataset, _ = load_problems(custom, problem_field="q", answer_field="gold", id_field="key")
    assert dataset.to_list() == [{"id": "k1", "problem": "1+1?", "answer": "2"}]


def test_field_absent_everywhere_names_field_and_seen_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "1+1?", "result": "2"}])
    expected = r"no row has a field 'answer' / 'final_answer'; fields seen: \['problem', 'result'\]"
    with pytest.raises(DataError, match=expected):
        load_problems(path)
    with pytest.raises(DataError, match=r"no row has a field 'gold'"):
        load_problems(path, answer_field="gold")


@pytest.mark.parametrize(
    "bad_line, field, reason",
    [
        ('{"id": "a", "problem": "again", "answer": "1"}', "id", "duplicate id 'a' (first at line 1)"),
        ('{"problem": "", "answer": "1"}', "problem", "empty"),
        ('{"problem": "   ", "answer": "1"}', "problem", "empty"),
        ('{"answer": "1", "problem": null}', "problem", "missing"),
        ('{"problem": "p"}', "answer", "missing"),
        ('{"problem": "p", "answer": ""}', "answer", "empty"),
        ('{"problem": "p", "answer": {"value": 1}}', "answer", "expected a string or number, got dict"),
        ('{"problem": "p", "answer": [1, 2]}', "answer", "expected a string or number, got list"),
        ('{"problem": "p", "answer": true}', "answer", "expected a string or number, got bool"),
        ('{"problem": "p", "answer": NaN}', "answer", "not a finite number: nan"),
        ('{"problem": "p", "answer": Infinity}', "answer", "not a finite number: inf"),
        ('{"problem": "p", "answer": -Infinity}', "answer", "not a finite number: -inf"),
        ('{"problem": ["p"], "answer": "1"}', "problem", "expected a string or number, got list"),
        ('{"id": {"k": 1}, "problem": "p", "answer": "1"}', "id", "expected a string or number, got dict"),
        ('{"problem": "p", "answer": "1", "solution": 3}', "solution", "expected a string, got int"),
        ('{"problem": "p", "answer": "1"', "<json>", "malformed JSON (Expecting ',' delimiter at column 31)"),
        ("[1, 2]", "<row>", "expected an object, got list"),
    ],
)
def test_each_bad_row_kind_names_file_line_and_field(tmp_path, bad_line, field, reason):
    # the bad row sits on line 3, after a blank line: lines are counted in the file, blank ones included
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"id": "a", "problem": "1+1?", "answer": "2"}', "", bad_line])
    with pytest.raises(DataError) as err:
        load_problems(path)
    assert str(err.value).startswith(f"{path}: 1 bad row(s)")
    assert str(err.value).endswith(f"\n  line 3, field '{field}': {reason}")
    dataset, skipped = load_problems(path, skip_bad_rows=True)
    assert skipped == 1 and dataset["id"] == ["a"]


def test_many_bad_rows_lists_first_five_and_counts_all(tmp_path):
    rows = [{"problem": "ok", "answer": "1"}] + [{"problem": "p", "answer": ""}] * 7
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_problems(path)
    listed = str(err.value).splitlines()[1:]
    assert "7 bad row(s) (first 5 below)" in str(err.value)
    assert listed == [f"  line {i}, field 'answer': empty" for i in range(2, 7)]
    dataset, skipped = load_problems(path, skip_bad_rows=True)
    assert (len(dataset), skipped) == (1, 7)


def test_all_rows_bad_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "p", "answer": ""}])
    with pytest.raises(DataError, match="no usable rows"):
        load_problems(path, skip_bad_rows=True)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: unreadable parquet file"):
        load_problems(str(tmp_path / "broken.parquet"))
    (tmp_path / "broken.json").write_text('[{"problem": "p", "answer": "1"},')
    with pytest.raises(DataError, match="broken.json: malformed JSON array"):
        load_problems(str(tmp_path / "broken.json"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_problems(str(tmp_path / "empty.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes('{"problem": "caf\xe9", "answer": "1"}'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.jsonl: not UTF-8"):
        load_problems(str(tmp_path / "latin1.jsonl"))


def test_n_keeps_a_seeded_subset(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": f"{i}+0?", "answer": i} for i in range(10)])
    first, _ = load_problems(path, n=4, seed=1)
    assert len(first) == 4 and len(set(first["id"])) == 4
    assert first["id"] == load_problems(path, n=4, seed=1)[0]["id"]
    assert first["id"] != load_problems(path, n=4, seed=2)[0]["id"]
    assert all(p == f"{a}+0?" for p, a in zip(first["problem"], first["answer"]))  # rows stay whole


def test_reasoning_gym_is_generated_deterministically():
    dataset, skipped = load_problems("chain_sum", n=5, seed=3)
    assert (len(dataset), skipped) == (5, 0)
    assert dataset.column_names == ["id", "problem", "answer"]
    assert dataset["id"] == [f"chain_sum-3-{i}" for i in range(5)]
    assert all(isinstance(a, str) and a for a in dataset["answer"])
    assert dataset.to_list() == load_problems("rg:chain_sum", n=5, seed=3)[0].to_list()
    assert dataset["problem"] != load_problems("chain_sum", n=5, seed=4)[0]["problem"]


def test_reasoning_gym_options_reach_the_generator():
    dataset, _ = load_problems("rg:chain_sum:min_terms=2,max_terms=2,max_digits=1", n=20, seed=0)
    ops = {"+": operator.add, "-": operator.sub}
    for problem, answer in zip(dataset["problem"], dataset["answer"]):
        a, op, b = re.search(r"(\d) ([+-]) (\d) =$", problem).groups()  # exactly two one-digit terms
        assert ops[op](int(a), int(b)) == int(answer)


def test_reasoning_gym_solution_and_errors():
    dataset, _ = load_problems("gsm_symbolic", n=2, seed=0)
    assert all(s and a in s for s, a in zip(dataset["solution"], dataset["answer"]))
    with pytest.raises(DataError, match=r"rg:chain_sum:bogus=1: cannot create the reasoning-gym dataset.*bogus"):
        load_problems("rg:chain_sum:bogus=1", n=2)
    with pytest.raises(DataError, match=r"rg:no_such_task: cannot create"):
        load_problems("rg:no_such_task", n=2)


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(DataError, match=r"no-such-user/no-such-set:cfg: cannot load hub dataset split 'test'"):
        load_problems("no-such-user/no-such-set:cfg", split="test")


def test_to_conversational(tmp_path):
    dataset, _ = load_problems(write_jsonl(tmp_path / "p.jsonl", GOOD))
    conv = to_conversational(dataset)
    assert conv.column_names == ["id", "problem", "answer", "solution", "prompt"]
    assert conv[0]["prompt"] == [
        {"role": "user", "content": "1+1?\n\nPlease reason step by step, and put your final answer within \\boxed{}."}
    ]
    assert PROMPT_TEMPLATE.replace("{problem}", "1+1?") == conv[0]["prompt"][0]["content"]
    with_system = to_conversational(dataset, system_prompt="Be brief.", template="Q: {problem} in \\boxed{}")
    assert with_system[1]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: 2*3? in \\boxed{}"},
    ]


def test_train_eval_split_is_disjoint_and_seeded(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": f"{i}?", "answer": i} for i in range(10)])
    dataset, _ = load_problems(path)
    train, held_out = train_eval_split(dataset, eval_size=3, seed=0)
    assert (len(train), len(held_out)) == (7, 3)
    assert set(train["id"]) | set(held_out["id"]) == set(dataset["id"])
    assert held_out["id"] == train_eval_split(dataset, eval_size=3, seed=0)[1]["id"]


def test_train_eval_split_drops_held_out_repeats_of_training_problems(tmp_path):
    # Ten rows, three distinct problems: held-out rows whose text is also a training row's must go, the rest stay.
    rows = [{"problem": f"{i % 3}+1?", "answer": i % 3 + 1} for i in range(10)]
    dataset, _ = load_problems(write_jsonl(tmp_path / "p.jsonl", rows))
    train, held_out = train_eval_split(dataset, eval_size=5, seed=0)
    drawn = dataset.train_test_split(test_size=5, seed=0)["test"]
    assert len(train) == 5 and not set(held_out["problem"]) & set(train["problem"])
    assert held_out["id"] == [r["id"] for r in drawn if r["problem"] not in set(train["problem"])]
    assert len(held_out) < 5  # problem counts 4, 3, 3: no 5 training rows can leave the held-out ones disjoint
