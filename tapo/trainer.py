"""TAPOConfig / TAPOTrainer: TRL's GRPOTrainer plus micro-reflective trajectory augmentation.

How it plugs into TRL (>= 1.16), following the maintainers' advice to extend `_generate_and_score_completions` and
`_compute_loss` rather than fork the loop:

1. TRL generates, scores and computes GRPO advantages for the original rollouts exactly as it always does. Those
   advantages are never touched afterwards (DAE: constructed rows never enter the original group's statistics).
2. We then run DCS on every group (rewards are already gathered across processes; texts are gathered too, since the K
   members of a group can live on different ranks), build constructions for the selected (wrong, correct) pairs on the
   rank that owns the wrong rollout, re-verify them with the same reward functions, and compute their advantages.
3. A constructed trajectory is stored *on the row of the wrong rollout it repairs* (`ref_*` columns, same batch
   dimension). That keeps every tensor's batch size equal to TRL's, so TRL's shuffling, `steps_per_generation`
   buffering and per-micro-batch splitting keep working unchanged, and each micro-batch holds its exact share of
   original rows. At most one construction per wrong rollout exists (DCS picks distinct wrong indices), so one slot
   per row suffices.
4. `_compute_loss` = TRL's own loss on the original rows (every TRL loss type and option stays available) +
   lambda * L_ref on the constructed rows, with OTS token weights (`tapo.core.losses` / `tapo.core.weights`).

Old log-probs of constructed rows: when TRL computes old log-probs for the batch (several optimizer steps per
generation, or vLLM), we compute them for the constructed rows in the same no-grad pass style, right after
construction; otherwise old = current.detach() and the ratio is 1, as for TRL's own rows. See `tapo.core.losses`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather, gather_object
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import RepeatSampler, pad

from tapo.construct import CONSTRUCTORS, ConstructionRequest, HFGenerator, OpenAIChatGenerator, construct
from tapo.core.advantages import decoupled_advantages
from tapo.core.losses import clipped_pg_loss
from tapo.core.selection import select_candidates
from tapo.core.tokens import label_tokens, span_fractions
from tapo.core.weights import ots_weights
from tapo.quiet import resolve_config_aliases, silence_dependency_warnings

silence_dependency_warnings()

# OPSD choices (the arm lives in tapo.opsd; its options are validated with the rest of the config).
OPSD_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
OPSD_REFERENCES = ("sibling", "solution", "answer")

# TRL loss types whose normalization we mirror for L_ref (the aggregation of `tapo.core.losses`).
REF_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")


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
        metadata={"help": "DAE baseline for constructed rows: 'orig' (the original group's mean/std) or 'ref' "
                  "(G_ref's own mean/std, the paper's equation; zero signal when every accepted construction is correct)."},
    )
    ref_loss_aggregation: str = field(
        default="token_mean", metadata={"help": f"How L_ref is normalized: one of {REF_AGGREGATIONS}."}
    )
    ots_enabled: bool = field(default=True, metadata={"help": "OOD token suppression weights inside L_ref (ablation switch)."})
    ots_low: float = field(default=0.01, metadata={"help": "OTS: lower clamp of w_t = exp(log p_t + H_t)."})
    ots_high: float = field(default=10.0, metadata={"help": "OTS: upper clamp of w_t."})
    constructor: str = field(
        default="self",
        metadata={"help": "Who writes the micro-reflective trajectory: 'self' (the policy, same generation backend as "
                  "the rollouts), 'splice' (deterministic, no model), 'teacher' (teacher_model / teacher_base_url)."},
    )
    synthesis_max_tokens: int = field(default=1024, metadata={"help": "Generation budget for one synthesis output."})
    ref_max_length: int | None = field(
        default=None,
        metadata={"help": "Constructed trajectories longer than this many tokens are dropped (truncating would cut "
                  "the verified final answer). Default: 2 * max_completion_length."},
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
    # OPSD arm (--algorithm opsd, tapo.opsd.OPSDTrainer); ignored by TAPOTrainer.
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
        resolve_config_aliases(self)  # no deprecation warning for TRL's own field names
        super().__post_init__()
        if self.constructor not in CONSTRUCTORS:
            raise ValueError(f"constructor={self.constructor!r}: choose one of {CONSTRUCTORS}")
        if self.ref_baseline not in ("orig", "ref"):
            raise ValueError(f"ref_baseline={self.ref_baseline!r}: choose 'orig' or 'ref'")
        if self.ref_loss_aggregation not in REF_AGGREGATIONS:
            raise ValueError(f"ref_loss_aggregation={self.ref_loss_aggregation!r}: choose one of {REF_AGGREGATIONS}")
        if self.constructor == "teacher" and not self.teacher_model:
            raise ValueError("constructor='teacher' needs teacher_model (a model path/name, or the endpoint's model name)")
        if self.ots_low > self.ots_high:
            raise ValueError(f"ots_low={self.ots_low} must be <= ots_high={self.ots_high}")
        if self.opsd_divergence not in OPSD_DIVERGENCES:
            raise ValueError(f"opsd_divergence={self.opsd_divergence!r}: choose one of {OPSD_DIVERGENCES}")
        if self.opsd_divergence == "jsd" and not 0.0 < self.opsd_jsd_beta < 1.0:
            raise ValueError(f"opsd_jsd_beta={self.opsd_jsd_beta}: must lie strictly between 0 and 1")
        if self.opsd_reference not in OPSD_REFERENCES:
            raise ValueError(f"opsd_reference={self.opsd_reference!r}: choose one of {OPSD_REFERENCES}")
        if not self.opsd_include_grpo and self.opsd_weight == 0:
            raise ValueError("opsd_include_grpo=False with opsd_weight=0 leaves no loss")
        if self.ref_max_length is None:
            self.ref_max_length = 2 * self.max_completion_length
        generate_every = self.steps_per_generation * self.num_iterations
        if self.save_steps >= 1 and (int(self.save_steps) * self.gradient_accumulation_steps) % generate_every:
            # The buffered generation batch is not checkpointed: a resume from mid-buffer regenerates it, so the
            # resumed run is still correct but no longer bit-identical to an uninterrupted one.
            warnings.warn(f"save_steps={self.save_steps} does not fall on generation boundaries (every {generate_every} "
                          "micro-steps): resuming from such a checkpoint regenerates its rollouts", stacklevel=2)


def completion_text(completion) -> str:
    """TRL completions are strings, or chat message lists for conversational datasets."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def prompt_text(prompt) -> str:
    """The problem statement: the last user message of a conversational prompt, or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


TAPO_STATE_NAME = "tapo_state.json"  # beside trainer_state.json in every checkpoint: the trainer's own counters


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss; raised before backward, so the weights and every saved checkpoint stay as they were."""


class ResumableRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler draws one permutation per epoch from a generator seeded once, so a run resumed in epoch e
    would replay epoch 0's order. `set_epoch(e)` (called by the Trainer before each epoch) re-seeds and skips e
    permutations: every epoch gets the order an uninterrupted run gives it."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)


class TAPOTrainer(GRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` that trains with TAPO when `args.tapo_enabled`."""

    _tag_names = ["trl", "grpo", "tapo"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._scored = None  # what TRL's _calculate_rewards saw for the current generation batch
        self._generation_round = 0  # seeds DCS identically on every rank
        self._teacher = None
        if self.args.tapo_enabled and self.args.constructor == "teacher":
            a = self.args
            self._teacher = (
                OpenAIChatGenerator(a.teacher_base_url, a.teacher_model, a.teacher_api_key_env, a.synthesis_max_tokens,
                                    a.temperature)
                if a.teacher_base_url
                else HFGenerator(a.teacher_model, a.synthesis_max_tokens, a.temperature)
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Generation side

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._scored = (inputs, prompts, completions, rewards_per_func)
        return rewards_per_func

    def _total_reward(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        weights = self.reward_weights.to(rewards_per_func.device)
        return (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)

    def _generate_and_score_completions(self, inputs):
        self._scored = None
        output = super()._generate_and_score_completions(inputs)
        if self.args.tapo_enabled and self.model.training:
            self._attach_constructions(output)
        return output

    def _attach_constructions(self, output: dict) -> None:
        """DCS -> construction -> re-verification -> DAE -> `ref_*` columns on the rows of the repaired rollouts."""
        a, device = self.args, self.accelerator.device
        inputs, prompts, completions, rewards_per_func = self._scored
        n_local, k = len(prompts), self.num_generations
        offset = self.accelerator.process_index * n_local
        orig_rewards = self._total_reward(rewards_per_func)  # (B_global,), gathered by TRL
        correct = (orig_rewards >= a.correct_threshold).view(-1, k)  # (G, K)
        texts = [completion_text(c) for c in completions]
        all_texts = gather_object(texts) if self.accelerator.num_processes > 1 else texts

        # DCS on every group, identically on every rank (same seeded rng), so ranks agree on who builds what.
        self._generation_round += 1
        requests: dict[int, ConstructionRequest] = {}  # local row -> request
        n_eligible = 0
        for g in range(correct.shape[0]):
            rng = random.Random(f"{a.seed}-{self._generation_round}-{g}")
            pairs = select_candidates(correct[g].tolist(), a.n_pos, a.n_neg, a.m_max, rng)
            n_eligible += bool(pairs)
            for wrong, ref in pairs:
                row = g * k + wrong - offset
                if 0 <= row < n_local:
                    gold = inputs[row].get("answer")
                    requests[row] = ConstructionRequest(prompt_text(prompts[row]), texts[row], all_texts[g * k + ref],
                                                        None if gold is None else str(gold))

        rows = sorted(requests)
        built = construct([requests[r] for r in rows], a.constructor, self._synthesis_generator())
        trajectories = {}
        too_long = 0
        for row, c in zip(rows, built, strict=True):
            if c.trajectory is None:
                continue
            ids, labels = label_tokens(self._tokenizer, c.trajectory, add_eos=True)
            if len(ids) > a.ref_max_length:
                too_long += 1
                continue
            trajectories[row] = (c.trajectory, ids, labels)

        has_local = torch.zeros(n_local, dtype=torch.bool, device=device)
        has_local[list(trajectories)] = True
        has_global = gather(has_local)
        # Re-verify with the same reward functions (a collective call: every rank scores all its rows, with an empty
        # completion where it has no construction, so gathered shapes match). Skipped when no rank built anything.
        ref_rewards = torch.zeros_like(orig_rewards)
        if has_global.any():
            ref_completions = [self._as_completion(completions[i], trajectories[i][0].text if i in trajectories else "")
                               for i in range(n_local)]
            ref_ids = [trajectories[i][1] if i in trajectories else [] for i in range(n_local)]
            ref_rewards = self._total_reward(super()._calculate_rewards(inputs, prompts, ref_completions, ref_ids))
        accepted_global = has_global & (ref_rewards >= a.correct_threshold)

        # DAE: constructed rows get their own advantages; the original ones (already in `output`) are left untouched.
        grouped_ref = ref_rewards.view(-1, k)
        grouped_accepted = accepted_global.view(-1, k)
        ref_lists = [grouped_ref[g][grouped_accepted[g]] for g in range(grouped_ref.shape[0])]
        _, ref_adv_lists = decoupled_advantages(orig_rewards.view(-1, k), ref_lists, eps=1e-4,
                                                ref_baseline=a.ref_baseline, scale=self.scale_rewards)
        ref_adv_global = torch.zeros_like(orig_rewards)
        for g, adv in enumerate(ref_adv_lists):
            ref_adv_global[g * k + grouped_accepted[g].nonzero().flatten()] = adv.to(ref_adv_global.dtype)
        accepted_local = accepted_global[offset : offset + n_local]

        self._store_ref_rows(output, trajectories, accepted_local, ref_adv_global[offset : offset + n_local])
        self._log_construction_stats(
            n_groups=correct.shape[0], n_eligible=n_eligible, rows=rows, built=built, trajectories=trajectories,
            accepted_local=accepted_local, too_long=too_long, correct=correct,
        )

    def _as_completion(self, like, text: str):
        """Shape a text like TRL's completions (string or assistant message list) for the reward functions."""
        return text if isinstance(like, str) else [{"role": "assistant", "content": text}]

    def _store_ref_rows(self, output: dict, trajectories: dict, accepted: torch.Tensor, advantages: torch.Tensor) -> None:
        device = self.accelerator.device
        n = output["prompt_ids"].shape[0]
        ids = [torch.tensor(trajectories[i][1] if accepted[i] else [self._tokenizer.pad_token_id]) for i in range(n)]
        mask = [torch.full((len(t),), int(bool(accepted[i])), dtype=torch.long) for i, t in enumerate(ids)]
        labels = [torch.tensor(trajectories[i][2] if accepted[i] else [-1]) for i in range(n)]
        output["ref_completion_ids"] = pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="right").to(device)
        output["ref_completion_mask"] = pad(mask, padding_value=0, padding_side="right").to(device)
        output["ref_labels"] = pad(labels, padding_value=-1, padding_side="right").to(device)
        output["ref_advantages"] = advantages.to(device)
        output["ref_mask_rows"] = accepted.to(device)
        # Global counts for normalizing L_ref across micro-batches and processes, like TRL's num_items_in_batch.
        output["ref_num_items"] = gather(output["ref_completion_mask"].sum()).sum()
        output["ref_num_seqs"] = gather(accepted.sum()).sum()

        need_old = "old_per_token_logps" in output
        need_ref_model = self.beta != 0.0
        if (need_old or need_ref_model) and (accepted.any() or self.accelerator.num_processes > 1):
            input_ids = torch.cat([output["prompt_ids"], output["ref_completion_ids"]], dim=1)
            attention = torch.cat([output["prompt_mask"], output["ref_completion_mask"]], dim=1)
            keep = output["ref_completion_ids"].shape[1]
            with torch.no_grad():
                if need_old:
                    output["ref_old_per_token_logps"] = self._get_per_token_logps_and_entropies(
                        self.model, input_ids, attention, keep, batch_size=self.args.per_device_train_batch_size)[0]
                if need_ref_model:
                    output["ref_ref_per_token_logps"] = self._reference_logps(input_ids, attention, keep)

    def _reference_logps(self, input_ids, attention, keep):
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(self.ref_model, input_ids, attention, keep)[0]
        from trl.models.utils import use_adapter  # PEFT: the base model (adapter disabled) is the reference

        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._get_per_token_logps_and_entropies(self.model, input_ids, attention, keep)[0]

    def _synthesis_generator(self):
        if self.args.constructor == "splice":
            return None
        if self.args.constructor == "teacher":
            return self._teacher
        return self._self_generate

    def _self_generate(self, messages: list[str]) -> list[str]:
        """The policy writes the syntheses through TRL's own generation path (transformers or vLLM).

        Every rank calls the backend the same number of times with the same count of prompts (padded with a copy),
        because ZeRO-3 parameter gathering and vLLM server mode are collective.
        """
        n_max = max(gather_object([len(messages)])) if self.accelerator.num_processes > 1 else len(messages)
        if n_max == 0:
            return []
        padded = messages + [messages[0] if messages else "."] * (n_max - len(messages))
        prompt_ids = [
            self._tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=True, add_generation_prompt=True,
                                                **self.chat_template_kwargs)
            for m in padded
        ]
        prompt_ids = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompt_ids]
        with self._generation_budget(self.args.synthesis_max_tokens):
            completion_ids, _ = self._generate_single_turn(prompt_ids, None, {}, num_generations=1)
        texts = self._tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return texts[: len(messages)]

    @contextlib.contextmanager
    def _generation_budget(self, max_tokens: int):
        """Temporarily raise the generation length for syntheses (they copy a prefix and then keep going)."""
        saved = []
        targets = [(getattr(self, "generation_config", None), "max_new_tokens"),
                   (getattr(self, "generation_kwargs", None), "max_new_tokens"),
                   (getattr(self, "vllm_generation", None), "max_completion_length")]
        for obj, name in targets:
            if isinstance(obj, dict) and name in obj:
                saved.append((obj, name, obj[name], True))
                obj[name] = max_tokens
            elif obj is not None and not isinstance(obj, dict) and hasattr(obj, name):
                saved.append((obj, name, getattr(obj, name), False))
                setattr(obj, name, max_tokens)
        try:
            yield
        finally:
            for obj, name, value, is_dict in saved:
                if is_dict:
                    obj[name] = value
                else:
                    setattr(obj, name, value)

    def _log_construction_stats(self, *, n_groups, n_eligible, rows, built, trajectories, accepted_local, too_long, correct):
        metrics = self._metrics["train"]
        attempted = len(rows)
        parsed = sum(c.parsed for c in built)
        assembled = sum(c.trajectory is not None for c in built)
        accepted = int(accepted_local.sum())
        counts = torch.tensor([attempted, parsed, assembled, accepted, too_long], dtype=torch.float32,
                              device=self.accelerator.device)
        attempted, parsed, assembled, accepted, too_long = gather(counts).view(-1, 5).sum(0).tolist()
        metrics["tapo/eligible_frac"].append(n_eligible / max(n_groups, 1))
        metrics["tapo/accuracy"].append(correct.float().mean().item())
        metrics["tapo/constructions_attempted"].append(attempted)
        metrics["tapo/constructions_parsed"].append(parsed)
        metrics["tapo/constructions_accepted"].append(accepted)
        metrics["tapo/constructions_too_long"].append(too_long)
        metrics["tapo/parse_rate"].append(parsed / attempted if attempted else float("nan"))
        metrics["tapo/accept_rate"].append(accepted / attempted if attempted else float("nan"))
        kept = [trajectories[r] for r in rows if r in trajectories and accepted_local[r]]
        if kept:
            metrics["tapo/prefix_fraction"].append(sum(t.prefix_fraction for t, _, _ in kept) / len(kept))
            metrics["tapo/reflection_tokens"].append(
                sum(sum(1 for lab in labels if lab == 1) for _, _, labels in kept) / len(kept))
            fractions = [span_fractions(labels) for _, _, labels in kept]
            for name in fractions[0]:
                metrics[f"tapo/span_{name}_frac"].append(sum(f[name] for f in fractions) / len(fractions))

    # ----------------------------------------------------------------------------------------------------------------
    # Loss side

    def _compute_loss(self, model, inputs):
        grpo_loss = super()._compute_loss(model, inputs)
        if not self.args.tapo_enabled or "ref_mask_rows" not in inputs:
            return self._checked_finite(grpo_loss, inputs, L_GRPO=grpo_loss)
        ref_loss = self._ref_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["tapo/loss_grpo"].append(grpo_loss.item())
        if ref_loss is None:
            return self._checked_finite(grpo_loss, inputs, L_GRPO=grpo_loss)
        self._metrics[mode]["tapo/loss_ref"].append(ref_loss.item())
        return self._checked_finite(grpo_loss + self.args.ref_loss_weight * ref_loss, inputs, L_GRPO=grpo_loss,
                                    L_ref=ref_loss)

    def _checked_finite(self, loss: torch.Tensor, inputs: dict, **parts: torch.Tensor) -> torch.Tensor:
        """`loss`, or NonFiniteLossError before a NaN/inf reaches backward (and so the weights and checkpoints)."""
        finite = torch.isfinite(loss.detach()).all().float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = gather(finite)  # every rank stops, instead of the others waiting forever in the next collective
        if bool(finite.all()):
            return loss
        shown = ", ".join(f"{name}={part.item():.4g}" for name, part in parts.items())
        cause = ("; the batch has non-finite advantages: a reward function returned NaN/inf?"
                 if not torch.isfinite(inputs["advantages"]).all() else "")
        raise NonFiniteLossError(f"non-finite loss at step {self.state.global_step + 1} ({shown}){cause}; the step was "
                                 "stopped before backward, so the weights and saved checkpoints are unchanged")

    def _ref_loss(self, model, inputs) -> torch.Tensor | None:
        """lambda-free L_ref on this micro-batch's constructed rows, normalized like TRL's DAPO loss across steps."""
        rows = inputs["ref_mask_rows"].nonzero().flatten()
        if rows.numel() == 0:
            if self.accelerator.num_processes == 1:
                return None
            rows = torch.zeros(1, dtype=torch.long, device=inputs["ref_mask_rows"].device)  # keep collectives in step
        mask = inputs["ref_completion_mask"][rows]
        completion_ids = inputs["ref_completion_ids"][rows]
        input_ids = torch.cat([inputs["prompt_ids"][rows], completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"][rows], mask], dim=1)
        logps, entropy, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention, completion_ids.shape[1],
                                                                     compute_entropy=self.args.ots_enabled)
        old = inputs["ref_old_per_token_logps"][rows] if "ref_old_per_token_logps" in inputs else logps.detach()
        ref_logps = inputs["ref_ref_per_token_logps"][rows] if "ref_ref_per_token_logps" in inputs else None
        a = self.args
        weights = ots_weights(logps, entropy, a.ots_low, a.ots_high) if a.ots_enabled else None
        loss, stats = clipped_pg_loss(
            logps, old, inputs["ref_advantages"][rows], mask, eps_low=self.epsilon_low, eps_high=self.epsilon_high,
            token_weights=weights, ref_logprobs=ref_logps, beta=self.beta, agg=a.ref_loss_aggregation,
            normalizer=self._ref_normalizer(inputs), max_len=a.ref_max_length,
        )
        mode = "train" if self.model.training else "eval"
        for name in ("weight_mean", "weight_min", "weight_max"):
            if name in stats:
                self._metrics[mode][f"tapo/ots_{name}"].append(float(stats[name]))
        return loss

    def _ref_normalizer(self, inputs) -> torch.Tensor:
        """Global count of the generation batch, rescaled to one accumulation window (mirrors TRL's 'dapo')."""
        a = self.args
        if a.ref_loss_aggregation == "token_mean":
            count = inputs["ref_num_items"]
        elif a.ref_loss_aggregation == "seq_mean_token_mean":
            count = inputs["ref_num_seqs"]
        else:  # dr_grpo: sequences * constant length
            count = inputs["ref_num_seqs"] * a.ref_max_length
        normalizer = count.float().clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            normalizer = normalizer * self.current_gradient_accumulation_steps / a.steps_per_generation
        return normalizer

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints and resume

    def _get_train_sampler(self, dataset=None):
        s = super()._get_train_sampler(dataset)
        return ResumableRepeatSampler(s.data_source, s.mini_repeat_count, s.batch_size, s.repeat_count, s.shuffle, s.seed)

    def _save_checkpoint(self, model, trial):
        """Atomic: TRL / transformers write checkpoint-N into the hidden folder RUN/.tmp-checkpoint-N/, which is renamed
        to RUN/checkpoint-N only once complete (with tapo_state.json), so a run killed mid-save never leaves a
        checkpoint-N that resume could pick up. Old checkpoints are rotated out only after the rename."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, target = os.path.join(run_dir, f".tmp-{name}"), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: staging  # instance attribute: super() saves into staging/name
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        if self.state.best_model_checkpoint == os.path.join(staging, name):  # set by super() when this step is best
            self.state.best_model_checkpoint = target
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
        if self.args.should_save:
            with open(os.path.join(staging, name, TAPO_STATE_NAME), "w") as f:
                json.dump({"generation_round": self._generation_round, "step": self._step}, f)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            shutil.rmtree(target, ignore_errors=True)  # a complete but older save of this step (resumed from before it)
            os.replace(os.path.join(staging, name), target)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint):
        """On resume, also restore the DCS round counter (it seeds which pairs get built) and TRL's micro-step
        counter (it decides when the next generation happens)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, TAPO_STATE_NAME) if checkpoint is not None else None
        if path is not None and os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            self._generation_round, self._step = state["generation_round"], state["step"]
