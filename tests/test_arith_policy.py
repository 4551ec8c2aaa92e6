"""tapo.arith_policy: the testbed policy's tokenizer, pre-training mix, and cached build."""

import json
import random

import torch

from tapo import arith
from tapo.arith_policy import (
    WORDS,
    PolicySettings,
    _batch,
    build_tokenizer,
    pretrained_policy,
    rule_synthesis,
    synthesis_example,
)
from tapo.core.synthesis import assemble_trajectory, parse_synthesis
from tapo.models import load_model_and_tokenizer

CHAIN = arith.Chain(terms=(12, 7, 3, 5), ops=("+", "*", "-"))
TINY = dict(task="arith:terms=3,ops=+,max=9", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
            max_positions=1536, max_steps=2, check_every=2, n_check=4, batch_size=4, synthesis_every=2,
            synthesis_batch_size=1, max_new_tokens=16)


def test_tokenizer_has_number_operator_and_word_tokens_a_chat_template_and_eos():
    tok = build_tokenizer()
    text = "19 * 3 = 57\n\\boxed{57}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # 19 | " *" | " 3" | " =" | " 57" | \n | \ | boxed | { | 57 | }
    assert tok.convert_ids_to_tokens(ids) == ["19", " *", " 3", " =", " 57", "\n", "\\", "boxed", "{", "57", "}"]
    assert tok.decode(ids) == text
    # Digits in groups of at most 3; a known word only where the whole word stands, else one token per character.
    pieces = tok.convert_ids_to_tokens(tok("1234 into Wait, 05 is wrong", add_special_tokens=False)["input_ids"])
    assert pieces == ["123", "4", " ", "i", "n", "t", "o", " Wait", ",", " 05", " is", " wrong"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "1 + 1"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\n1 + 1<|end|>\n<|assistant|>\n"
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    # <|user|> \n | 1 " +" " 1" | <|end|> \n | <|assistant|> \n: each special token is one token
    assert len(prompt_ids) == 2 + 3 + 2 + 2
    assert tok.eos_token == "<|end|>" and tok.decode([tok.eos_token_id, *ids], skip_special_tokens=True) == text
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "<unk>"
    every_word = " ".join(WORDS)
    assert tok.decode(tok(every_word, add_special_tokens=False)["input_ids"]) == every_word
    assert len(tok(every_word, add_special_tokens=False)["input_ids"]) == len(WORDS)


def test_rule_synthesis_parses_and_assembles_strictly_into_the_splice():
    rng = random.Random(0)
    user, target = synthesis_example(CHAIN, rng, rule_synthesis)
    assert "Incorrect attempt:" in user and "Compute 12 + 7 * 3 - 5" in user
    synthesis = parse_synthesis(target)
    wrong = user.split("Incorrect attempt:\n")[1].split("\n\nCorrect attempt:")[0]
    trajectory = assemble_trajectory(wrong, synthesis)
    assert trajectory is not None and trajectory.text.strip() == synthesis.reconstruction.strip()
    assert trajectory.parts()[1].strip().startswith("Wait, 19 * 3 = 58 is wrong")
    bad_line = next(i for i, (a, b) in enumerate(zip(wrong.splitlines(), arith.solution(CHAIN).splitlines())) if a != b)
    assert f"step {bad_line + 1}:" in synthesis.analysis


def test_batches_train_on_the_answer_only():
    tok = build_tokenizer()
    batch = _batch(tok, [("1 + 1", "2"), ("1 + 1 + 18", "20")], "cpu")
    labels, ids = batch["labels"], batch["input_ids"]
    assert tok.decode(labels[0][labels[0] != -100]) == "2<|end|>"
    assert tok.decode(labels[1][labels[1] != -100]) == "20<|end|>"
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # the shorter row is padded
    assert (ids[0][batch["attention_mask"][0] == 0] == tok.pad_token_id).all()


def test_pretrained_policy_is_a_cached_hf_folder_keyed_by_its_settings(tmp_path):
    settings = PolicySettings(**TINY)
    folder = pretrained_policy(settings, cache_dir=tmp_path, log=lambda _: None)
    stats = json.loads((folder / "pretrain.json").read_text())
    assert stats["steps"] == 2 and stats["curve"][-1]["step"] == 2 and 0 <= stats["sampled_accuracy"] <= 1
    model, tokenizer = load_model_and_tokenizer(str(folder))
    assert tokenizer.eos_token == "<|end|>" and model.config.num_hidden_layers == 1
    mtime = (folder / "pretrain.json").stat().st_mtime
    assert pretrained_policy(settings, cache_dir=tmp_path) == folder  # cached: not rebuilt
    assert (folder / "pretrain.json").stat().st_mtime == mtime
    assert PolicySettings(**{**TINY, "seed": 1}).key() != settings.key() != settings.key("another.writer")


def test_pretraining_refuses_the_held_out_split(tmp_path):
    import pytest

    from tapo.arith_policy import pretrain

    with pytest.raises(ValueError, match="train split only"):
        pretrain(PolicySettings(**{**TINY, "task": "arith:split=test"}), tmp_path)
    assert torch.is_grad_enabled()
