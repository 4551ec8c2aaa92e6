"""What the benchmarks share: configs exactly as `tapo train` makes them, held-out data, and per-section timers.
Trainers come from `tapo.run.build_trainer`, the factory `tapo train` itself uses.

Configs go through `tapo.cli.parse_train_args` (embedded CPU default < the benchmark's settings), so a benchmark arm
is the same run as `tapo train --key value ...` and `algorithm=grpo/opsd` means what it means on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import platform
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from transformers import TrainerCallback

RESULTS = Path(__file__).resolve().parent / "results"
# Every benchmark trains on this task: SmolLM2-135M-Instruct answers about 10-20 % of it at the start, so groups hold
# both correct and wrong rollouts, DCS selects queries and constructions happen.
TASK = "rg:chain_sum:min_terms=2,max_terms=2,max_digits=2"


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: --quick / --full (default: the CPU mode), --threads, --set."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick")
    mode.add_argument("--full", action="store_const", dest="mode", const="full")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a CPU shared with other jobs)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra `tapo train` options, every arm")
    return parser


def set_threads(threads: int | None) -> None:
    """Intra-op CPU threads. On a CPU shared with other jobs, 1 thread can be several times faster than 2: an OpenMP
    team waits at every barrier for its slowest, descheduled thread."""
    if threads:
        torch.set_num_threads(threads)


def opsd_available() -> bool:
    return importlib.util.find_spec("tapo.opsd") is not None


def as_argv(settings: dict) -> list[str]:
    """{"n_pos": 1, "ots_enabled": False} -> ["--n_pos", "1", "--ots_enabled", "false"] (what the CLI would get)."""
    argv = []
    for key, value in settings.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def parse_settings(pairs: Iterable[str]) -> dict:
    """--set key=value pairs (strings; the CLI parser converts and validates them)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected key=value")
        out[key] = value
    return out


def make_config(settings: dict):
    """(RunArgs, TAPOConfig, explicit) for `settings` layered over the embedded default, through the CLI's own parser;
    `explicit` holds every setting that is not a field default (what a GRPOConfig twin must be given)."""
    from tapo.cli import parse_train_args

    settings = {"output_dir": tempfile.mkdtemp(prefix="tapo-bench-"), "save_strategy": "no", **settings}
    if not torch.cuda.is_available():
        settings.setdefault("use_cpu", True)
    return parse_train_args(as_argv(settings))


def load_split(task: str, n_train: int, n_eval: int, seed: int = 0):
    """(conversational train set, held-out problems): one draw of the task, split (held-out rows that repeat a
    training problem are dropped, so there can be fewer than `n_eval`)."""
    from tapo.data import load_problems, to_conversational, train_eval_split

    dataset, _ = load_problems(task, n=n_train + n_eval, seed=seed)
    train, held_out = train_eval_split(dataset, eval_size=n_eval, seed=seed)
    return to_conversational(train), held_out


def warm_verifier() -> None:
    """Start math-verify's worker processes now, so the first timed step does not pay for their start-up."""
    from tapo.core.verify import math_reward

    math_reward(None, ["\\boxed{1}"] * 4, ["2"] * 4)


def machine() -> str:
    """What the numbers were measured on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({os.cpu_count()} CPU cores)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}, load average at start {load:.1f}")


def reset_peak_rss() -> bool:
    """Restart this process's resident-memory high-water mark (VmHWM) from its current RSS, so the next
    `peak_rss_gib()` is the peak of what runs in between (Linux >= 4.0: writing 5 to /proc/self/clear_refs).
    Memory that an earlier arm freed but the allocator kept stays counted: a fresh process per arm is exact."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    """Peak resident memory of this process (VmHWM) in GiB: since start, or since the last `reset_peak_rss()`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # wall timers around asynchronous kernels measure nothing without it


