"""What `tapo train` prints while it runs: plain lines when stdout is not a terminal."""

import io
from types import SimpleNamespace

from tapo.progress import (
    LiveProgress,
    PlainProgress,
    folder_bytes,
    format_bytes,
    format_duration,
    progress_callback,
    progress_line,
)


def test_format_duration():
    assert [format_duration(s) for s in (0, 12.4, 60, 754, 7384)] == ["0s", "12s", "1m00s", "12m34s", "2h03m"]


def test_progress_line_shows_step_reward_accuracy_constructions_speed_and_eta():
    logs = {"loss": 0.0123, "reward": 0.125, "tapo/accuracy": 0.25, "tapo/constructions_accepted": 4.0,
            "tapo/constructions_attempted": 6.0}
    assert progress_line(3, 8, logs, 41.2) == \
        "step 3/8  reward 0.125  acc 0.250  constructions 4/6  loss 0.0123  41.2 s/step  ETA 3m26s"  # 5 x 41.2 s


def test_progress_line_leaves_out_what_the_step_did_not_log():
    assert progress_line(1, 8, {"loss": 0.5, "reward": float("nan")}, None) == "step 1/8  loss 0.5"


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_progress_prints_one_flushed_line_per_training_log(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("tapo.progress.time.monotonic", clock)
    out = io.StringIO()
    cb = PlainProgress(out)
    state = SimpleNamespace(global_step=2, max_steps=6, is_world_process_zero=True)  # resumed at step 2
    cb.on_train_begin(None, state, None)
    clock.now, state.global_step = 120.0, 4
    cb.on_log(None, state, None, logs={"loss": 1.0, "reward": 0.5})
    cb.on_log(None, state, None, logs={"train_runtime": 20.0, "train_loss": 1.0})  # the end-of-training summary
    assert out.getvalue() == "step 4/6  reward 0.500  loss 1  10.0 s/step  ETA 20s\n"


def test_progress_callback_picks_the_bar_for_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress_callback(Tty()), LiveProgress)
    assert isinstance(progress_callback(io.StringIO()), PlainProgress)


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 999, 1536, 2_200_000_000, 3_700_000_000_000)] == \
        ["0 B", "999 B", "1.5 KB", "2.2 GB", "3700.0 GB"]


def test_folder_bytes_counts_every_file_below(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    assert folder_bytes(tmp_path) == 15
