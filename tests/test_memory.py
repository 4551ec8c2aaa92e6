"""tapo.memory: freed heap memory goes back to the OS at step boundaries, TRL's fused LM head runs in smaller
vocabulary tiles on the CPU without changing the log-probs beyond float rounding, and norms and MLPs keep fewer
activations for the backward without changing outputs or gradients, and long micro-batches alone are checkpointed."""

import copy

import subprocess
import sys
import textwrap

import pytest
import torch
import trl.trainer.utils as trl_utils
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from trl.trainer.utils import add_fused_lm_head

from tapo import memory
from tapo.memory import (
    CPU_LM_HEAD_TILE,
    ReleaseFreedMemory,
    accumulate_tied_head_gradient,
    checkpointing,
    decoder_layers,
    lean_activations,
    score_labelled_positions_only,
    use_small_lm_head_tiles,
)

from scripted import generation_batch
from test_opsd import make_trainer as make_opsd_trainer
from test_trainer import make_trainer

# A fresh process: raise glibc's mmap threshold the way training does (free one 16 MB block), fill the heap with
# 2 MB blocks, free all but the topmost (so the heap cannot shrink from its top), and print RSS before and after.
FRAGMENTED_HEAP = textwrap.dedent("""
    import torch
    from tapo.memory import release_freed_memory

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    del_me = torch.ones(4 * 2**20)  # 16 MB, mmapped; freeing it raises the threshold above 2 MB
    del del_me
    blocks = [torch.ones(2**19) for _ in range(150)]  # 150 x 2 MB, now from the heap
    top = blocks.pop()
    del blocks
    before = rss_mb()
    released = release_freed_memory()
    print(released, before, rss_mb())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux")
def test_release_gives_freed_heap_blocks_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    released, before, after = out.stdout.split()
    assert released == "True"
    assert float(before) - float(after) > 200  # of the ~300 MB freed but held


def test_release_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_freed_memory() is False


def test_trainer_releases_after_generation_and_after_every_step(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("tapo.trainer_base.release_freed_memory", lambda: calls.append("generation"))
    monkeypatch.setattr("tapo.memory.release_freed_memory", lambda: calls.append("step"))
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=2)
    assert sum(isinstance(cb, ReleaseFreedMemory) for cb in trainer.callback_handler.callbacks) == 1
    generation_batch(trainer)
    assert calls == ["generation"]
    calls.clear()
    trainer.train()
    assert calls == ["generation", "step", "generation", "step"]


def test_cpu_trainer_uses_small_lm_head_tiles(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    make_trainer(tiny_model_dir, tmp_path)
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == CPU_LM_HEAD_TILE == 8192


def test_small_tiles_refuse_a_trl_without_the_setting(monkeypatch):
    monkeypatch.delattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE")
    with pytest.raises(RuntimeError, match="_CHUNKED_LOGPROB_CHUNK_SIZE is gone"):
        use_small_lm_head_tiles()


def test_tiles_change_log_probs_and_entropies_only_in_rounding(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100

    def scored(tile):
        monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", tile)
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), model.lm_head.weight.grad.clone()

    whole, tiled = scored(32768), scored(vocab // 4 + 1)  # one tile vs 4 tiles, the last one shorter
    for a, b in zip(whole, tiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert whole[0].abs().sum() > 0


def test_cpu_trainer_scores_labelled_positions_only(tiny_model_dir, tmp_path, monkeypatch):
    def triton_only(device):
        return device.type == "cuda"

    monkeypatch.setattr(trl_utils, "_use_triton", triton_only)
    make_trainer(tiny_model_dir, tmp_path)
    compact = trl_utils._use_triton
    assert compact(torch.device("cpu")) and compact(torch.device("cuda")) and not compact(torch.device("meta"))
    score_labelled_positions_only()
    assert trl_utils._use_triton is compact  # not wrapped twice


def test_labelled_positions_only_refuse_a_trl_without_the_switch(monkeypatch):
    monkeypatch.delattr(trl_utils, "_use_triton")
    with pytest.raises(RuntimeError, match="_use_triton is gone"):
        score_labelled_positions_only()


def test_labelled_positions_only_give_the_same_log_probs_and_gradients(tiny_model_dir, monkeypatch):
    """TRL's CPU path projects all 12 positions, 4 of them without a label; the compact one only the 8 labelled:
    the same numbers where a label is (and 0 elsewhere), the same LM-head gradient."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    projected = []  # rows the head projects, per call
    function = trl_utils._ChunkedLogProbFunction

    class Recording:
        @staticmethod
        def apply(hidden, *args):
            projected.append(hidden.shape[0])
            return function.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Recording)

    def scored(compact):
        monkeypatch.setattr(trl_utils, "_use_triton", lambda device: compact)
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), model.lm_head.weight.grad.clone()

    every, compact = scored(False), scored(True)
    assert projected == [2 * 11, 2 * 8]  # shifted: 11 positions predict a next token, 8 of them a labelled one
    for a, b in zip(every, compact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert every[0].abs().sum() > 0 and (every[0][:, :3] == 0).all()


def _two_micro_batches(model, seen_before_embedding_backward):
    """Gradients of two accumulated micro-batches through TRL's fused head; for each backward, whether the tied
    weight's `.grad` already held something when the embedding's backward began."""
    embedding = model.get_input_embeddings()

    def watch(module, args, out):  # the gradient reaching the embedding's output: its backward is next
        out.register_hook(lambda grad: seen_before_embedding_backward.append(embedding.weight.grad is not None))

    handle = embedding.register_forward_hook(watch)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=generator)
        labels = ids.clone()
        labels[:, :3] = -100
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
    handle.remove()
    return {name: p.grad for name, p in model.named_parameters()}


