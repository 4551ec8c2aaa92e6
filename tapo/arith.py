"""Step-checkable arithmetic chains: a task generated locally and seeded, for the learning testbed.

A problem is a chain of 3-6 terms evaluated left to right ("Compute 12 + 7 * 3 - 5 from left to right."); its worked
solution writes one step per line as `a op b = c` and ends with `\\boxed{answer}`:

    12 + 7 = 19
    19 * 3 = 57
    57 - 5 = 52
    \\boxed{52}

Every step is an arithmetic claim that `tapo.core.synthesis`'s splice checker can verify, so the first wrong step of a
rollout is known exactly. `ArithSpec.parse` reads the dataset spec `arith:terms=3-6,ops=+-*,max=99[,mul_max=9]
[,split=train|test]` that `tapo train --dataset` accepts (see tapo.data).

Held-out disjointness does not depend on seeds: every problem belongs to one split by a hash of its text (one in
`TEST_SHARE`), so `split=test` problems never occur in any `split=train` draw, whatever seed drew them.
"""

from __future__ import annotations

import hashlib
import operator
import random
from dataclasses import dataclass

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
TEST_SHARE = 8  # one problem in 8 (by hash) belongs to the held-out split
# Error sizes a step error is drawn from: off by one or two (a slip) or by ten (a dropped/extra carry).
ERROR_DELTAS = (-10, -2, -1, 1, 2, 10)
MAX_DRAWS_PER_PROBLEM = 1000  # a spec whose space is too small to give n distinct problems fails instead of looping


class ArithSpecError(ValueError):
    """A malformed `arith:` spec; the message names the key."""


@dataclass(frozen=True)
class ArithSpec:
    """One arithmetic chain task. Difficulty grows with `max_terms`, `max_value` and `*` in `ops`."""

    min_terms: int = 3  # fewest terms in a chain (steps = terms - 1)
    max_terms: int = 6  # most terms in a chain
    ops: str = "+-*"  # operators drawn uniformly for each step
    max_value: int = 99  # operands of + and - are drawn from 1..max_value, the first term too
    mul_max: int = 9  # operands of * are drawn from 2..mul_max, so results stay a few digits long
    split: str = "train"  # "train" or "test": which hash partition of the problem space to draw from

    def __post_init__(self):
        if not 2 <= self.min_terms <= self.max_terms:
            raise ArithSpecError(f"terms={self.min_terms}-{self.max_terms}: need 2 <= min <= max")
        if not self.ops or set(self.ops) - set(OPERATORS):
            raise ArithSpecError(f"ops={self.ops!r}: use one or more of {''.join(OPERATORS)}")
        if self.max_value < 1 or self.mul_max < 2:
            raise ArithSpecError(f"max={self.max_value}, mul_max={self.mul_max}: need max >= 1 and mul_max >= 2")
        if self.split not in ("train", "test"):
            raise ArithSpecError(f"split={self.split!r}: choose train or test")

    @classmethod
    def parse(cls, spec: str) -> ArithSpec:
        """`arith:terms=3-6,ops=+-*,max=99,mul_max=9,split=train`; every key is optional, `terms=4` means 4-4."""
        body = spec.removeprefix("arith").removeprefix(":")
        values = {}
        for pair in filter(None, body.split(",")):
            key, sep, value = pair.partition("=")
            try:
                if not sep:
                    raise ValueError("expected key=value")
                if key == "terms":
                    low, _, high = value.partition("-")
                    values["min_terms"], values["max_terms"] = int(low), int(high or low)
                elif key == "ops":
                    values["ops"] = value
                elif key in ("max", "mul_max"):
                    values["max_value" if key == "max" else key] = int(value)
                elif key == "split":
                    values["split"] = value
                else:
                    raise ValueError("unknown key; use terms, ops, max, mul_max, split")
            except ValueError as err:
                raise ArithSpecError(f"{spec}: {pair!r}: {err}") from err
        return cls(**values)

    def as_spec(self) -> str:
        """The dataset spec string that parses back to this spec."""
        return (f"arith:terms={self.min_terms}-{self.max_terms},ops={self.ops},max={self.max_value},"
                f"mul_max={self.mul_max},split={self.split}")


