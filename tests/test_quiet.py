"""The deprecation warnings a default run printed: gone, with both checkpointing names still meaning what they say."""

import warnings

import pytest
import torch

from tapo.trainer import TAPOConfig


def config(tmp_path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = TAPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)
    return c, [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]


@pytest.mark.parametrize("kw, expected", [({}, True), ({"gradient_checkpointing": False}, False),
                                          ({"activation_checkpointing": False}, False)])
def test_checkpointing_setting_kept_without_a_deprecation_warning(tmp_path, kw, expected):
    c, caught = config(tmp_path, **kw)
    assert not [m for m in caught if "checkpointing" in m]
    assert c.activation_checkpointing is expected and c.gradient_checkpointing is expected


def test_pin_memory_only_with_an_accelerator(tmp_path):
    c, _ = config(tmp_path)
    assert c.dataloader_pin_memory is torch.accelerator.is_available()


def test_trls_is_gradient_checkpointing_read_is_silenced():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # keep the installed filters, show everything else
        import tapo.quiet

        tapo.quiet.silence_dependency_warnings()
        assert model.is_gradient_checkpointing is False
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
