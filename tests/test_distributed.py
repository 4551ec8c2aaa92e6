"""Two real processes on CPU: `torchrun --nproc_per_node 2` with torch.distributed over gloo, the tiny model and
scripted rollouts (generation is the only thing replaced, see scripted.py).

The global batch holds two groups of K: rank 0's group has right and wrong rollouts (eligible for DCS), rank 1's group
is all right (no pair to build). That is the layout that used to break `constructor="self"`: a rank with no requests
skipped the synthesis generation, which is a collective. For each constructor the two-process run must finish within a
bounded time and give the same constructions (texts, rows, advantages, metrics) as one process holding the same global
batch. A construction that raises on rank 0 only must fail every rank with the same error, and leave the ranks in step
(the cases after it still run). One training step checks the loss side (old/reference log-probs, L_ref on a rank with
no constructed rows, the finite-loss check, DDP's gradient all-reduce).

This file is also the worker script: torchrun runs it with `OUT_DIR TINY_MODEL_DIR CASE...`; each rank writes
OUT_DIR/rank{r}.json with one entry per case.
"""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from http.server import HTTPServer
from pathlib import Path

import pytest

from scripted import K, PROBLEMS, generation_batch, script_generation

# The constructed-row columns of the batch, in one place.
ROWS, COMPLETION_IDS, COMPLETION_MASK, ADVANTAGES = ("constructed_rows", "constructed_completion_ids",
                                                     "constructed_completion_mask", "constructed_advantages")

ELIGIBLE, INELIGIBLE = list(PROBLEMS)  # dataset order, shuffling off: the first group lands on rank 0
N_RIGHT = {ELIGIBLE: 2, INELIGIBLE: K}  # rank 0: 2 right + 2 wrong, both wrong ones repaired; rank 1: all right
ALL_RIGHT = {ELIGIBLE: K, INELIGIBLE: K}  # no rank has a pair: every rank must skip the synthesis generation alike
TEACHER_URL_ENV = "TAPO_TEST_TEACHER_URL"
RAISED = "scripted synthesis failure on rank 0"

BUILD_CASES = {  # case -> (constructor, right rollouts per problem, global rows expected to get a construction)
    "self": ("self", N_RIGHT, ["2", "3"]),
    "splice": ("splice", N_RIGHT, ["2", "3"]),
    "teacher": ("teacher", N_RIGHT, ["2", "3"]),
    "self_no_pairs": ("self", ALL_RIGHT, []),
}
RAISE_CASES = ("self_raises_before_generation", "self_raises_in_generation")
TRAIN_CASE = "self_train_step"
LAUNCH_TIMEOUT_S = 300  # generous for a shared 2-core machine: the launch takes ~45 s there under load, mostly imports
COLLECTIVE_TIMEOUT_S = 120  # gloo's wait in one collective (default 30 min): a hang becomes an error sooner


# ---------------------------------------------------------------------------------------------------------------------
# The cases (run by each torchrun worker, and in-process for the one-process reference)

def make(tiny_model_dir, work_dir, world, constructor, n_right=N_RIGHT, **overrides):
    from test_trainer import make_trainer

    if constructor == "teacher":
        overrides.update(teacher_model="teacher-model", teacher_base_url=os.environ[TEACHER_URL_ENV])
    trainer = make_trainer(tiny_model_dir, Path(work_dir), constructor=constructor, shuffle_dataset=False, use_cpu=True,
                           per_device_train_batch_size=2 * K // world, ddp_timeout=COLLECTIVE_TIMEOUT_S, **overrides)
    script_generation(trainer, n_right=n_right)
    return trainer


def constructions(trainer, batch) -> dict:
    """This rank's share of the generation batch: rollouts, constructed rows (by global row), tapo metrics."""
    tok, n_local = trainer._tokenizer, batch["completion_ids"].shape[0]
    offset = trainer.accelerator.process_index * n_local
    built = {}
    for row in batch[ROWS].nonzero().flatten().tolist():
        ids = batch[COMPLETION_IDS][row][batch[COMPLETION_MASK][row].bool()]
        built[str(offset + row)] = {"text": tok.decode(ids), "advantage": batch[ADVANTAGES][row].item()}
    return {"completions": tok.batch_decode(batch["completion_ids"], skip_special_tokens=True), "built": built,
            "metrics": {k: v for k, v in trainer._metrics["train"].items() if k.startswith("tapo/")}}


@contextlib.contextmanager
def failing_on_rank0(trainer, case):
    """Make rank 0's construction raise: before the synthesis generation (prompt building) or inside it."""
    if trainer.accelerator.process_index != 0:
        yield
        return
    if case == "self_raises_before_generation":
        import tapo.construct

        def build_prompt(*args, **kwargs):
            raise RuntimeError(RAISED)

        saved, tapo.construct.build_synthesis_prompt = tapo.construct.build_synthesis_prompt, build_prompt
        try:
            yield
        finally:
            tapo.construct.build_synthesis_prompt = saved
    else:
        scripted = trainer._generate_single_turn

        def generate(self, prompt_ids, *args, **kwargs):
            if any("<analysis>" in self._tokenizer.decode(p) for p in prompt_ids):
                raise RuntimeError(RAISED)
            return scripted(prompt_ids, *args, **kwargs)

        trainer._generate_single_turn = types.MethodType(generate, trainer)
        yield


def run_case(case, tiny_model_dir, work_dir, world) -> dict:
    if case in BUILD_CASES:
        constructor, n_right, _ = BUILD_CASES[case]
        trainer = make(tiny_model_dir, work_dir, world, constructor, n_right)
        return constructions(trainer, generation_batch(trainer))
    if case in RAISE_CASES:
        trainer = make(tiny_model_dir, work_dir, world, "self")
        try:
            with failing_on_rank0(trainer, case):
                generation_batch(trainer)
        except Exception as err:  # recorded, then the next case runs: the ranks must still be in step
            return {"error": f"{type(err).__name__}: {err}"}
        return {"error": None}
    if case == TRAIN_CASE:
        # beta > 0 and num_iterations=2: old and reference log-prob passes over the constructed rows, too.
        trainer = make(tiny_model_dir, work_dir, world, "self", beta=0.04, num_iterations=2, max_steps=1)
        before = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
        trainer.train()
        after = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
        history = trainer.state.log_history
        logged = {name: [r[name] for r in history if name in r]
                  for name in ("loss", "grad_norm", "tapo/loss_ref", "tapo/constructions_accepted")}
        return {**logged, "before": before, "after": after}
    raise ValueError(f"unknown case {case!r}")


def worker(out_dir, tiny_model_dir, cases):
    rank = int(os.environ["RANK"])
    results = {}
    for case in cases:
        results[case] = run_case(case, tiny_model_dir, Path(out_dir) / f"work-{rank}-{case}", world=2)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------------------------------
# The test

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir, tiny_model_dir, cases, env):
    """torchrun with two CPU processes; a hang is killed (whole process group) and fails the test."""
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(out_dir), str(tiny_model_dir), *cases]
    env = {**os.environ, **env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"2-process run hung (killed after {LAUNCH_TIMEOUT_S} s):\n{output[-10000:]}")
    assert proc.returncode == 0, f"2-process run failed (rc={proc.returncode}):\n{output[-10000:]}"
    print(f"2-process run: {time.monotonic() - start:.1f} s")
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in (0, 1)]


