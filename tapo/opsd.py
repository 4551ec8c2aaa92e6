"""OPSD (on-policy self-distillation): the baseline arm `tapo train --algorithm opsd`.

The student samples rollouts on-policy through TRL's normal GRPO path. The teacher is the SAME model (same weights,
current step) conditioned on privileged context: the prompt with a correct reference solution in front of it. On the
student's own completion tokens y_t the loss is a per-token divergence between the two next-token distributions

    p_S(.|t) = softmax(z_S / T)   student: context x, y_<t
    p_T(.|t) = softmax(z_T / T)   teacher: context (reference, x), y_<t, no gradient
    L_OPSD   = sum_{rows, t} mask_t * D(p_T, p_S)_t / N        N = completion tokens of the generation batch

with T the sampling temperature and D one of (`token_divergence`, full vocabulary):
    forward_kl  KL(p_T || p_S) = sum_v p_T,v (log p_T,v - log p_S,v)
    reverse_kl  KL(p_S || p_T) = sum_v p_S,v (log p_S,v - log p_T,v)
    jsd         beta * KL(p_T || M) + (1 - beta) * KL(p_S || M),  M = beta * p_T + (1 - beta) * p_S
N is normalized across micro-batches and processes like TRL's "dapo" loss, so the sum over one generation batch is
the token mean. The total loss is L_GRPO + opsd_weight * L_OPSD, or opsd_weight * L_OPSD alone with
`opsd_include_grpo=False` (pure distillation; rewards are still computed, to pick correct siblings and for logs).

Privileged context per rollout (`choose_reference`), first available in the order set by `opsd_reference`:
  sibling   a correct rollout of the same group (uniformly at random; never the rollout itself, which would let the
            teacher copy the very tokens it scores),
  solution  the dataset's gold worked `solution` column,
  answer    only the gold answer ("The final answer is \\boxed{a}."): weaker, but every verifiable dataset has it.
A rollout with none of them gets no OPSD term. The reference goes before the problem (`TEACHER_TEMPLATE`), so the
teacher prompt ends exactly like the student's and the completion continues both the same way.

How it plugs into TRL, as TAPOTrainer does: `_generate_and_score_completions` stores the tokenized teacher prompts as
`opsd_*` columns with TRL's batch dimension (shuffling and `steps_per_generation` buffering keep working), and
`_compute_loss` adds the divergence. Teacher logits are computed at loss time, from the current weights, so nothing of
size vocab is buffered. Full logits are needed (TRL's fused LM head returns only the label log-probs): the model is
called without `fused_lm_head`, which TRL's patch passes straight to the original forward, keeping only the
completion positions (`logits_to_keep`). This costs one extra forward with gradient (student) and one without
(teacher) per micro-batch on top of GRPO's, and (rows, completion length, vocab) floats of activations.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from accelerate.utils import gather
from trl.trainer.utils import pad

from tapo.config import TAPOConfig
from tapo.trainer import TAPOTrainer

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REFERENCE_SOURCES = ("sibling", "solution", "answer")
# opsd_reference -> the sources tried, in order: the chosen one and those after it.
REFERENCE_ORDER = {source: REFERENCE_SOURCES[i:] for i, source in enumerate(REFERENCE_SOURCES)}
TEACHER_TEMPLATE = "Here is a reference solution to the problem below:\n{reference}\n\nNow solve the problem yourself.\n\n{prompt}"
ANSWER_REFERENCE = "The final answer is \\boxed{{{answer}}}."


@dataclass
class OPSDConfig(TAPOConfig):
    """TAPOConfig plus the OPSD knobs (`tapo train --algorithm opsd`)."""

    opsd_divergence: str = field(
        default="reverse_kl",
        metadata={"help": "OPSD per-token divergence: 'reverse_kl' KL(student||teacher), 'forward_kl' "
                  "KL(teacher||student) or 'jsd' (beta-mixture, opsd_jsd_beta)."},
    )
    opsd_jsd_beta: float = field(default=0.5, metadata={"help": "OPSD jsd: teacher weight beta in (0, 1) of the mixture."})
    opsd_weight: float = field(default=1.0, metadata={"help": "OPSD: L = L_GRPO + opsd_weight * L_OPSD."})
    opsd_include_grpo: bool = field(
        default=True, metadata={"help": "OPSD: False drops the GRPO term (pure self-distillation, L = opsd_weight * L_OPSD)."}
    )
    opsd_reference: str = field(
        default="sibling",
        metadata={"help": "OPSD teacher's privileged context, first choice: 'sibling' (a correct rollout of the same "
                  "group), 'solution' (the dataset's gold solution) or 'answer' (the gold answer); falls back in "
                  "that order."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.opsd_divergence not in DIVERGENCES:
            raise ValueError(f"opsd_divergence={self.opsd_divergence!r}: choose one of {DIVERGENCES}")
        if self.opsd_divergence == "jsd" and not 0.0 < self.opsd_jsd_beta < 1.0:
            raise ValueError(f"opsd_jsd_beta={self.opsd_jsd_beta}: must lie strictly between 0 and 1")
        if self.opsd_reference not in REFERENCE_SOURCES:
            raise ValueError(f"opsd_reference={self.opsd_reference!r}: choose one of {REFERENCE_SOURCES}")
        if not self.opsd_include_grpo and self.opsd_weight == 0:
            raise ValueError("opsd_include_grpo=False with opsd_weight=0 leaves no loss")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, from log-probabilities: sum_v p_v (log p_v - log q_v) (0 log 0 = 0)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "reverse_kl",
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence D(p_T, p_S) (formulas in the module docstring), 0 where `mask` is 0.

    student_logits, teacher_logits: (..., V) logits already divided by the temperature; mask: (...). Computed in
    float32. Gradients flow into whichever input requires them: the trainer passes detached teacher logits.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence kind {kind!r}: choose one of {DIVERGENCES}")
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != mask.shape:
        raise ValueError(f"shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}, "
                         f"mask {tuple(mask.shape)}")
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    if kind == "forward_kl":
        per_token = _kl(log_t, log_s)
    elif kind == "reverse_kl":
        per_token = _kl(log_s, log_t)
    else:
        if not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"jsd_beta={jsd_beta}: must lie strictly between 0 and 1")
        log_m = torch.logsumexp(torch.stack([log_t + math.log(jsd_beta), log_s + math.log(1.0 - jsd_beta)]), dim=0)
        per_token = jsd_beta * _kl(log_t, log_m) + (1.0 - jsd_beta) * _kl(log_s, log_m)
    return torch.where(mask.bool(), per_token, torch.zeros_like(per_token))


def choose_reference(
    index: int,
    correct: Sequence[bool],
    texts: Sequence[str],
    solution: str | None,
    answer: str | None,
    order: Sequence[str] = REFERENCE_SOURCES,
    rng: random.Random | None = None,
) -> tuple[str | None, str | None]:
    """(source, reference text) for rollout `index` of a group with per-rollout `correct` flags and `texts`, or
    (None, None). Sources are tried in `order`; a sibling is drawn uniformly (with `rng`) among the OTHER correct
    rollouts; empty solutions/answers count as missing."""
    for source in order:
        if source == "sibling":
            others = [j for j, ok in enumerate(correct) if ok and j != index and texts[j].strip()]
            if others:
                return source, texts[(rng or random).choice(others)]
        elif source == "solution" and solution is not None and str(solution).strip():
            return source, str(solution)
        elif source == "answer" and answer is not None and str(answer).strip():
            return source, ANSWER_REFERENCE.format(answer=str(answer).strip())
    return None, None


def teacher_prompt(prompt, reference: str, template: str = TEACHER_TEMPLATE):
    """The student's prompt (a string, or chat messages whose last user message is rewritten) with the reference."""
    if isinstance(prompt, str):
        return template.format(reference=reference.strip(), prompt=prompt)
    last_user = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    content = template.format(reference=reference.strip(), prompt=prompt[last_user]["content"])
    return [*prompt[:last_user], {**prompt[last_user], "content": content}, *prompt[last_user + 1 :]]


