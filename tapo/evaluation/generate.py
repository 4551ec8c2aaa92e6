"""Sampling backends. Each turns a batch of prompts (token ids) into completions: text, length, truncation.

Determinism across resumes: the runner fixes which (problem, sample) pairs share a batch and derives a seed per batch
and per sample from (seed, benchmark, index) alone. transformers samples a batch from the global torch generator,
reseeded per batch; vLLM seeds every request on its own. Either way a batch re-run after a crash gives the same text.
"""

import copy
import importlib.util
from dataclasses import dataclass
from typing import Protocol

import torch

from tapo.data import PROMPT_TEMPLATE
from tapo.evaluation.errors import EvalConfigError
from tapo.models import load_model_and_tokenizer, resolve_model

BACKENDS = ("auto", "transformers", "vllm")


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int  # generated tokens, EOS included
    truncated: bool  # stopped by max_tokens, not by EOS


class Sampler(Protocol):
    tokenizer: object

    def generate(self, prompts: list[list[int]], batch_seed: int, sample_seeds: list[int]) -> list[Completion]: ...


def resolve_backend(backend: str) -> str:
    """auto -> vllm when it is installed and a CUDA GPU is present, else transformers."""
    if backend not in BACKENDS:
        raise EvalConfigError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    vllm_usable = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if backend == "auto":
        return "vllm" if vllm_usable else "transformers"
    if backend == "vllm" and not vllm_usable:
        raise EvalConfigError("backend 'vllm' needs the vllm package and a CUDA GPU; use --backend transformers")
    return backend


def prompt_ids(tokenizer, problem: str) -> list[int]:
    """The problem in training's prompt (tapo.data.PROMPT_TEMPLATE) as the user turn of the model's chat template
    (plain text if it has none), as token ids."""
    return user_turn_ids(tokenizer, PROMPT_TEMPLATE.replace("{problem}", problem))


def user_turn_ids(tokenizer, content: str) -> list[int]:
    """`content` as the user turn of the model's chat template (plain text if it has none), as token ids, ready for
    the assistant's answer. A templated text already holds its special tokens, so it is encoded without adding them a
    second time."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(content)["input_ids"]


def load_sampler(model: str, backend: str, max_tokens: int, temperature: float, top_p: float, seed: int) -> Sampler:
    if backend == "vllm":
        return VLLMSampler(resolve_model(model), max_tokens, temperature, top_p, seed)
    hf_model, tokenizer = load_model_and_tokenizer(model)
    if torch.cuda.is_available():
        hf_model.to("cuda")
    return TransformersSampler(hf_model.eval(), tokenizer, max_tokens, temperature, top_p)


class TransformersSampler:
    """Batched sampling with left padding (so every row's prompt ends where generation starts). The tokenizer has a
    pad token: load_model_and_tokenizer falls back to EOS."""

    def __init__(self, model, tokenizer, max_tokens: int, temperature: float, top_p: float):
        self.model, self.tokenizer = model, tokenizer
        self.config = copy.deepcopy(model.generation_config)
        # top_k=0 switches off the top-k filter a model's generation_config may carry: only temperature/top_p apply.
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            if temperature > 0
            else dict(do_sample=False)
        )
        self.config.update(max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        eos = self.config.eos_token_id if self.config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], batch_seed: int, sample_seeds: list[int]) -> list[Completion]:
        torch.manual_seed(batch_seed)
        batch = self.tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        batch = batch.to(self.model.device)
        output = self.model.generate(**batch, generation_config=self.config)
        return [self.completion(row) for row in output[:, batch["input_ids"].shape[1] :].tolist()]

    def completion(self, ids: list[int]) -> Completion:
        # generate() stops only when every row has ended, so rows that ended early are padded after their EOS.
        end = next((i for i, token in enumerate(ids) if token in self.eos_ids), None)
        kept = ids if end is None else ids[: end + 1]
        return Completion(self.tokenizer.decode(kept, skip_special_tokens=True), len(kept), truncated=end is None)


class VLLMSampler:
    """vLLM's offline LLM.generate with one request per sample, each with its own SamplingParams seed."""

    def __init__(self, model_path: str, max_tokens: int, temperature: float, top_p: float, seed: int):
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=model_path, seed=seed)
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling_params = SamplingParams
        self.settings = dict(n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens)

    def generate(self, prompts: list[list[int]], batch_seed: int, sample_seeds: list[int]) -> list[Completion]:
        requests = [{"prompt_token_ids": ids} for ids in prompts]
        params = [self.sampling_params(seed=seed, **self.settings) for seed in sample_seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            Completion(out.text, len(out.token_ids), truncated=out.finish_reason == "length")
            for out in (request.outputs[0] for request in outputs)
        ]
