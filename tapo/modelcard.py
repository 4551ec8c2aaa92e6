"""The model card (README.md) written beside the weights: in final/, in every checkpoint-N/, and in the run folder
(where TRL writes it, for push_to_hub).

TRL builds its card from `trl/templates/lm_model_card.md` with the trainer's `_name` and `_paper`, and names the base
model after `config._name_or_path` unless that is a local folder. tapo's default model is a local folder and every
tapo trainer is a GRPOTrainer, so TRL's card reads "a fine-tuned version of None ... trained with GRPO". This card is
built the same way (huggingface_hub's `ModelCard.from_template`) from tapo's own template, which says which base
model was trained, which algorithm actually ran with its key settings, the tapo version, and cites the TAPO paper.
"""

from __future__ import annotations

import enum
import textwrap
from importlib.metadata import version
from importlib.resources import files

from huggingface_hub import ModelCard, ModelCardData

TAPO_PAPER = {
    "title": "Learning from Your Own Mistakes: Constructing Learnable Micro-Reflective Trajectories for Self-Distillation",
    "id": "2606.18844",
    "citation": textwrap.dedent("""\
        @misc{tapo2026,
            title         = {{Learning from Your Own Mistakes: Constructing Learnable Micro-Reflective Trajectories for Self-Distillation}},
            year          = 2026,
            eprint        = {2606.18844},
            archivePrefix = {arXiv},
        }"""),
}

# What each method is, in a phrase, and its key settings (TAPOConfig fields) beyond the GRPO ones every run has.
DESCRIPTIONS = {
    "TAPO": "GRPO plus micro-reflective trajectories repaired from the policy's own wrong rollouts",
    "GRPO": "plain GRPO, run through tapo's trainer with TAPO off",
    "OPSD": "on-policy self-distillation towards the same model given a reference solution",
}
METHOD_SETTINGS = {
    "TAPO": ["constructor", "n_pos", "n_neg", "m_max", "ref_loss_weight", "ref_baseline", "ref_loss_aggregation",
             "ots_enabled", "ots_low", "ots_high", "ref_max_length", "cut", "construction_control"],
    "GRPO": [],
    "OPSD": ["opsd_divergence", "opsd_jsd_beta", "opsd_weight", "opsd_include_grpo", "opsd_reference"],
}
GRPO_SETTINGS = ["num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                 "max_completion_length", "temperature", "beta", "loss_type", "seed"]
TEMPLATE = "templates/model_card.md"


def method_settings(methods: list[str], args) -> dict[str, object]:
    """The settings that define the run, method-specific ones first; options that had no effect are left out."""
    keys = [key for method in methods for key in METHOD_SETTINGS[method]]
    if "TAPO" in methods:
        if not args.ots_enabled:
            keys = [k for k in keys if k not in ("ots_low", "ots_high")]
        if args.constructor != "splice":  # a model writes the syntheses
            keys += ["prefix_match", "synthesis_max_tokens"]
        if args.constructor == "teacher":
            keys += ["teacher_model", "teacher_base_url"]
    if "OPSD" in methods and args.opsd_divergence != "jsd":
        keys.remove("opsd_jsd_beta")
    return {key: _shown(getattr(args, key)) for key in [*keys, *GRPO_SETTINGS]}


def _shown(value):
    return value.value if isinstance(value, enum.Enum) else value


def model_card(*, methods: list[str], args, base_model: str | None, base_model_text: str, model_name: str,
               model_path: str, steps_done: int, tags: list[str], method_paper: dict | None = None,
               dataset_name: str | None = None) -> ModelCard:
    """The card for one saved model. `base_model`: a hub id (linked, and set in the card's metadata) or None;
    `base_model_text`: how the text names it; `method_paper`: the paper of the method when it is not TAPO."""
    from tapo.version import __version__

    settings = {"steps trained": f"{steps_done} of {args.max_steps}" if args.max_steps > 0 else steps_done,
                **method_settings(methods, args)}
    card_data = ModelCardData(base_model=base_model, datasets=dataset_name, library_name="transformers",
                              model_name=model_name, pipeline_tag="text-generation",
                              tags=["generated_from_trainer", *tags])
    return ModelCard.from_template(
        card_data,
        template_str=files("tapo").joinpath(TEMPLATE).read_text(encoding="utf-8"),
        model_name=model_name,
        model_path=model_path,
        base_model=base_model,
        base_model_text=base_model_text,
        algorithm=" + ".join(methods),
        algorithm_description="; ".join(DESCRIPTIONS[m] for m in methods),
        settings=settings,
        method_paper=method_paper,
        tapo_paper=TAPO_PAPER,
        tapo_version=__version__,
        trl_version=version("trl"),
        transformers_version=version("transformers"),
        pytorch_version=version("torch"),
        datasets_version=version("datasets"),
        tokenizers_version=version("tokenizers"),
    )
