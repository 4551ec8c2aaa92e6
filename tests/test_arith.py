"""tapo.arith: the testbed's arithmetic chains (spec parsing, solutions, step errors, split disjointness)."""

import random

import pytest

from tapo import arith
from tapo.core.splice import splice_trajectory
from tapo.data import DataError, load_problems

CHAIN = arith.Chain(terms=(12, 7, 3, 5), ops=("+", "*", "-"))


def test_spec_parses_every_key_and_round_trips():
    spec = arith.ArithSpec.parse("arith:terms=3-6,ops=+-,max=20,mul_max=4,split=test")
    assert spec == arith.ArithSpec(min_terms=3, max_terms=6, ops="+-", max_value=20, mul_max=4, split="test")
    assert arith.ArithSpec.parse(spec.as_spec()) == spec
    assert arith.ArithSpec.parse("arith") == arith.ArithSpec()
    assert arith.ArithSpec.parse("arith:terms=4") == arith.ArithSpec(min_terms=4, max_terms=4)


@pytest.mark.parametrize("spec, message", [
    ("arith:digits=3", "unknown key"),
    ("arith:ops=+/", "ops="),
    ("arith:terms=5-3", "terms=5-3"),
    ("arith:terms=1", "terms=1-1"),
    ("arith:max=x", "'max=x'"),
    ("arith:split=dev", "split="),
    ("arith:terms", "key=value"),
])
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(arith.ArithSpecError, match=message):
        arith.ArithSpec.parse(spec)


def test_solution_writes_one_checkable_step_per_line_then_the_boxed_answer():
    assert CHAIN.problem == "Compute 12 + 7 * 3 - 5 from left to right."
    assert CHAIN.values() == [19, 57, 52] and CHAIN.answer == 52 and CHAIN.steps == 3
    assert arith.solution(CHAIN) == "12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52\n\\boxed{52}"


def test_a_step_error_propagates_and_the_splice_finds_it():
    wrong = arith.solution(CHAIN, error_step=1, error_delta=1)
    assert wrong == "12 + 7 = 19\n19 * 3 = 58\n58 - 5 = 53\n\\boxed{53}"
    trajectory = splice_trajectory(wrong, arith.solution(CHAIN), "52")
    prefix, reflection, correction = trajectory.parts()
    assert prefix == "12 + 7 = 19"
    assert reflection == "\nWait, 19 * 3 = 58 is wrong: 19 * 3 = 57. Let me redo this from there."
    assert correction == "\n19 * 3 = 57\n57 - 5 = 52\n\\boxed{52}"


def test_wrong_solutions_err_at_every_step_and_never_reach_the_answer():
    rng = random.Random(0)
    chains = arith.generate_chains(arith.ArithSpec(min_terms=4, max_terms=4), 50, seed=0)
    steps = set()
    for chain in chains:
        text, step = arith.wrong_solution(chain, rng)
        steps.add(step)
        assert not text.endswith(f"\\boxed{{{chain.answer}}}")
        assert text.splitlines()[:step] == arith.solution(chain).splitlines()[:step]  # correct up to the error
    assert steps == {0, 1, 2}


def test_generation_is_seeded_distinct_non_negative_and_the_splits_are_disjoint():
    spec = arith.ArithSpec(min_terms=3, max_terms=4, ops="+-*", max_value=9, mul_max=3)
    train = arith.generate_chains(spec, 300, seed=1)
    assert train == arith.generate_chains(spec, 300, seed=1) and train != arith.generate_chains(spec, 300, seed=2)
    assert len({c.problem for c in train}) == 300
    assert all(min(c.values()) >= 0 for c in train)
    test_problems = {c.problem for c in arith.generate_chains(arith.ArithSpec(**{**spec.__dict__, "split": "test"}), 100, 0)}
    other_seeds = {c.problem for seed in range(5) for c in arith.generate_chains(spec, 300, seed)}
    assert not test_problems & other_seeds


def test_a_space_too_small_for_n_problems_fails_instead_of_looping():
    with pytest.raises(arith.ArithSpecError, match="found only"):
        arith.generate_chains(arith.ArithSpec(min_terms=2, max_terms=2, ops="+", max_value=2), 5, seed=0)


def test_the_dataset_spec_loads_through_tapo_data():
    dataset, skipped = load_problems("arith:terms=3,ops=+,max=9", n=4, seed=3)
    assert skipped == 0 and len(dataset) == 4
    row = dataset[0]
    assert row["id"] == "arith-train-3-0" and row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
    with pytest.raises(DataError, match="ops="):
        load_problems("arith:ops=^", n=4)


def test_sampled_chains_stay_in_their_split_even_where_the_space_is_small():
    spec = arith.ArithSpec(min_terms=2, max_terms=2, ops="+", max_value=9, split="test")
    rng = random.Random(0)
    assert all(arith.in_split(arith.sample_chain(spec, rng).problem, "test") for _ in range(20))