def test_tied_head_gradient_goes_into_grad_at_once(tiny_model_dir):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # the tiny model ties them, as SmolLM2 does
    tied = copy.deepcopy(plain)
    assert accumulate_tied_head_gradient(tied)
    assert tied.model.embed_tokens.sparse and trl_utils._ChunkedLogProbFunction.__name__ == "_HeadIntoGrad"
    for model in (plain, tied):
        add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    plain_seen, tied_seen = [], []
    expected, grads = _two_micro_batches(plain, plain_seen), _two_micro_batches(tied, tied_seen)
    # Autograd held the head's gradient until the embedding's arrived (no .grad in the first backward); now it is in
    # .grad before the embedding's backward of every micro-batch.
    assert plain_seen == [False, True] and tied_seen == [True, True]
    assert expected.keys() == grads.keys()
    for name, grad in grads.items():
        assert not grad.is_sparse, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)


def test_untied_head_is_left_alone():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=False))
    assert not accumulate_tied_head_gradient(model)
    assert not model.model.embed_tokens.sparse and not hasattr(model.lm_head.weight, "_tapo_grad_at_once")


def test_cpu_trainer_accumulates_the_tied_head_gradient_at_once(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    assert trainer.model.lm_head.weight._tapo_grad_at_once and trainer.model.model.embed_tokens.sparse


@pytest.mark.parametrize("algorithm", ["tapo", "opsd"])
def test_grpo_backward_before_the_next_forward_gives_the_same_gradient(tiny_model_dir, tmp_path, monkeypatch, algorithm):
    """L_GRPO is backpropagated before L_ref's (TAPO) or the student's and teacher's (OPSD) forwards."""
    make = make_trainer if algorithm == "tapo" else make_opsd_trainer
    trainer = make(tiny_model_dir, tmp_path, loss_type="dapo")
    batch = generation_batch(trainer)
    if algorithm == "tapo":
        assert int(batch["constructed_rows"].sum()) > 0  # L_ref is in this micro-batch
    else:
        assert bool(batch["opsd_mask_rows"].any())
    backward = trainer.accelerator.backward
    calls = []
    monkeypatch.setattr(trainer.accelerator, "backward", lambda loss, **kw: (calls.append(1), backward(loss, **kw)))

    def step():
        """What Trainer.training_step does with a prepared micro-batch: the loss, its backward, the gradient."""
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        trainer.accelerator.backward(loss)
        return loss.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters()])

    split_loss, split_grad = step()
    assert len(calls) == 2  # L_GRPO's backward, then the returned loss's (L_ref or L_OPSD only)
    calls.clear()
    monkeypatch.setattr(trainer, "_backward_first", lambda loss, inputs, **parts: loss)
    joint_loss, joint_grad = step()
    assert len(calls) == 1
    torch.testing.assert_close(split_loss, joint_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split_grad, joint_grad, rtol=1e-5, atol=1e-7)
    assert joint_grad.norm() > 0


