"""The run folder of `tapo train`, in one place: its file names, what writes and reads them, and where a resume starts.

    RUN/args.yaml          the options as given (layered, non-default), reloaded by `--resume`
    RUN/config.json        every RunArgs and trainer field, for the record
    RUN/metrics.jsonl      one JSON line per logged step (MetricsLogger)
    RUN/checkpoint-N/      TRL/transformers checkpoints, each with tapo_state.json (the trainer's own counters)
    RUN/final/             the trained model
    RUN/training.png       plots of metrics.jsonl
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from transformers import TrainerCallback

ARGS_FILE = "args.yaml"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TAPO_STATE_FILE = "tapo_state.json"  # beside trainer_state.json in every checkpoint
FINAL_MODEL_DIR = "final"
PLOT_FILE = "training.png"


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl rows; a torn last line (killed mid-write) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def find_checkpoint(path: str | Path) -> str | None:
    """The newest complete checkpoint in a run folder (or the folder itself if it is a complete checkpoint).

    Complete = has trainer_state.json, which is written last; the trainers also save atomically (a hidden temp folder
    renamed into place), so a half-written checkpoint-N or a leftover `.tmp-checkpoint-N` is never picked."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return str(path)
    steps = {int(c.name.removeprefix("checkpoint-")): c for c in path.glob("checkpoint-*")
             if c.name.removeprefix("checkpoint-").isdigit() and (c / "trainer_state.json").is_file()}
    return str(steps[max(steps)]) if steps else None


def resume_point(resume: str | Path) -> tuple[Path, str]:
    """(run folder, checkpoint to resume from) for `--resume` given a run folder or one of its checkpoint-N folders.
    The one place a resume is decided: FileNotFoundError when there is no complete checkpoint."""
    checkpoint = find_checkpoint(resume)
    if checkpoint is None:
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint (a checkpoint-N folder with trainer_state.json)")
    path = Path(resume)
    return (path.parent if path.name.startswith("checkpoint-") else path), checkpoint


def write_args(run_dir: Path, explicit: dict) -> None:
    (Path(run_dir) / ARGS_FILE).write_text(yaml.safe_dump(explicit, sort_keys=True))


def write_config(run_dir: Path, run, config) -> None:
    (Path(run_dir) / CONFIG_FILE).write_text(json.dumps({"run": asdict(run), "trainer": config.to_dict()}, indent=2,
                                                        default=str))


def write_tapo_state(checkpoint: str | Path, state: dict) -> None:
    with open(Path(checkpoint) / TAPO_STATE_FILE, "w") as f:
        json.dump(state, f)


def read_tapo_state(checkpoint: str | Path | None) -> dict | None:
    """The counters saved by `write_tapo_state`, or None (no checkpoint, or one saved without them)."""
    path = Path(checkpoint) / TAPO_STATE_FILE if checkpoint is not None else None
    if path is None or not path.exists():
        return None
    return json.loads(path.read_text())


class MetricsLogger(TrainerCallback):
    """Appends every log record to RUN/metrics.jsonl. On resume, rows logged after the checkpoint are dropped first,
    so the resumed run continues the same series with no duplicated or skipped steps."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.exists():
            rows = [r for r in read_metrics(self.path) if r["step"] <= state.global_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "time": time.time(), **{k: _plain(v) for k, v in logs.items()}}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _plain(v):
    return v.item() if hasattr(v, "item") else v
