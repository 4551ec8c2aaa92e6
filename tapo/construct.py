"""Building micro-reflective trajectories from (wrong, correct) rollout pairs: the glue between DCS and the trainer.

Three constructors share one contract, `construct(requests, ...) -> list[Construction]`:
- "splice": deterministic, no model (`tapo.core.splice.splice_trajectory`). Works at any model size.
- "self": the policy writes the synthesis (the paper's method); the trainer passes its own generation function so the
  synthesis goes through the same backend as the rollouts (transformers or vLLM).
- "teacher": another model writes it: a local HF model (`HFGenerator`) or an OpenAI-compatible endpoint
  (`OpenAIChatGenerator`).
Generators are plain callables `list[str] -> list[str]` (user message in, assistant text out) so they are easy to fake
in tests and to swap. A generator that can tell marks an output that stopped at its token budget as `Truncated` (a
`str`), which the trainer counts as `tapo/synthesis_truncated`.

Every constructor takes the same `cut` (where the prefix ends) and, on the assembled trajectory, the same ablation
`control` (`tapo.core.trajectory.ablate_trajectory`); the model-written ones assemble with `prefix_match`. Each
construction says why it has no trajectory (`rejection`, one of `tapo.core.synthesis.REJECTIONS`); a splice that finds
no checkable first error counts as `unparsed`, as the parse rate counts it.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tapo.core.splice import splice_trajectory
from tapo.core.synthesis import UNPARSED, Assembly, assemble_output, build_synthesis_prompt
from tapo.core.trajectory import CONTROLS, Trajectory, ablate_trajectory

CONSTRUCTORS = ("self", "splice", "teacher")
CONSTRUCTION_CONTROLS = ("none", *CONTROLS)  # "none": train the construction as built

Generator = Callable[[list[str]], list[str]]


class Truncated(str):
    """A generator's output that stopped at its token budget (plain `str`: it finished, or the generator cannot tell)."""


class ConstructionError(RuntimeError):
    """A construction step raised on some rank; raised on every rank alike, so that none waits in a collective."""


@dataclass(frozen=True)
class ConstructionRequest:
    """One DCS pair: an incorrect rollout to repair, with a correct sibling as the reference."""

    problem: str
    wrong: str
    reference: str
    gold: str | None = None


@dataclass(frozen=True)
class Construction:
    """Outcome of one request. `trajectory` is None when the synthesis did not parse or could not be assembled, and
    then `rejection` says why."""

    trajectory: Trajectory | None
    parsed: bool
    raw: str | None = None  # the synthesis text the model wrote (None for "splice")
    rejection: str | None = None  # one of tapo.core.synthesis.REJECTIONS, set exactly when trajectory is None
    truncated: bool = False  # the synthesis stopped at the generator's token budget


def _finish(assembly: Assembly, request: ConstructionRequest, control: str, **fields) -> Construction:
    """The Construction of an assembly, its trajectory rewritten by the ablation `control` ("none": as built)."""
    trajectory = assembly.trajectory
    if trajectory is not None and control != "none":
        trajectory = ablate_trajectory(trajectory, request.reference, control)
    return Construction(trajectory, rejection=assembly.rejection, **fields)