class SectionTimer:
    """Exclusive wall time per call path of wrapped methods: time inside a nested wrapped call is charged to the
    nested path only, so the paths' times add up to the time of the outermost calls. Wrapping is on the class, so
    `super()` calls are timed too; `patch` undoes it on exit."""

    def __init__(self):
        self.totals: dict[tuple[str, ...], float] = defaultdict(float)
        self._stack: list[str] = []
        self._mark = 0.0

    def _charge(self) -> None:
        _sync()
        now = time.perf_counter()
        if self._stack:
            self.totals[tuple(self._stack)] += now - self._mark
        self._mark = now

    def _wrap(self, fn: Callable, name: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._charge()
            self._stack.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self._charge()
                self._stack.pop()

        return timed

    def patch(self, targets: Iterable[tuple[type, str]]):
        """Context manager: wrap `cls.name` for every (cls, name) whose class itself defines `name`."""
        @contextlib.contextmanager
        def patched():
            saved = []
            for cls, name in targets:
                if name in cls.__dict__:
                    saved.append((cls, name, cls.__dict__[name]))
                    setattr(cls, name, self._wrap(cls.__dict__[name], name))
            try:
                yield self
            finally:
                for cls, name, original in reversed(saved):
                    setattr(cls, name, original)

        return patched()

    def snapshot(self) -> dict[tuple[str, ...], float]:
        return dict(self.totals)

    def current_path(self) -> str:
        """The wrapped calls running now, outermost first ("" between them)."""
        return " > ".join(self._stack)


def timed_targets() -> list[tuple[type, str]]:
    """The trainer methods whose time the overhead and parity benchmarks split a step into."""
    from accelerate import Accelerator
    from trl import GRPOTrainer

    from tapo.trainer import TAPOTrainer
    from tapo.trainer_base import TrainerBase

    grpo = ["training_step", "_generate_and_score_completions", "_generate_single_turn", "_calculate_rewards",
            "_get_per_token_logps_and_entropies", "compute_loss"]
    base = ["_generate_and_score_completions", "_calculate_rewards"]
    tapo = ["_generate_and_score_completions", "_attach_constructions", "_self_generate", "_store_constructed_rows",
            "_ref_loss"]
    return ([(GRPOTrainer, n) for n in grpo] + [(TrainerBase, n) for n in base] + [(TAPOTrainer, n) for n in tapo]
            + [(Accelerator, "backward")])


class RssTracer:
    """Where the resident set peaks: a thread samples RSS (/proc/self/statm) every `every_s` seconds and keeps, per
    (step, the SectionTimer's current call path), the highest value seen, so a run's peak can be put on the phase
    that reached it (a forward, a backward, generation, the optimizer step). Linux only; elsewhere it records nothing."""

    def __init__(self, timer: SectionTimer, clock: "StepClock", every_s: float = 0.005):
        self.timer, self.clock, self.every_s = timer, clock, every_s
        self.peaks: dict[tuple[int, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        statm = Path("/proc/self/statm")
        while not self._stop.wait(self.every_s):
            try:
                rss = int(statm.read_text().split()[1]) * page / 2**30
            except OSError:
                return
            key = (len(self.clock.steps) + 1, self.timer.current_path() or "optimizer step, callbacks, other")
            if rss > self.peaks.get(key, 0.0):
                self.peaks[key] = rss

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self, top: int = 12) -> list[dict]:
        """The highest (step, phase) peaks, highest first."""
        ranked = sorted(self.peaks.items(), key=lambda kv: -kv[1])[:top]
        return [{"step": step, "phase": phase, "peak_rss_gib": round(gib, 3)} for (step, phase), gib in ranked]


class StepClock(TrainerCallback):
    """Wall time of each optimizer step (on_step_begin -> on_step_end: generation, scoring, construction, loss,
    backward, optimizer step) and, with a timer, the section times spent inside it."""

    def __init__(self, timer: SectionTimer | None = None):
        self.timer = timer
        self.steps: list[dict] = []

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._before = self.timer.snapshot() if self.timer else {}
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        wall = time.perf_counter() - self._start
        after = self.timer.snapshot() if self.timer else {}
        sections = {path: t - self._before.get(path, 0.0) for path, t in after.items()}
        self.steps.append({"step": state.global_step, "wall_s": wall,
                           "sections": {p: t for p, t in sections.items() if t > 0}})
