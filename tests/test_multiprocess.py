"""`tapo train` in two processes (torchrun, gloo on CPU): what the user reads comes once, from the main process, and
every process writes into the one run folder. `--standalone` takes a free port, so runs side by side do not collide."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_print_once_and_share_one_run_folder(tmp_path):
    rows = [{"problem": "1 + 1", "answer": "2"}, {"problem": "2 + 3", "answer": "5"}, {"problem": "", "answer": "0"}]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A cold model cache: the tiny model is built during the run, by rank 0 only (transformers writes weights on
    # global rank 0 only, so a folder built by rank 1 had none; that failed about half of the runs).
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TAPO_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tapo.cli", "train",
         "--model", "tiny", "--dataset", "problems.jsonl", "--skip_bad_rows", "true", "--max_steps", "1",
         "--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
         "--max_completion_length", "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # no default name was taken per process
    lines = proc.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines if line.startswith("run folder:")] == [f"run folder: runs/{run_dir.name}"]
    assert [line for line in lines if line.startswith("skipped")] == ["skipped 1 bad rows of problems.jsonl"]
    assert len([line for line in lines if line.startswith("step 1/1 ")]) == 1  # stdout is a pipe: one line per step
    assert {"args.yaml", "config.json", "metrics.jsonl", "final", "training.png"} <= {p.name for p in run_dir.iterdir()}
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 1]