@dataclass(frozen=True)
class Chain:
    """A chain's terms and operators: value = ((t0 op0 t1) op1 t2) ..."""

    terms: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def problem(self) -> str:
        expression = " ".join([str(self.terms[0])] + [f"{op} {t}" for op, t in zip(self.ops, self.terms[1:])])
        return f"Compute {expression} from left to right."

    def values(self) -> list[int]:
        """The running value after each step (len = steps)."""
        out, value = [], self.terms[0]
        for op, term in zip(self.ops, self.terms[1:]):
            value = OPERATORS[op](value, term)
            out.append(value)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def steps(self) -> int:
        return len(self.ops)


def in_split(problem: str, split: str) -> bool:
    """Which hash partition a problem text belongs to (stable across Python runs and machines)."""
    bucket = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:4], "big") % TEST_SHARE
    return (bucket == 0) == (split == "test")


def draw_chain(spec: ArithSpec, rng: random.Random) -> Chain:
    """One random chain; subtraction never goes below zero (a negative running value would be a second task)."""
    n_terms = rng.randint(spec.min_terms, spec.max_terms)
    value = rng.randint(1, spec.max_value)
    terms, ops = [value], []
    for _ in range(n_terms - 1):
        op = rng.choice(spec.ops)
        if op == "-" and value < 1:
            op = "+" if "+" in spec.ops else "*"
        if op == "*":
            term = rng.randint(2, spec.mul_max)
        elif op == "-":
            term = rng.randint(1, min(value, spec.max_value))
        else:
            term = rng.randint(1, spec.max_value)
        value = OPERATORS[op](value, term)
        terms.append(term)
        ops.append(op)
    return Chain(tuple(terms), tuple(ops))


def sample_chain(spec: ArithSpec, rng: random.Random) -> Chain:
    """One random chain of `spec.split` (repeats allowed: for pre-training, where a small space is no error)."""
    for _ in range(MAX_DRAWS_PER_PROBLEM):
        chain = draw_chain(spec, rng)
        if in_split(chain.problem, spec.split):
            return chain
    raise ArithSpecError(f"{spec.as_spec()}: no problem of split {spec.split} in {MAX_DRAWS_PER_PROBLEM} draws")


def generate_chains(spec: ArithSpec, n: int, seed: int) -> list[Chain]:
    """`n` distinct chains of `spec.split`, drawn from `seed`."""
    rng = random.Random(f"arith-{seed}")
    chains, seen = [], set()
    for _ in range(n * MAX_DRAWS_PER_PROBLEM):
        if len(chains) == n:
            return chains
        chain = draw_chain(spec, rng)
        if chain.problem in seen or not in_split(chain.problem, spec.split):
            continue
        seen.add(chain.problem)
        chains.append(chain)
    if len(chains) == n:
        return chains
    raise ArithSpecError(f"{spec.as_spec()}: found only {len(chains)} distinct problems of the {n} asked for")


def solution(chain: Chain, error_step: int | None = None, error_delta: int = 0) -> str:
    """The worked solution, one `a op b = c` line per step, then `\\boxed{answer}`. With `error_step`, that step's
    result is off by `error_delta` and the later steps compute correctly from the wrong value (the error propagates,
    as a policy's slip would)."""
    lines, value = [], chain.terms[0]
    for step, (op, term) in enumerate(zip(chain.ops, chain.terms[1:])):
        result = OPERATORS[op](value, term) + (error_delta if step == error_step else 0)
        lines.append(f"{value} {op} {term} = {result}")
        value = result
    return "\n".join(lines) + f"\n\\boxed{{{value}}}"


def wrong_solution(chain: Chain, rng: random.Random) -> tuple[str, int]:
    """(a solution with one step error at a uniformly drawn step, that step); the wrong result stays >= 0."""
    step = rng.randrange(chain.steps)
    true_value = chain.values()[step]
    delta = rng.choice([d for d in ERROR_DELTAS if true_value + d >= 0])
    return solution(chain, step, delta), step


def rows(spec: ArithSpec, n: int, seed: int) -> list[dict]:
    """Dataset rows (id, problem, answer, solution) for tapo.data."""
    return [{"id": f"arith-{spec.split}-{seed}-{i}", "problem": c.problem, "answer": str(c.answer),
             "solution": solution(c)} for i, c in enumerate(generate_chains(spec, n, seed))]