def same(a, b) -> bool:
    """Equal, NaN included (a rate with nothing attempted is NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.fixture
def teacher_server():
    """An OpenAI-compatible endpoint on 127.0.0.1 (both ranks and the reference run ask it)."""
    from test_construct import _ChatHandler

    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_two_processes_build_what_one_process_builds(tiny_model_dir, tmp_path, teacher_server, monkeypatch):
    monkeypatch.setenv(TEACHER_URL_ENV, teacher_server)
    ranks = launch(tmp_path / "run", tiny_model_dir, [*BUILD_CASES, *RAISE_CASES, TRAIN_CASE],
                   {TEACHER_URL_ENV: teacher_server})

    for case, (_, _, expected_rows) in BUILD_CASES.items():
        single = json.loads(json.dumps(run_case(case, tiny_model_dir, tmp_path / f"single-{case}", world=1)))
        r0, r1 = ranks[0][case], ranks[1][case]
        assert r0["completions"] + r1["completions"] == single["completions"], case  # the same global batch
        assert sorted(single["built"]) == expected_rows, case  # the layout: only rank 0's wrong rollouts are repaired
        assert not r1["built"] and r0["built"].keys() == single["built"].keys(), case
        for row, expected in single["built"].items():
            assert r0["built"][row]["text"] == expected["text"], (case, row)
            assert r0["built"][row]["advantage"] == pytest.approx(expected["advantage"], abs=1e-6), (case, row)
        assert same(r0["metrics"], single["metrics"]) and same(r1["metrics"], single["metrics"]), case

    # A construction that raises on rank 0 fails both ranks with the same error naming rank 0 and the cause; one
    # process fails the same way.
    for case in RAISE_CASES:
        e0, e1 = ranks[0][case]["error"], ranks[1][case]["error"]
        assert e0 == e1 and e0.startswith("ConstructionError") and "rank 0" in e0 and RAISED in e0, case
    for case in RAISE_CASES:
        single = run_case(case, tiny_model_dir, tmp_path / f"single-{case}", world=1)
        assert single["error"].startswith("ConstructionError") and RAISED in single["error"], case

    # One optimizer step: both ranks finish in step (identical updated weights), although rank 1 has no constructed
    # row (its L_ref is a zero term over a masked placeholder row, which keeps DDP's forward/backward in step). The
    # logged losses (means over ranks) and the gradient norm (after DDP's all-reduce) are one process's on the global
    # batch.
    t0, t1 = ranks[0][TRAIN_CASE], ranks[1][TRAIN_CASE]
    single = run_case(TRAIN_CASE, tiny_model_dir, tmp_path / "single-train", world=1)
    assert t0["tapo/constructions_accepted"] == t1["tapo/constructions_accepted"] == [2.0]
    assert t0["before"] == t1["before"] == single["before"] and t0["after"] == t1["after"] != t0["before"]
    for name in ("loss", "grad_norm", "tapo/loss_ref"):
        assert len(t0[name]) == 1 and all(math.isfinite(x) for x in t0[name] + t1[name]), name
        assert t0[name] == t1[name] == pytest.approx(single[name], rel=1e-4), name


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3:])
