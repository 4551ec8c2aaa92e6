"""Reliability: degenerate groups, NaN/inf losses, atomic checkpoints, exact resume after SIGKILL, huge completions.

Most tests drive TAPOTrainer on the tiny model with scripted rollouts (only `_generate_single_turn` is replaced), so
each group's correct/incorrect split is chosen by the test. The determinism and SIGKILL tests run the real CLI with
real sampling; their reward marks about a third of the random rollouts correct so that DCS and splice constructions
actually happen (a random model never writes the right answer).
"""

import json
import math
import random
import signal
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.trainer.utils import RepeatSampler

from tapo.cli import main
from tapo.core.verify import math_reward
from tapo.runfolder import TAPO_STATE_FILE, find_checkpoint, read_metrics
from tapo.trainer import NonFiniteLossError, TAPOConfig, TAPOTrainer
from tapo.trainer_base import ResumableRepeatSampler

from checkout import checkout_env

K = 4
PROBLEMS = {  # problem: (gold, right rollout, wrong rollout)
    "23 + 45 - 12": ("56", "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}",
                     "23 + 45 = 63\n63 - 12 = 51\nThe answer is \\boxed{51}"),
    "7 + 8 + 9": ("24", "7 + 8 = 15\n15 + 9 = 24\nThe answer is \\boxed{24}",
                  "7 + 8 = 16\n16 + 9 = 25\nThe answer is \\boxed{25}"),
}
# Keys whose values are wall-clock times, or end-of-run summaries that cover only the steps one process ran.
TIME_KEYS = {"time", "step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(model_dir, out_dir, pattern="RRWW", synthesis="", **overrides):
    """TAPOTrainer whose rollouts follow `pattern` (R = right, W = wrong; member i of each group gets pattern[i]) and
    whose synthesis prompts (constructor='self') are answered with the text `synthesis`."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = dict(output_dir=str(out_dir), per_device_train_batch_size=2 * K, num_generations=K, max_completion_length=64,
                  max_steps=1, learning_rate=1e-3, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                  use_cpu=True, disable_tqdm=True, constructor="splice", n_pos=1, n_neg=2, m_max=2,
                  synthesis_max_tokens=64)
    kwargs.update(overrides)
    rows = [{"prompt": [{"role": "user", "content": f"Compute {p}."}], "answer": gold} for p, (gold, _, _) in PROBLEMS.items()]
    trainer = TAPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[math_reward],
                          args=TAPOConfig(**kwargs), train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    counts = {}

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        out = []
        for ids in prompt_ids:
            prompt = tokenizer.decode(ids)
            if "<analysis>" in prompt:  # a synthesis prompt (constructor='self')
                text = synthesis
            else:
                problem = next(p for p in PROBLEMS if p in prompt)
                n = counts[problem] = counts.get(problem, -1) + 1
                _, right, wrong = PROBLEMS[problem]
                text = right if pattern[n % K] == "R" else wrong
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        return out, None

    trainer._generate_single_turn = types.MethodType(generate, trainer)
    return trainer


def logged(trainer) -> dict:
    """The one per-step log record of a 1-step run."""
    return next(r for r in trainer.state.log_history if "loss" in r)


def assert_all_finite(trainer, record):
    rates = {"tapo/parse_rate", "tapo/accept_rate"}  # undefined (logged as NaN) when nothing was attempted
    for key, value in record.items():
        if isinstance(value, float) and key not in rates:
            assert math.isfinite(value), (key, value)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ------------------------------------------------------------------------------------------------------------------
# Degenerate groups: training continues, the reason is in the logged metrics, nothing becomes NaN.

@pytest.mark.parametrize(
    "case, pattern, overrides, expected",
    [
        ("all correct", "RRRR", {}, {"tapo/accuracy": 1.0, "tapo/eligible_frac": 0.0, "frac_reward_zero_std": 1.0,
                                     "tapo/constructions_attempted": 0.0}),
        ("all wrong", "WWWW", {}, {"tapo/accuracy": 0.0, "tapo/eligible_frac": 0.0, "frac_reward_zero_std": 1.0,
                                   "tapo/constructions_attempted": 0.0}),
        # One right answer per group but n_pos=2: GRPO still learns from the mixed group, DCS picks nothing.
        ("no eligible query", "RWWW", {"n_pos": 2}, {"tapo/accuracy": 0.25, "tapo/eligible_frac": 0.0,
                                                     "frac_reward_zero_std": 0.0, "tapo/constructions_attempted": 0.0}),
        # Constructions are dropped (never truncated: that would cut the verified final answer) and counted.
        ("constructions too long", "RRWW", {"ref_max_length": 8},
         {"tapo/eligible_frac": 1.0, "tapo/constructions_attempted": 4.0, "tapo/rejected_too_long": 4.0,
          "tapo/constructions_accepted": 0.0, "tapo/accept_rate": 0.0}),
    ],
)
def test_degenerate_groups_train_on_and_say_why(tiny_model_dir, tmp_path, case, pattern, overrides, expected):
    trainer = make_trainer(tiny_model_dir, tmp_path, pattern, **overrides)
    trainer.train()
    record = logged(trainer)
    assert trainer.state.global_step == 1
    for key, value in expected.items():
        assert record[key] == pytest.approx(value), key
    assert "tapo/loss_ref" not in record  # no accepted construction: no L_ref term
    assert_all_finite(trainer, record)


def test_unparsable_syntheses_are_counted_and_training_continues(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, "RRWW", synthesis="@@ no tags here \\boxed{", constructor="self")
    trainer.train()
    record = logged(trainer)
    assert record["tapo/constructions_attempted"] == 4.0
    assert record["tapo/constructions_parsed"] == 0.0 and record["tapo/parse_rate"] == 0.0
    assert record["tapo/constructions_accepted"] == 0.0
    assert_all_finite(trainer, record)


def test_a_single_rollout_per_query_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="at least 2 generations"):
        TAPOConfig(output_dir="unused", num_generations=1, per_device_train_batch_size=2, use_cpu=True)


# ------------------------------------------------------------------------------------------------------------------
# NaN / inf loss: the step stops before backward, with a message; checkpoints so far are kept.

def test_non_finite_loss_stops_before_backward_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path):
    # (An inf reward does not get here: TRL's group statistics turn it into a zero-advantage group, logged as reward
    # inf; the loss stays finite.) Injected: NaN advantages in step 2's batch.
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    score = trainer._generate_and_score_completions

    def nan_advantages_in_step_2(inputs):
        out = score(inputs)
        if trainer.state.global_step == 1:
            out["advantages"][0] = math.nan
        return out

    trainer._generate_and_score_completions = nan_advantages_in_step_2
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 \(L_GRPO=nan.*non-finite advantages"):
        trainer.train()
    assert find_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert not (tmp_path / "checkpoint-2").exists()
    saved = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    for name, param in trainer.model.named_parameters():  # unchanged since step 1's checkpoint
        if name in saved:
            assert torch.equal(param.detach(), saved[name]), name
    # With finite advantages the message blames no reward function.
    with pytest.raises(NonFiniteLossError) as caught:
        trainer._checked_finite(torch.tensor(math.inf), {"advantages": torch.zeros(2)}, L_GRPO=torch.tensor(math.inf))
    assert str(caught.value) == ("non-finite loss at step 2 (L_GRPO=inf); the step was stopped before backward, so the "
                                 "weights and saved checkpoints are unchanged")


# ------------------------------------------------------------------------------------------------------------------
# Atomic checkpoints and the TAPO state inside them.

def test_checkpoints_are_atomic_and_carry_the_tapo_state(tiny_model_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    for step in (1, 2):
        state = json.loads((tmp_path / f"checkpoint-{step}" / TAPO_STATE_FILE).read_text())
        assert state == {"generation_round": step, "step": step}  # one generation per optimizer step here
    assert not list(tmp_path.glob(".tmp-*"))

    # A crash in the middle of writing checkpoint-3 (after the model weights, before the optimizer): only the hidden
    # staging folder holds the partial save, and resume still finds checkpoint-2.
    trainer.args.max_steps = 3

    def crash(self, output_dir):
        raise OSError("disk full")

    monkeypatch.setattr(TAPOTrainer, "_save_optimizer_and_scheduler", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert (tmp_path / ".tmp-checkpoint-3" / "checkpoint-3" / "model.safetensors").exists()
    assert not (tmp_path / "checkpoint-3").exists()
    assert find_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    # Resumed from checkpoint-2, the TAPO counters continued (2 restored + 1 new round), not restarted at 0.
    assert trainer._generation_round == 3

    # Saving that step again (the next attempt) clears the leftover and completes checkpoint-3.
    (tmp_path / ".tmp-checkpoint-3" / "checkpoint-3" / "stale.bin").write_text("from the crashed save")
    monkeypatch.undo()
    trainer._save_checkpoint(trainer.model, None)
    assert (tmp_path / "checkpoint-3" / "optimizer.pt").exists() and not list(tmp_path.glob(".tmp-*"))
    assert not (tmp_path / "checkpoint-3" / "stale.bin").exists()
    assert json.loads((tmp_path / "checkpoint-3" / TAPO_STATE_FILE).read_text())["generation_round"] == 3
    # Each checkpoint carries tapo's model card, naming the checkpoint's final folder (not the staging one).
    assert f'model="{tmp_path / "checkpoint-3"}"' in (tmp_path / "checkpoint-3" / "README.md").read_text()

    # A complete but older save of the same step (a run resumed from before it) is replaced as a whole.
    (tmp_path / "checkpoint-3" / "older.bin").write_text("from an earlier run of this step")
    trainer._save_checkpoint(trainer.model, None)
    assert (tmp_path / "checkpoint-3" / "optimizer.pt").exists() and not (tmp_path / "checkpoint-3" / "older.bin").exists()
    assert not list(tmp_path.glob(".tmp-*"))



def test_the_best_checkpoint_is_recorded_under_its_final_name(tiny_model_dir, tmp_path):
    # When an evaluation marks a step best (state.best_global_step, as with metric_for_best_model), transformers
    # records best_model_checkpoint as the folder it writes that step to: here the staging folder. The state and the
    # checkpoint's trainer_state.json must name the final checkpoint-N instead, and rotation must keep it.
    class StepOneIsBest(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                state.best_global_step = 1

    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=3, save_strategy="steps", save_steps=1,
                           save_total_limit=2)
    trainer.add_callback(StepOneIsBest())
    trainer.train()
    best = str(tmp_path / "checkpoint-1")
    assert trainer.state.best_model_checkpoint == best
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]  # best and last
    for step in (1, 3):
        assert json.loads((tmp_path / f"checkpoint-{step}" / "trainer_state.json").read_text())["best_model_checkpoint"] == best


def test_resume_never_picks_a_half_written_checkpoint(tmp_path):
    def checkpoint(name, complete):
        (tmp_path / name).mkdir(parents=True)
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")

    assert find_checkpoint(tmp_path) is None
    checkpoint("checkpoint-9", complete=True)
    checkpoint("checkpoint-10", complete=True)  # numeric, not lexicographic, order
    checkpoint("checkpoint-11", complete=False)  # killed while saving (a pre-atomic writer)
    checkpoint(".tmp-checkpoint-12/checkpoint-12", complete=True)  # staging folder of an interrupted atomic save
    checkpoint("checkpoint-x", complete=True)
    assert find_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert find_checkpoint(tmp_path / "checkpoint-9") == str(tmp_path / "checkpoint-9")
    assert find_checkpoint(tmp_path / "checkpoint-11") is None


def test_sampler_gives_every_epoch_its_uninterrupted_order_after_a_restart():
    data = list(range(10))
    uninterrupted = RepeatSampler(data, mini_repeat_count=2, batch_size=3, repeat_count=2, seed=7)
    orders = [list(uninterrupted) for _ in range(3)]
    assert orders[0] != orders[1]
    for epoch in (2, 0, 1):  # a fresh sampler, as after a restart, jumping straight to `epoch`
        restarted = ResumableRepeatSampler(data, mini_repeat_count=2, batch_size=3, repeat_count=2, seed=7)
        restarted.set_epoch(epoch)
        assert list(restarted) == orders[epoch]


# ------------------------------------------------------------------------------------------------------------------
# Verifier bound at the trainer's reward call.

def test_one_megabyte_completion_is_scored_fast(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    huge = ["x" * 1_000_000, "\\frac{" * 50_000 + "1" + "}" * 50_000, "x" * 1_000_000 + "\\boxed{5}"]
    completions = [[{"role": "assistant", "content": text}] for text in huge]
    inputs = [{"answer": "5"}] * 3
    start = time.monotonic()
    rewards = trainer._calculate_rewards(inputs, ["p"] * 3, completions, [[0]] * 3)
    assert time.monotonic() - start < 20  # the verifier's own per-answer bound is 5 s
    assert rewards[:, 0].tolist() == [0.0, 0.0, 1.0]  # only the last part is read: a final answer is still found


# ------------------------------------------------------------------------------------------------------------------
# Through the CLI with real sampling: determinism, and exact resume after SIGKILL.

def third_correct(prompts, completions, answer, **kwargs) -> list[float]:
    """math_reward, except that about 1 in 3 rollouts (by a hash of the text) also count as correct: a random model
    never writes the right answer, and this way groups are mixed, so DCS and splice constructions really happen."""
    scores = math_reward(prompts, completions, answer, **kwargs)
    return [s or float(zlib.crc32(c[-1]["content"].encode()) % 3 == 0) for s, c in zip(scores, completions)]


# `tapo train` with `third_correct` as the reward, for subprocesses.
DRIVER = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import tapo.core.verify
from test_reliability import third_correct
tapo.core.verify.math_reward = third_correct
from tapo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli_args(tmp_path, model_dir, max_steps: int) -> list[str]:
    """4 problems, 2 per step: an epoch is 2 steps, so runs cross epochs."""
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps({"problem": f"{a} + {a}", "answer": str(2 * a)}) + "\n"
                                                     for a in range(1, 5)))
    return ["--model", str(model_dir), "--dataset", str(tmp_path / "problems.jsonl"), "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--max_completion_length", "24",
            "--ref_max_length", "400",
            "--max_steps", str(max_steps), "--save_steps", "1", "--learning_rate", "1e-3", "--temperature", "1.0",
            "--n_pos", "1", "--n_neg", "1", "--seed", "3", "--plot", "false"]


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in read_metrics(run_dir / "metrics.jsonl")]


def test_same_seed_and_config_give_the_same_metrics(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("tapo.core.verify.math_reward", third_correct)
    args = cli_args(tmp_path, tiny_model_dir, max_steps=3)
    for run in ("a", "b"):
        assert main(["train", *args, "--output_dir", str(tmp_path / run)]) == 0
    first, second = comparable(tmp_path / "a"), comparable(tmp_path / "b")
    assert [r["step"] for r in first] == [1, 2, 3, 3]
    assert first == second
    assert any(r.get("tapo/constructions_accepted") for r in first) and first[0]["grad_norm"] > 0


def tapo_train(tmp_path, *args) -> subprocess.Popen:
    env = checkout_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(driver), "train", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run_exactly(tiny_model_dir, tmp_path):
    args = cli_args(tmp_path, tiny_model_dir, max_steps=6)  # 3 epochs: resumed data order is checked across epochs
    reference = tapo_train(tmp_path, *args, "--output_dir", "reference")
    victim = tapo_train(tmp_path, *args, "--output_dir", "victim")
    kill_after, delay = random.randint(1, 3), random.uniform(0.0, 0.6)  # a random point of a later step or save
    print(f"SIGKILL {delay:.2f} s after checkpoint-{kill_after} appeared")  # shown if the test fails
    deadline = time.monotonic() + 120
    while not (tmp_path / f"victim/checkpoint-{kill_after}").exists():
        assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()[-2000:]
        time.sleep(0.02)
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (tmp_path / "victim/final").exists()

    resumed = tapo_train(tmp_path, "--resume", "victim")
    for proc in (reference, resumed):
        assert proc.wait(timeout=180) == 0, proc.stderr.read()[-2000:]

    expected, got = comparable(tmp_path / "reference"), comparable(tmp_path / "victim")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6, 6]  # no duplicated or skipped step (+ the summary row)
    assert got == expected  # every logged number, bit for bit
    assert sum(r.get("tapo/constructions_accepted", 0) for r in expected) > 0  # DCS state really was exercised
    weights, resumed_weights = (load_file(tmp_path / run / "final/model.safetensors") for run in ("reference", "victim"))
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