class OPSDTrainer(TAPOTrainer):
    """TAPOTrainer (GRPO when `tapo_enabled=False`, as `--algorithm opsd` sets) plus the OPSD distillation term."""

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "opsd"]

    @property
    def methods(self) -> list[str]:
        return ["TAPO", "OPSD"] if self.args.tapo_enabled else ["OPSD"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args  # option values are checked by OPSDConfig; the combination with TAPO (which `tapo train
        # --algorithm opsd` switches off after parsing) is checked here
        if not a.opsd_include_grpo and a.tapo_enabled:
            raise ValueError("opsd_include_grpo=False (pure distillation) cannot be combined with tapo_enabled=True")

    # ----------------------------------------------------------------------------------------------------------------
    # Generation side

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self._attach_teacher_prompts(output)
        return output

    def _attach_teacher_prompts(self, output: dict) -> None:
        """`opsd_teacher_prompt_ids/_mask` (left-padded), `opsd_mask_rows` (row has a reference), `opsd_num_items`."""
        a, device, mode = self.args, self.accelerator.device, self._mode()
        k = self.num_generations if mode == "train" else self.num_generations_eval
        batch = self._scored_batch()
        inputs, prompts, n_local = batch.inputs, batch.prompts, len(batch.prompts)
        correct = batch.correct.tolist()  # gathered: whole batch

        sources, teacher_prompts = [], []
        for row in range(n_local):
            global_row = batch.offset + row
            start = global_row - global_row % k  # a group's K rollouts are consecutive (TRL's RepeatSampler)
            # The generation index (TRL's micro-step counter, restored on resume, over micro-steps per generation):
            # reproducible draws that do not depend on how the generation batch is split into micro-batches.
            generation = self._step // (a.steps_per_generation * self.num_iterations)
            rng = random.Random(f"{a.seed}-opsd-{generation}-{global_row}")
            source, reference = choose_reference(global_row - start, correct[start : start + k],
                                                 batch.all_texts[start : start + k], inputs[row].get("solution"),
                                                 inputs[row].get("answer"), REFERENCE_ORDER[a.opsd_reference], rng)
            sources.append(source)
            # A row without a reference keeps its own prompt as a placeholder; opsd_mask_rows masks it out.
            teacher_prompts.append(prompts[row] if reference is None else teacher_prompt(prompts[row], reference))
        prompt_ids, _, _ = self._tokenize_prompts(teacher_prompts)  # exactly as TRL tokenizes the student prompts

        ids = [torch.tensor(p) for p in prompt_ids]
        output["opsd_teacher_prompt_ids"] = pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        output["opsd_teacher_prompt_mask"] = pad([torch.ones_like(t) for t in ids], padding_value=0,
                                                 padding_side="left").to(device)
        output["opsd_mask_rows"] = torch.tensor([s is not None for s in sources], device=device)
        output["opsd_num_items"] = gather(self._opsd_token_mask(output).sum()).sum()

        counts = torch.tensor([sources.count(s) for s in REFERENCE_SOURCES] + [n_local, sum(map(len, ids))],
                              dtype=torch.float32, device=device)
        *by_source, n_rows, n_tokens = gather(counts).view(-1, len(counts)).sum(0).tolist()
        for source, count in zip(REFERENCE_SOURCES, by_source, strict=True):
            self._metrics[mode][f"opsd/reference_{source}_frac"].append(count / n_rows)
        self._metrics[mode]["opsd/teacher_prompt_tokens"].append(n_tokens / n_rows)

    @staticmethod
    def _opsd_token_mask(inputs: dict) -> torch.Tensor:
        """The student's own sampled tokens (TRL's loss mask: completion minus tool output) on rows with a teacher."""
        mask = inputs["completion_mask"] * inputs["opsd_mask_rows"].unsqueeze(1)
        return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask

    # ----------------------------------------------------------------------------------------------------------------
    # Loss side

    def _compute_loss(self, model, inputs):
        a, mode = self.args, self._mode()
        grpo_loss = super()._compute_loss(model, inputs) if a.opsd_include_grpo else None
        if a.opsd_weight == 0 or "opsd_mask_rows" not in inputs:
            return grpo_loss
        if grpo_loss is not None:  # its backward before the student's and teacher's forwards: one at a time in memory
            grpo_loss = self._backward_first(grpo_loss, inputs, L_GRPO=grpo_loss)
        opsd_loss = self._opsd_loss(model, inputs)
        self._metrics[mode]["opsd/loss"].append(opsd_loss.item())
        if grpo_loss is None:
            return self._checked_finite(a.opsd_weight * opsd_loss, inputs, L_OPSD=opsd_loss)
        self._metrics[mode]["opsd/loss_grpo"].append(grpo_loss.item())
        return self._checked_finite(grpo_loss + a.opsd_weight * opsd_loss, inputs, L_GRPO=grpo_loss, L_OPSD=opsd_loss)

    def _opsd_loss(self, model, inputs) -> torch.Tensor:
        """sum(mask * D) / normalizer on this micro-batch; logs the token-mean divergence in nats."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = self._opsd_token_mask(inputs)
        student = self._completion_logits(model, inputs["prompt_ids"], inputs["prompt_mask"], completion_ids,
                                          completion_mask)
        with torch.no_grad():  # the teacher is a target: no gradient through the privileged context
            teacher = self._completion_logits(model, inputs["opsd_teacher_prompt_ids"], inputs["opsd_teacher_prompt_mask"],
                                              completion_ids, completion_mask)
        per_token = token_divergence(student, teacher, mask, self.args.opsd_divergence, self.args.opsd_jsd_beta)

        total, count = gather(torch.stack([per_token.sum().detach(), mask.sum().float()])).view(-1, 2).sum(0).tolist()
        self._metrics[self._mode()]["opsd/divergence"].append(total / count if count else float("nan"))
        return per_token.sum() / self._accumulation_normalizer(inputs["opsd_num_items"])

    def _completion_logits(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        """(B, C, V) temperature-scaled logits predicting each completion token, in float32.

        Called without `fused_lm_head`, TRL's patched forward is the model's own, which returns logits; only the C+1
        last positions are projected (position i predicts token i+1, so the last one is dropped)."""
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        with self.accelerator.autocast(), self._checkpointing_if_long(input_ids.numel()):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=completion_ids.shape[1] + 1).logits
        return logits[:, :-1].float() / self.temperature
