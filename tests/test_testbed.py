"""The learning testbed's --smoke size end to end (plumbing, not outcome): pre-training, parallel jobs merged under a
lock, the held-out curves, the summary and the plot; a rerun resumes instead of training again; and the pieces the
summary is made of (learning rates per arm, paired differences to a reference arm), with hand-computed numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    again = _testbed("--reference", "tapo", out=tmp_path)  # summarizes only, and also against the tapo arm
    assert again.returncode == 0 and "3 of 3 jobs already done" in again.stdout, again.stdout[-2000:]
    assert "final_avg@k - tapo [95% CI]" in again.stdout
    versus = json.loads((tmp_path / "testbed_smoke.json").read_text())["summary_vs"]["tapo"]
    assert "final_avg@k - tapo" in versus["grpo"] and "final_avg@k - tapo" not in versus["tapo"]


def test_an_arm_runs_at_its_named_rate_else_its_swept_one_else_its_parents():
    lrs = {"grpo": 1e-4, "tapo": 3e-4}
    assert testbed.arm_learning_rate("grpo", lrs, 5e-5) == 1e-4
    assert testbed.arm_learning_rate("tapo:cut=after_error", lrs, 5e-5) == 3e-4  # an ablation: tapo's rate
    assert testbed.arm_learning_rate("tapo:learning_rate=1e-4", lrs, 5e-5) == 1e-4  # named: the control for the rate
    assert testbed.arm_learning_rate("opsd", lrs, 5e-5) == 5e-5  # not swept: the size's middle rate
    assert testbed.job_id("tapo:learning_rate=1e-4", testbed.arm_learning_rate("tapo:learning_rate=1e-4", lrs, 0), 0) \
        == "tapo:learning_rate=1e-4|lr=0.0001|seed=0"


def _job(arm: str, lr: float, seed: int, final: float) -> dict:
    """A finished job as the testbed stores it: a two-point curve ending at `final` after 10 s of training."""
    curve = [{"step": 0, "train_s": 0.0, "tokens": 0, "avg@k": 0.5, "greedy": 0.5},
             {"step": 2, "train_s": 10.0, "tokens": 100, "avg@k": final, "greedy": final}]
    return {"arm": arm, "lr": lr, "seed": seed, "curve": curve, "step_s": 5.0, "tokens": 100,
            "final": {"avg@k": final, "greedy": final, "dsr": final, "err": None},
            "auc": {"avg@k": (0.5 + final) / 2, "greedy": (0.5 + final) / 2}}


def test_paired_differences_to_grpo_or_to_another_reference_arm():
    lrs, spec = {"grpo": 1e-4, "tapo": 3e-4}, {"seeds": [0, 1], "ablation_seeds": [0, 1], "default_lr": 1e-4}
    finals = {"grpo": (0.9, 0.8), "tapo": (0.7, 0.7), "tapo:ref_baseline=ref": (0.6, 0.5)}
    jobs = {f"{arm}|{seed}": _job(arm, testbed.arm_learning_rate(arm, lrs, 1e-4), seed, value)
            for arm, values in finals.items() for seed, value in enumerate(values)}
    jobs["tapo|sweep"] = _job("tapo", 1e-4, 0, 0.0)  # another rate of the arm: not the chosen one, left out
    vs_grpo = testbed.summarize(jobs, lrs, spec)
    assert vs_grpo["tapo"]["final_avg@k"] == pytest.approx(0.7)
    assert vs_grpo["tapo"]["final_avg@k - grpo"]["mean"] == pytest.approx(-0.15)  # (0.7 - 0.9 + 0.7 - 0.8) / 2
    assert "final_avg@k - grpo" not in vs_grpo["grpo"]
    vs_ref = testbed.summarize(jobs, lrs, spec, reference="tapo:ref_baseline=ref")
    assert vs_ref["tapo"]["final_avg@k - tapo:ref_baseline=ref"]["mean"] == pytest.approx(0.15)  # (0.1 + 0.2) / 2
    assert vs_ref["tapo"]["auc_avg@k - tapo:ref_baseline=ref"]["mean"] == pytest.approx(0.075)
    # all of each run trained 10 s: at the reference's wall-clock an arm is at its own final value
    assert vs_ref["grpo"]["avg@k at tapo:ref_baseline=ref's wall-clock - tapo:ref_baseline=ref"]["mean"] == \
        pytest.approx(0.3)
    assert "final_avg@k - grpo" not in vs_ref["tapo"]
