"""`tapo train`: one training run = a run folder with config, metrics.jsonl, checkpoints, final model and a plot.

Kept thin on purpose: data comes from `tapo.data`, models from `tapo.models`, the algorithm from `TAPOTrainer` (or
`OPSDTrainer`), the run folder's files from `tapo.runfolder`. `build_trainer` is the one place a trainer is built, for
`tapo train` and for every benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers.trainer_callback import PrinterCallback

from tapo import runfolder
from tapo.config import EMBEDDED_DEFAULTS
from tapo.ranks import is_main_process
from tapo.progress import progress_callback
from tapo.runfolder import MetricsLogger, resume_point

ALGORITHMS = ("tapo", "grpo", "opsd")


@dataclass
class RunArgs:
    """What to train on (defaults: the embedded CPU run, `tapo.config.EMBEDDED_DEFAULTS`). Everything else is a `TAPOConfig` (GRPOConfig) field,
    or an `OPSDConfig` field with `algorithm='opsd'`."""

    model: str = field(default=EMBEDDED_DEFAULTS["model"], metadata={
        "help": "'smollm2-135m' (embedded, offline), 'tiny' (random smoke-test model), a local folder or a hub name."})
    dataset: str = field(default=EMBEDDED_DEFAULTS["dataset"], metadata={
        "help": "A .jsonl/.parquet file, a reasoning-gym task spec (rg:chain_sum:..., chain_sum, basic_arithmetic, ...) "
                "or a hub dataset name."})
    n_train: int = field(default=EMBEDDED_DEFAULTS["n_train"], metadata={
        "help": "Problems to generate (reasoning-gym) or keep (files)."})
    problem_field: str = field(default="problem", metadata={"help": "Column holding the problem text."})
    answer_field: str = field(default="answer", metadata={"help": "Column holding the gold answer."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message for every prompt."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Drop and count malformed rows instead of failing."})
    algorithm: str = field(default="tapo", metadata={"help": "'tapo', 'grpo' (TAPO off, same code path) or 'opsd'."})
    resume: str | None = field(default=None, metadata={"help": "Run folder (or checkpoint folder) to resume from."})
    plot: bool = field(default=True, metadata={"help": "Write training.png at the end."})




def load_train_set(run: RunArgs, seed: int):
    """The validated problems as TRL's conversational dataset; a bad row raises DataError naming file, row and field."""
    from tapo.data import load_problems, to_conversational

    dataset, n_skipped = load_problems(run.dataset, n=run.n_train, seed=seed, problem_field=run.problem_field,
                                       answer_field=run.answer_field, skip_bad_rows=run.skip_bad_rows)
    if n_skipped and is_main_process():
        print(f"skipped {n_skipped} bad rows of {run.dataset}")
    return to_conversational(dataset, system_prompt=run.system_prompt)


def config_class(algorithm: str):
    """The config dataclass of an algorithm: OPSDConfig for 'opsd', TAPOConfig for 'tapo' and 'grpo'."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    if algorithm == "opsd":
        from tapo.opsd import OPSDConfig

        return OPSDConfig
    from tapo.config import TAPOConfig

    return TAPOConfig


def trainer_class(algorithm: str):
    """The trainer of an algorithm: OPSDTrainer for 'opsd', TAPOTrainer for 'tapo' and 'grpo' (TAPO switched off)."""
    if algorithm == "opsd":
        from tapo.opsd import OPSDTrainer

        return OPSDTrainer
    from tapo.trainer import TAPOTrainer

    return TAPOTrainer


def build_trainer(run: RunArgs, config, dataset, callbacks=(), trainer_cls=None):
    """The trainer `tapo train` runs, for `tapo train` and every benchmark: `run.model` with its tokenizer, the math
    reward, `dataset`, and `callbacks` in place of TRL's console printer. `trainer_cls` overrides the algorithm's class
    (the parity benchmark passes TRL's GRPOTrainer)."""
    from tapo.core.verify import math_reward
    from tapo.models import load_model_and_tokenizer, resolve_model

    # A missing cached model (tiny, smollm2-135m) is built by rank 0 while the others wait: under torch.distributed,
    # transformers' save_pretrained writes only on global rank 0, so a folder built by another rank would lack weights.
    with config.main_process_first(local=False, desc="building the cached model"):
        model_path = resolve_model(run.model)
    model, tokenizer = load_model_and_tokenizer(model_path)
    trainer = (trainer_cls or trainer_class(run.algorithm))(
        model=model, reward_funcs=[math_reward], args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # the callbacks show or record what it would print
    return trainer


def train(run: RunArgs, config, dataset=None) -> Path:
    """Run one training job; returns the run folder. `dataset`: `load_train_set(run, config.seed)` when the caller
    has already loaded it (the CLI does, so that bad data fails before any model is loaded)."""
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        dataset = load_train_set(run, config.seed)
    checkpoint = resume_point(run.resume)[1] if run.resume else None  # checked before the model loads
    if is_main_process():
        runfolder.write_config(run_dir, run, config)
    trainer = build_trainer(run, config, dataset, callbacks=[MetricsLogger(run_dir), progress_callback()])
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(run_dir / runfolder.FINAL_MODEL_DIR))
    if run.plot and is_main_process():
        from tapo.plots import plot_training

        plot_training(run_dir / runfolder.METRICS_FILE, run_dir / runfolder.PLOT_FILE)
    return run_dir