def test_backward_first_backpropagates_only_a_training_loss_that_has_a_gradient(tiny_model_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    calls = []
    monkeypatch.setattr(trainer.accelerator, "backward", lambda loss, **kw: calls.append(loss))
    weight = torch.ones(2, requires_grad=True)
    inputs = {"advantages": torch.zeros(2)}
    loss = (2 * weight).sum()
    trainer.model.eval()  # evaluation: the loss is returned as it is, nothing is backpropagated
    assert trainer._backward_first(loss, inputs, L_GRPO=loss) is loss and calls == []
    trainer.model.train()
    constant = torch.tensor(3.0)  # no gradient to take
    assert trainer._backward_first(constant, inputs, L_GRPO=constant) is constant and calls == []
    with torch.no_grad():
        assert trainer._backward_first(loss, inputs, L_GRPO=loss) is loss and calls == []
    out = trainer._backward_first(loss, inputs, L_GRPO=loss)
    assert calls == [loss] and not out.requires_grad and out.item() == loss.item()


def small_model(kind: str, layers: int = 2):
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    config = config_cls(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return model_cls(config)


def loss_and_gradients(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_activations_give_the_same_outputs_and_gradients(kind, checkpointing, autocast):
    plain = small_model(kind)
    lean = copy.deepcopy(plain)
    assert lean_activations(lean) == 2 * 2 + 2 + 1  # 2 layers x 2 norms, 2 MLPs, the final norm
    assert lean_activations(lean) == 0  # already lean
    if checkpointing:  # HF's layer checkpointing recomputes the lean modules inside its own recomputation
        for m in (plain, lean):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # mixed precision: bf16 GEMMs, fp32 weights
        logits, grads = loss_and_gradients(plain, ids)
        lean_logits, lean_grads = loss_and_gradients(lean, ids)
    assert logits.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(logits, lean_logits)
    for a, b in zip(grads, lean_grads, strict=True):  # the same ops in the same order: bit-identical here
        assert torch.equal(a, b)
    assert all(g.abs().sum() > 0 for g in lean_grads)
    with torch.no_grad():  # generation: the plain path
        assert torch.equal(plain(ids).logits, lean(ids).logits)


def test_a_deep_copy_of_a_lean_model_trains_its_own_weights():
    lean = small_model("llama")
    lean_activations(lean)
    twin = copy.deepcopy(lean)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    twin(ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in lean.parameters())
    assert all(p.grad is not None for p in twin.parameters())
    plain = small_model("llama")
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(1.5)
        assert torch.equal(twin(ids).logits, plain(ids).logits)


def live_bytes_after_forward(model, ids) -> int:
    """Bytes allocated and not freed during a forward with autograd on: what the backward will hold."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        hidden = model.model(ids).last_hidden_state
    assert hidden.requires_grad
    return sum(e.self_cpu_memory_usage for e in prof.key_averages())


def test_lean_activations_keep_a_third_fewer_bytes_for_the_backward():
    """SmolLM2's shape ratios (intermediate = 8/3 hidden): per token and layer the norms keep their input (not also
    the normalized copy) and the MLP keeps gate and up (not also silu(gate) and the product): 11.6k -> 7.2k floats on
    SmolLM2."""
    config = LlamaConfig(vocab_size=300, hidden_size=144, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config)
    lean = copy.deepcopy(plain)
    lean_activations(lean)
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(1))
    before, after = live_bytes_after_forward(plain, ids), live_bytes_after_forward(lean, ids)
    saved_floats = (before - after) / 4 / 64  # per token
    # per layer 2 normalized copies, silu(gate) and the product; and the final norm's normalized copy
    assert saved_floats == pytest.approx(2 * (2 * 144 + 2 * 384) + 144, rel=0.01)
    assert after < 0.7 * before


class SwappedMLP(torch.nn.Module):
    """Has the parts of a gated MLP, but gates the other projection: must be left as it is."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 16, bias=False)
        self.down_proj, self.act_fn = torch.nn.Linear(16, 8, bias=False), torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_lean_activations_leave_other_modules_alone():
    assert lean_activations(SwappedMLP()) == 0
    model = small_model("llama", layers=1)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]))
    assert lean_activations(peft_model) == 2 + 1  # the norms only: the MLP's projections are LoRA layers now
    assert not getattr(model.model.layers[0].mlp, "_tapo_lean", False)