def construct(requests: Sequence[ConstructionRequest], constructor: str, generate: Generator | None = None, *,
              cut: str = "before_error", prefix_match: str = "strict", control: str = "none") -> list[Construction]:
    """Build one construction per request. Generation (if any) is one batched call, so the backend can batch it; it is
    made even with no requests, because the trainer's "self" generator is a collective every rank enters each round.

    cut: where the prefix ends (`tapo.core.trajectory.CUTS`), for the splice, the synthesis prompt and its assembly;
    prefix_match: how a synthesis's copy must match (`tapo.core.synthesis`); control: "none" or one of
    `tapo.core.trajectory.CONTROLS`, applied to every assembled trajectory. Blank rollouts must not be requested
    (`build_synthesis_prompt` raises on them): callers leave them out of pairing."""
    if constructor not in CONSTRUCTORS:
        raise ValueError(f"unknown constructor {constructor!r}; choose one of {CONSTRUCTORS}")
    if control not in CONSTRUCTION_CONTROLS:
        raise ValueError(f"unknown control {control!r}; choose one of {CONSTRUCTION_CONTROLS}")
    if constructor == "splice":
        out = []
        for r in requests:
            trajectory = splice_trajectory(r.wrong, r.reference, r.gold, cut=cut)
            assembly = Assembly(trajectory, None if trajectory is not None else UNPARSED)
            out.append(_finish(assembly, r, control, parsed=trajectory is not None))
        return out
    if generate is None:
        raise ValueError(f"constructor {constructor!r} needs a generation function")
    texts = generate([build_synthesis_prompt(r.problem, r.wrong, r.reference, cut=cut) for r in requests])
    out = []
    for r, text in zip(requests, texts, strict=True):
        assembly = assemble_output(r.wrong, text, prefix_match=prefix_match, cut=cut)
        out.append(_finish(assembly, r, control, parsed=assembly.rejection != UNPARSED, raw=text,
                           truncated=isinstance(text, Truncated)))
    return out


class HFGenerator:
    """A local transformers model as a synthesis writer (constructor="teacher" with a model path).

    It generates on `device` (default: the first GPU when there is one, else the CPU) in `dtype` (default: the
    checkpoint's). The trainer passes its process's accelerator device and the policy's dtype, so under a multi-process
    launch every process holds its own copy of the teacher on its own GPU: budget one teacher per process.
    """

    def __init__(self, model_name_or_path: str, max_new_tokens: int = 1024, temperature: float = 0.7, batch_size: int = 8,
                 device=None, dtype=None):
        import torch

        from tapo.models import load_model_and_tokenizer

        self.model, self.tokenizer = load_model_and_tokenizer(model_name_or_path, dtype=dtype)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        self.model.requires_grad_(False)  # inference only: no optimizer ever sees it, and no grad buffers are kept
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size

    def __call__(self, messages: list[str]) -> list[str]:
        import torch

        out: list[str] = []
        for start in range(0, len(messages), self.batch_size):
            chunk = messages[start : start + self.batch_size]
            texts = [
                self.tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
                for m in chunk
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            with torch.no_grad():
                ids = self.model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=self.temperature > 0,
                    temperature=self.temperature if self.temperature > 0 else None,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            generated = ids[:, enc["input_ids"].shape[1] :]
            stops = self.model.generation_config.eos_token_id
            stops = torch.tensor([stops] if isinstance(stops, int) else list(stops or [self.tokenizer.eos_token_id]))
            # No stop token among the new ids: the row ran to max_new_tokens.
            finished = torch.isin(generated.cpu(), stops).any(dim=1).tolist()
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            out += [text if done else Truncated(text) for text, done in zip(texts, finished, strict=True)]
        return out


class OpenAIChatGenerator:
    """An OpenAI-compatible chat endpoint (vLLM serve, SGLang, a hosted API) as a synthesis writer.

    Plain urllib so the dependency stays optional; requests run one after another (endpoints batch on their side).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_tokens: int = 1024,
                 temperature: float = 0.7, timeout_s: float = 120.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, os.environ.get(api_key_env, "")
        self.max_tokens, self.temperature, self.timeout_s = max_tokens, temperature, timeout_s

    def __call__(self, messages: list[str]) -> list[str]:
        return [self._one(m) for m in messages]

    def _one(self, message: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": message}],
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                choice = json.load(resp)["choices"][0]
            text = choice["message"]["content"] or ""
            return Truncated(text) if choice.get("finish_reason") == "length" else text
        except (OSError, KeyError, IndexError, ValueError) as err:
            # A failed request is a failed construction (counted as unparsed), not a crashed training run.
            return f"[teacher request failed: {err}]"
