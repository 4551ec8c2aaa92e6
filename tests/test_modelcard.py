"""The model card saved with a model names the base model that was trained, the algorithm that actually ran with its
key settings, the tapo version, and cites the TAPO paper (TRL's own card said "fine-tuned version of None" and
"trained with GRPO" for every tapo run)."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import tapo
from tapo.core.verify import math_reward
from tapo.modelcard import GRPO_SETTINGS, method_settings
from tapo.models import SMOLLM2_FOLDER, SMOLLM2_HUB_ID, TINY_FOLDER, describe_base_model
from tapo.opsd import OPSDConfig, OPSDTrainer
from tapo.trainer import TAPOConfig, TAPOTrainer

CONFIG = dict(report_to="none", use_cpu=True, num_generations=2, per_device_train_batch_size=2, max_steps=3)


def test_base_model_is_named_for_every_kind_of_model_source(tmp_path):
    assert describe_base_model(str(tmp_path / SMOLLM2_FOLDER))[0] == SMOLLM2_HUB_ID  # the embedded default's folder
    hub_id, text = describe_base_model(str(tmp_path / TINY_FOLDER))
    assert hub_id is None and "tiny random Llama" in text
    assert describe_base_model("Qwen/Qwen2.5-Math-1.5B") == ("Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Math-1.5B")
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert describe_base_model(str(snapshot)) == ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B")
    assert describe_base_model(str(tmp_path)) == (None, f"the local model folder `{tmp_path}`")
    assert describe_base_model("") == (None, "a model of unknown origin (its config names no source)")


def test_settings_are_the_ones_that_took_effect(tmp_path):
    def config(**kw):
        return (OPSDConfig if any(k.startswith("opsd_") for k in kw) else TAPOConfig)(output_dir=str(tmp_path), **CONFIG, **kw)

    tapo_off_ots = method_settings(["TAPO"], config(ots_enabled=False, n_pos=3))
    assert list(tapo_off_ots)[:4] == ["constructor", "n_pos", "n_neg", "m_max"] and tapo_off_ots["n_pos"] == 3
    assert tapo_off_ots["ots_enabled"] is False and "ots_low" not in tapo_off_ots and "teacher_model" not in tapo_off_ots
    teacher = method_settings(["TAPO"], config(constructor="teacher", teacher_model="Qwen/Qwen2.5-7B-Instruct"))
    assert teacher["teacher_model"] == "Qwen/Qwen2.5-7B-Instruct" and teacher["ots_high"] == 10.0
    assert teacher["prefix_match"] == "strict" and teacher["cut"] == "before_error"
    splice = method_settings(["TAPO"], config(constructor="splice", construction_control="no_prefix"))
    assert splice["construction_control"] == "no_prefix" and "prefix_match" not in splice  # no synthesis to match
    opsd = method_settings(["OPSD"], config(opsd_divergence="forward_kl"))
    assert opsd["opsd_divergence"] == "forward_kl" and "opsd_jsd_beta" not in opsd and "n_pos" not in opsd
    assert method_settings(["OPSD"], config(opsd_divergence="jsd", opsd_jsd_beta=0.3))["opsd_jsd_beta"] == 0.3
    assert list(method_settings(["GRPO"], config())) == GRPO_SETTINGS


ARMS = [  # trainer, options, what the card must say, what it must not
    (TAPOTrainer, {"n_pos": 3}, ["trained with **TAPO**", "| `n_pos` | 3 |", "| `constructor` | self |"],
     ["DeepSeekMath", "opsd_"]),
    (TAPOTrainer, {"tapo_enabled": False}, ["trained with **GRPO**", "TAPO off", "DeepSeekMath", "2402.03300"],
     ["`n_pos`", "opsd_"]),
    (OPSDTrainer, {"tapo_enabled": False}, ["trained with **OPSD**", "| `opsd_divergence` | reverse_kl |"],
     ["`n_pos`", "DeepSeekMath"]),
    (OPSDTrainer, {}, ["trained with **TAPO + OPSD**", "| `n_pos` | 2 |", "| `opsd_reference` | sibling |"], []),
]


@pytest.mark.parametrize("cls, options, present, absent", ARMS, ids=["tapo", "grpo", "opsd", "tapo+opsd"])
def test_saved_model_card_names_base_model_algorithm_version_and_paper(tiny_model_dir, tmp_path, cls, options,
                                                                          present, absent):
    torch.manual_seed(0)
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=[math_reward],
                  args=(OPSDConfig if cls is OPSDTrainer else TAPOConfig)(output_dir=str(tmp_path / "run"), **CONFIG, **options),
                  train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "1 + 1"}], "answer": "2"}]),
                  processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.save_model(str(tmp_path / "run" / "final"))
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    for text in [f"fine-tuned version of the local model folder `{tiny_model_dir}`", f"tapo (tapo-rl): {tapo.__version__}",
                 "| `steps trained` | 0 of 3 |", "arxiv.org/abs/2606.18844", "Learning from Your Own Mistakes",
                 "eprint        = {2606.18844}", f'model="{tmp_path / "run" / "final"}"', *present]:
        assert text in card
    for text in ["None", *absent]:
        assert text not in card


def test_card_hooks_pass_their_arguments_on(tiny_model_dir, tmp_path, monkeypatch):
    """TRL's `create_model_card(model_name, dataset_name, tags)` hook reaches tapo's card with each argument in its
    place, and `save_model` hands transformers its `_internal_call` flag (it decides, e.g., whether to push to the
    Hub) and writes the card only for a save the user asked for."""
    import transformers

    trainer = TAPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=[math_reward],
                          args=TAPOConfig(output_dir=str(tmp_path / "run"), **CONFIG),
                          train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "1 + 1"}],
                                                            "answer": "2"}]),
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.create_model_card(model_name="my-model", dataset_name="openai/gsm8k", tags="my-tag")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "openai/gsm8k" in card and "my-tag" in card and "my-model" in card

    calls = []
    monkeypatch.setattr(transformers.Trainer, "save_model",
                        lambda self, output_dir=None, _internal_call=False: calls.append((output_dir, _internal_call)))
    trainer.save_model(str(tmp_path / "internal"), _internal_call=True)
    trainer.save_model(str(tmp_path / "final"))
    assert calls == [(str(tmp_path / "internal"), True), (str(tmp_path / "final"), False)]
    assert not (tmp_path / "internal" / "README.md").exists() and (tmp_path / "final" / "README.md").exists()