def test_cpu_trainer_uses_lean_activations(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    layer = trainer.model.model.layers[0]
    assert layer.mlp._tapo_lean and layer.input_layernorm._tapo_lean and trainer.model.model.norm._tapo_lean


def test_checkpointing_keeps_only_layer_inputs_and_gives_the_same_gradients():
    plain = small_model("llama")
    layers = decoder_layers(plain)
    assert len(layers) == 2
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    logits, grads = loss_and_gradients(plain, ids)
    with checkpointing(layers):
        assert all(layer.gradient_checkpointing for layer in layers)
        out = plain(ids, labels=ids)
    assert not any(layer.gradient_checkpointing for layer in layers)  # off again once the block ends
    plain.zero_grad(set_to_none=True)
    out.loss.backward()  # after the block: recomputed as recorded at the forward
    assert torch.equal(out.logits.detach(), logits)
    for a, p in zip(grads, plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=1e-6)
    kept = live_bytes_after_forward(plain, ids)
    with checkpointing(layers):
        assert live_bytes_after_forward(plain, ids) < 0.5 * kept
    with checkpointing(layers, enabled=False):
        assert not any(layer.gradient_checkpointing for layer in layers)


def test_checkpointing_leaves_layers_that_checkpoint_already_on():
    model = small_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    with checkpointing(layers):
        pass
    assert all(layer.gradient_checkpointing for layer in layers)


def forwards_with_their_checkpointing(trainer) -> list:
    """(token positions, checkpointed) of every forward with autograd on that reaches the first decoder layer."""
    seen = []

    def record(layer, args, kwargs):
        if torch.is_grad_enabled():
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append((hidden.shape[0] * hidden.shape[1], layer.gradient_checkpointing))

    trainer._layers[0].register_forward_pre_hook(record, with_kwargs=True)
    return seen


@pytest.mark.parametrize("algorithm", ["tapo", "opsd"])
def test_only_long_micro_batches_are_checkpointed_with_the_same_gradient(tiny_model_dir, tmp_path, algorithm):
    """With the threshold at the longest training forward, only the forwards that long are checkpointed (TAPO: the
    constructed rows, longer than the original ones; OPSD: the GRPO and the student forwards, as long here), and the
    gradient is unchanged. One position more and nothing is."""
    make = make_trainer if algorithm == "tapo" else make_opsd_trainer

    def gradient(min_tokens):
        trainer = make(tiny_model_dir, tmp_path, activation_checkpointing_min_tokens=min_tokens)
        seen = forwards_with_their_checkpointing(trainer)
        batch = generation_batch(trainer)
        trainer.model.zero_grad()
        trainer.accelerator.backward(trainer.compute_loss(trainer.model, batch))
        return seen, torch.cat([p.grad.flatten() for p in trainer.model.parameters()])

    seen, grad = gradient(0)
    assert len(seen) >= 2 and not any(flag for _, flag in seen)
    longest = max(positions for positions, _ in seen)
    assert any(positions < longest for positions, _ in seen) == (algorithm == "tapo"), seen
    seen_long, grad_long = gradient(longest)
    assert seen_long == [(positions, positions >= longest) for positions, _ in seen]
    torch.testing.assert_close(grad_long, grad, rtol=1e-5, atol=1e-7)
    assert grad.norm() > 0
    seen_none, _ = gradient(longest + 1)
    assert seen_none == seen


def test_checkpointing_threshold_is_checked(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="activation_checkpointing_min_tokens=-1"):
        make_trainer(tiny_model_dir, tmp_path, activation_checkpointing_min_tokens=-1)
    monkeypatch.setattr("tapo.trainer_base.decoder_layers", lambda model: [])
    with pytest.raises(ValueError, match="no transformers decoder layers"):
        make_trainer(tiny_model_dir, tmp_path, activation_checkpointing_min_tokens=100)
