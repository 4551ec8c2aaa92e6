"""What `tapo train` prints while it runs: a live rich bar on a terminal, one plain line per logged step otherwise
(`tapo train > log` can be followed with `tail -f log`)."""

from __future__ import annotations

import math
import sys
import time

from transformers import TrainerCallback

# (log key, label) shown on the bar and on every plain line, when the step logged them.
SHOWN = (("reward", "reward"), ("tapo/accuracy", "acc"), ("tapo/accept_rate", "accept"), ("loss", "loss"))


def _number(logs: dict, key: str) -> float | None:
    value = logs.get(key)
    return value if isinstance(value, (int, float)) and not math.isnan(value) else None


def format_duration(seconds: float) -> str:
    """12 -> '12s', 754 -> '12m34s', 7384 -> '2h03m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(step: int, total: int, logs: dict, seconds_per_step: float | None) -> str:
    """'step 3/8  reward 0.125  acc 0.125  constructions 4/6  loss 0.012  41.2 s/step  ETA 3m26s'."""
    parts = [f"step {step}/{total}"]
    for key, label in SHOWN[:2]:
        if (value := _number(logs, key)) is not None:
            parts.append(f"{label} {value:.3f}")
    accepted, attempted = _number(logs, "tapo/constructions_accepted"), _number(logs, "tapo/constructions_attempted")
    if attempted is not None and accepted is not None:
        parts.append(f"constructions {accepted:.0f}/{attempted:.0f}")
    if (loss := _number(logs, "loss")) is not None:
        parts.append(f"loss {loss:.4g}")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.1f} s/step")
        parts.append(f"ETA {format_duration(seconds_per_step * max(total - step, 0))}")
    return "  ".join(parts)


class PlainProgress(TrainerCallback):
    """One line per logged training step on `stream`, flushed at once. s/step is the mean since this run (or
    resume) started, so the ETA steadies after the first steps."""

    def __init__(self, stream=None):
        self.stream = stream
        self._start = None
        self._first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._first_step = time.monotonic(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs or self._start is None:
            return  # only training-step records (not the final summary, not eval)
        done = state.global_step - self._first_step
        per_step = (time.monotonic() - self._start) / done if done > 0 else None
        print(progress_line(state.global_step, state.max_steps, logs, per_step), file=self.stream or sys.stdout,
              flush=True)


class LiveProgress(TrainerCallback):
    """A rich progress bar with the live reward / accuracy / construction acceptance."""

    def __init__(self):
        self.progress = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        parts = [f"{label} {value:.3f}" for key, label in SHOWN if (value := _number(logs, key)) is not None]
        self.progress.update(self.task, completed=state.global_step, status="  ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()


def progress_callback(stream=None) -> TrainerCallback:
    """The live bar when `stream` (default stdout) is a terminal, plain lines when it is a file or a pipe."""
    stream = stream or sys.stdout
    return LiveProgress() if stream.isatty() else PlainProgress(stream)


def folder_bytes(path) -> int:
    """Bytes of every file under `path` (what `du --apparent-size` counts)."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KB', 2.2e9 -> '2.2 GB' (decimal units, as `du -h --si` and file managers show)."""
    if n < 1000:
        return f"{n} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
