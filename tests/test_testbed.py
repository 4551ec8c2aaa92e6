"""The learning testbed's --smoke size end to end (plumbing, not outcome): pre-training, parallel jobs merged under a
lock, the held-out curves, the summary and the plot; a rerun resumes instead of training again."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import testbed  # noqa: E402


def _testbed(*args, out: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(BENCHMARKS / "testbed.py"), "--smoke", "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def test_smoke_size_runs_every_main_arm_in_parallel_and_resumes(tmp_path):
    measured = _testbed("--policy-only", out=tmp_path)  # the policy and its measurements before RL, no job
    assert measured.returncode == 0, measured.stdout[-3000:] + measured.stderr[-3000:]
    assert "own syntheses (constructor=self)" in measured.stdout
    before = json.loads((tmp_path / "testbed_smoke.json").read_text())
    assert before["jobs"] == {} and before["policy"]["cold_start_steps"] == 3
    assert before["policy"]["batches"] == {"solution": 3, "synthesis": 3, "teacher": 1}  # 4 main steps + 3 cold start
    synth = before["self_synthesis"]
    assert synth["problems"] == 16 and synth["rollouts"] == 16 * 4  # the smoke size's held-out set, its K
    assert synth["accepted"] + sum(synth["rejected"].values()) == synth["attempted"]
    done = _testbed("--jobs", "2", out=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "testbed_smoke.json").read_text())
    assert (tmp_path / "testbed_smoke.png").stat().st_size > 0
    assert sorted(r["arm"] for r in result["jobs"].values()) == ["grpo", "tapo", "tapo:constructor=self"]
    for run in result["jobs"].values():
        assert [p["step"] for p in run["curve"]] == [0, 2]
        assert run["curve"][1]["tokens"] > 0 and run["step_s"] > 0 and len(run["train_logs"]) == 2
        assert set(run["final"]) == {"greedy", "avg@k", "dsr", "err"}
    assert "final_greedy - grpo" in result["summary"]["tapo"] and result["policy"]["steps"] >= 1
    assert set(result["opsd_teacher"]) == {"student_greedy", "student_sampled", "teacher_greedy", "teacher_sampled"}
    assert result["opsd_teacher"]["student_greedy"] == result["base"]["greedy"]  # same problems, same greedy decoding
    assert result["self_synthesis"] == synth  # measured once per experiment
    again = _testbed(out=tmp_path)
    assert again.returncode == 0 and "3 of 3 jobs already done" in again.stdout, again.stdout[-2000:]


def test_an_arm_runs_at_its_named_rate_else_its_swept_one_else_its_parents():
    lrs = {"grpo": 1e-4, "tapo": 3e-4}
    assert testbed.arm_learning_rate("grpo", lrs, 5e-5) == 1e-4
    assert testbed.arm_learning_rate("tapo:cut=after_error", lrs, 5e-5) == 3e-4  # an ablation: tapo's rate
    assert testbed.arm_learning_rate("tapo:learning_rate=1e-4", lrs, 5e-5) == 1e-4  # named: the control for the rate
    assert testbed.arm_learning_rate("opsd", lrs, 5e-5) == 5e-5  # not swept: the size's middle rate
    assert testbed.job_id("tapo:learning_rate=1e-4", testbed.arm_learning_rate("tapo:learning_rate=1e-4", lrs, 0), 0) \
        == "tapo:learning_rate=1e-4|lr=0.0001|seed=0"
