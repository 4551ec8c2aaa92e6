"""`tapo train` from the outside: the run folder it writes, and one clear error (exit code 2, no traceback, nothing
loaded) for every bad option, config file or data file."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tapo.cli import main, parse_train_args
from tapo.trainer import NonFiniteLossError

from checkout import REPO_ROOT, checkout_env

GOOD_ROWS = [{"id": f"q{i}", "problem": f"{i} + {i}", "answer": str(2 * i)} for i in range(4)]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if a model is loaded or training starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded / training started")

    monkeypatch.setattr("tapo.models.load_model_and_tokenizer", forbidden)
    monkeypatch.setattr("tapo.run.train", forbidden)


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_the_run_folder(tmp_path, capsys):
    data = write_jsonl(tmp_path / "problems.jsonl", GOOD_ROWS)
    run_dir = tmp_path / "run"
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several times faster for a tiny model on a busy 2-core machine
    try:
        code, out, _ = run_cli(capsys, "--model", "tiny", "--dataset", data, "--num_generations", "4",
                               "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                               "--max_completion_length", "16", "--max_steps", "2",
                               "--save_steps", "1", "--output_dir", str(run_dir))
    finally:
        torch.set_num_threads(saved_threads)
    assert code == 0 and f"run folder: {run_dir}" in out
    args = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert args["model"] == "tiny" and args["max_steps"] == 2 and "n_pos" in args  # CLI and embedded default
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["dataset"] == data and config["trainer"]["num_generations"] == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2] and "tapo/eligible_frac" in rows[0]
    # The default keeps what a resume needs: the newest checkpoint only (checkpoint-1 was rotated out).
    assert [c.name for c in run_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    assert {"trainer_state.json", "tapo_state.json", "optimizer.pt", "model.safetensors"} <= {
        f.name for f in (run_dir / "checkpoint-2").iterdir()}
    assert re.search(r"run folder: .* \(\d+\.\d [KMG]B on disk\)", out)
    assert (run_dir / "final" / "model.safetensors").exists()
    for folder in (run_dir / "checkpoint-2", run_dir / "final"):  # the card goes with the weights
        card = (folder / "README.md").read_text()
        assert "tiny random Llama" in card and "trained with **TAPO**" in card and f'model="{folder}"' in card
    assert (run_dir / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run_dir.glob(".tmp-*"))


BAD_DATA = [
    # (case, rows or None for a special file, expected message parts)
    ("missing problem", [{"id": "a", "answer": "1"}], ["line 5", "field 'problem': missing"]),
    ("empty problem", [{"id": "a", "problem": "   ", "answer": "1"}], ["line 5", "field 'problem': empty"]),
    ("missing answer", [{"id": "a", "problem": "1 + 0"}], ["line 5", "field 'answer': missing"]),
    ("non-string answer", [{"id": "a", "problem": "1 + 0", "answer": [1]}], ["line 5", "field 'answer'", "got list"]),
    ("duplicate id", [{"id": "q1", "problem": "9 + 9", "answer": "18"}], ["line 5", "duplicate id 'q1' (first at line 2)"]),
    ("malformed json line", ['{"problem": "1 + 1", "answer": '], ["line 5", "malformed JSON"]),
    ("row not an object", ["[1, 2]"], ["line 5", "expected an object, got list"]),
]


@pytest.mark.parametrize("case, extra, expected", BAD_DATA, ids=[c for c, _, _ in BAD_DATA])
def test_a_bad_row_is_one_clear_error_before_anything_loads(tmp_path, capsys, nothing_loads, case, extra, expected):
    data = write_jsonl(tmp_path / "problems.jsonl", GOOD_ROWS + extra)
    code, _, err = run_cli(capsys, "--model", "tiny", "--dataset", data, "--output_dir", str(tmp_path / "run"))
    assert code == 2
    assert err.startswith(f"tapo train: {data}: 1 bad row(s)") and "Traceback" not in err
    for part in expected:
        assert part in err
    assert "skip_bad_rows" in err  # the way out is named
    assert not (tmp_path / "run").exists()  # no run folder for a run that never started


@pytest.mark.parametrize(
    "case, content, expected",
    [
        ("missing file", None, "file not found"),
        ("not UTF-8", b"\xff\xfe\x00garbage", "not UTF-8 text"),
        ("empty file", b"", "no rows"),
        ("no problem column", b'{"question_text": "1 + 1", "answer": "2"}\n', "no row has a field 'problem'"),
    ],
)
def test_an_unusable_file_is_one_clear_error(tmp_path, capsys, nothing_loads, case, content, expected):
    path = tmp_path / "problems.jsonl"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run_cli(capsys, "--dataset", str(path), "--output_dir", str(tmp_path / "run"))
    assert code == 2 and err.startswith(f"tapo train: {path}") and expected in err and "Traceback" not in err


def test_skip_bad_rows_drops_and_counts_them(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "problems.jsonl", GOOD_ROWS + [{"problem": "", "answer": "1"}, "{oops"])
    seen = {}

    def fake_train(run, config, dataset):
        seen["dataset"] = dataset
        return config.output_dir

    monkeypatch.setattr("tapo.run.train", fake_train)
    code, out, _ = run_cli(capsys, "--dataset", data, "--skip_bad_rows", "true", "--output_dir", str(tmp_path / "run"))
    assert code == 0 and "skipped 2 bad rows" in out
    assert seen["dataset"]["id"] == ["q0", "q1", "q2", "q3"] and "prompt" in seen["dataset"].column_names


CONFIG_ERRORS = [
    # (case, YAML text or None, command line, expected message parts)
    ("yaml unknown key", "n_poss: 3\n", [], ["unknown option(s) in config file", "'n_poss': did you mean n_pos?",
                                            "TAPO options: activation_checkpointing_min_tokens, algorithm, answer_field", "tapo train --help"]),
    ("cli unknown key", None, ["--ref_loss_weigth", "0.5"], ["unknown option(s) in the command line",
                                                             "did you mean ref_loss_weight, "]),
    ("yaml wrong type", "n_pos: abc\n", [], ["n_pos: 'abc' is not a valid int"]),
    ("yaml list for a scalar", "max_steps: [1]\n", [], ["max_steps: expected one value, got the list [1]"]),
    ("yaml bad bool", "tapo_enabled: maybe\n", [], ["tapo_enabled: Truthy value expected: got maybe"]),
    ("yaml bad list item", "reward_weights: [1, x]\n", [], ["reward_weights: 'x' is not a valid float"]),
    ("yaml bad choice", "lr_scheduler_type: fast\n", [], ["lr_scheduler_type: 'fast' is not one of: linear, cosine"]),
    ("yaml not a mapping", "- n_pos\n- 3\n", [], ["must be a YAML mapping of option: value, not a list"]),
    ("yaml syntax", "n_pos: [3\n", [], ["is not valid YAML"]),
    ("cli wrong type", None, ["--n_pos", "abc"], ["argument --n_pos/--n-pos: invalid int value: 'abc'"]),
    ("cli missing value", None, ["--config"], ["--config needs a value"]),
    ("cli stray word", None, ["oops"], ["not used", "'oops'"]),
    ("rejected value", None, ["--constructor", "oracle"], ["constructor='oracle': choose one of"]),
    ("K=1", None, ["--num_generations", "1"], ["GRPO requires at least 2 generations per prompt"]),
    ("opsd option", None, ["--algorithm", "opsd", "--opsd_divergence", "kl"], ["opsd_divergence='kl': choose one of"]),
    ("opsd option without opsd", "opsd_weight: 0.5\n", ["--algorithm", "grpo"],
     ["opsd_weight: OPSD option(s), they need --algorithm opsd (got grpo)"]),
    ("unknown algorithm", None, ["--algorithm", "ppo"], ["algorithm='ppo': choose tapo, grpo or opsd"]),
]


@pytest.mark.parametrize("case, text, argv, expected", CONFIG_ERRORS, ids=[c for c, _, _, _ in CONFIG_ERRORS])
def test_a_bad_option_is_one_clear_error(tmp_path, capsys, nothing_loads, case, text, argv, expected):
    if text is not None:
        (tmp_path / "config.yaml").write_text(text)
        argv = ["--config", str(tmp_path / "config.yaml"), *argv]
    code, _, err = run_cli(capsys, "--output_dir", str(tmp_path / "run"), *argv)
    assert code == 2 and err.startswith("tapo train: ")
    assert "Traceback" not in err and "usage:" not in err  # not argparse's page of every GRPOConfig option
    for part in expected:
        assert part in err, err
    assert not (tmp_path / "run").exists()


UNSUPPORTED_WITH_TAPO = [  # TRL options TAPO does not apply to constructed rows: (command line, the option named)
    (["--importance_sampling_level", "sequence"], "importance_sampling_level='sequence' is not supported with TAPO"),
    (["--loss_type", "cispo"], "loss_type='cispo' is not supported with TAPO"),
    (["--loss_type", "sapo"], "loss_type='sapo' is not supported with TAPO"),
    (["--loss_type", "vespo"], "loss_type='vespo' is not supported with TAPO"),
    (["--multi_objective_aggregation", "normalize_then_sum"],
     "multi_objective_aggregation='normalize_then_sum' is not supported with TAPO"),
]


@pytest.mark.parametrize("argv, expected", UNSUPPORTED_WITH_TAPO, ids=[a[1] for a, _ in UNSUPPORTED_WITH_TAPO])
def test_a_trl_option_tapo_does_not_apply_is_one_clear_error(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.setattr("tapo.models.load_model_and_tokenizer", lambda *a, **k: pytest.fail("a model was loaded"))
    code, _, err = run_cli(capsys, "--output_dir", str(tmp_path / "run"), *argv)
    assert code == 2 and err.startswith(f"tapo train: {expected} (") and len(err.strip().splitlines()) == 1
    assert "use " in err and "--algorithm grpo" in err  # what to do instead is named
    assert not (tmp_path / "run").exists()
    # Plain GRPO (TAPO off) takes the option as TRL does.
    monkeypatch.setattr("tapo.run.train", lambda run, config, dataset: config.output_dir)
    code, _, err = run_cli(capsys, "--algorithm", "grpo", "--output_dir", str(tmp_path / "grpo"), *argv)
    assert code == 0, err


def test_missing_config_file_and_resume_without_a_checkpoint(tmp_path, capsys, nothing_loads):
    code, _, err = run_cli(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and f"cannot read config file {tmp_path / 'nope.yaml'}" in err
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)  # half-written: no trainer_state.json
    code, _, err = run_cli(capsys, "--resume", str(tmp_path / "run"))
    assert code == 2 and "no complete checkpoint" in err


def test_yaml_values_are_converted_like_command_line_values(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-6\nref_max_length: null\nreward_weights: 2\nbf16: false\n"
                                     "model_init_kwargs: {dtype: float32}\nn_pos: 2\nmax_completion_length: 32\n")
    _, config, explicit = parse_train_args(["--config", str(tmp_path / "c.yaml"), "--n-pos", "3",
                                            "--no_tapo_enabled", "--output_dir", str(tmp_path / "run")])
    assert config.learning_rate == 1e-6  # PyYAML reads 1e-6 as a string; converted like CLI text
    assert config.ref_max_length == 64  # null = the default, 2 * max_completion_length
    assert config.reward_weights == [2.0] and config.bf16 is False and config.model_init_kwargs == {"dtype": "float32"}
    assert config.n_pos == 3 and config.tapo_enabled is False  # the command line beats the file; dashes and no_ work
    assert explicit["n_pos"] == 3 and explicit["tapo_enabled"] is False and explicit["learning_rate"] == 1e-6


def test_resume_reloads_the_saved_options(tmp_path):
    run_dir = tmp_path / "run"
    _, config, explicit = parse_train_args(["--n_pos", "3", "--lr_scheduler_type", "cosine", "--output_dir", str(run_dir)])
    (run_dir / "checkpoint-2").mkdir(parents=True)
    (run_dir / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (run_dir / "args.yaml").write_text(yaml.safe_dump(explicit))  # what train_main saves
    resumed_run, resumed, _ = parse_train_args(["--resume", str(run_dir / "checkpoint-2"), "--max_steps", "20"])
    assert resumed_run.resume == str(run_dir / "checkpoint-2") and resumed.output_dir == str(run_dir)
    assert resumed.max_steps == 20  # extended on the command line
    for key in ("n_pos", "lr_scheduler_type", "report_to", "learning_rate", "seed", "save_steps", "num_generations"):
        assert getattr(resumed, key) == getattr(config, key), key


def test_non_finite_loss_exits_1_and_names_the_checkpoint_to_resume(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"

    def diverging_train(run, config, dataset):
        (run_dir / "checkpoint-4").mkdir()
        (run_dir / "checkpoint-4" / "trainer_state.json").write_text("{}")
        raise NonFiniteLossError("non-finite loss at step 5 (L_GRPO=nan)")

    monkeypatch.setattr("tapo.run.train", diverging_train)
    data = write_jsonl(tmp_path / "problems.jsonl", GOOD_ROWS)
    code, _, err = run_cli(capsys, "--dataset", data, "--output_dir", str(run_dir))
    assert code == 1 and "Traceback" not in err
    assert err.endswith(f"\ntapo train: non-finite loss at step 5 (L_GRPO=nan)\nlast good checkpoint: "
                        f"{run_dir / 'checkpoint-4'} (resume: tapo train --resume {run_dir})\n")


def test_the_command_exits_with_the_error_code(tmp_path):
    """The real entry point, in a fresh process: the exit status and a one-line message reach the shell."""
    done = subprocess.run([sys.executable, "-m", "tapo.cli", "train", "--n_poss", "3"], capture_output=True, text=True,
                          cwd=tmp_path, env=checkout_env(), timeout=120, check=False)
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.startswith("tapo train:")] == [
        "tapo train: unknown option(s) in the command line:"]
    assert "Traceback" not in done.stderr


def test_subprocesses_import_the_checkout_under_test(tmp_path):
    """Not the `tapo` that pip installed elsewhere: a fix in this checkout must be what the subprocess tests run."""
    done = subprocess.run([sys.executable, "-c", "import tapo.cli; print(tapo.cli.__file__)"], capture_output=True,
                          text=True, cwd=tmp_path, env=checkout_env(), timeout=60, check=True)
    assert Path(done.stdout.strip()).resolve() == REPO_ROOT / "tapo" / "cli.py"
