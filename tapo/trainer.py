"""TAPOTrainer: TRL's GRPOTrainer plus micro-reflective trajectory augmentation. Its config is `tapo.config.TAPOConfig`;
the plumbing that is not the algorithm (reward bookkeeping, loss guard, resume) is `tapo.trainer_base.TrainerBase`.

How it plugs into TRL (>= 1.16), following the maintainers' advice to extend `_generate_and_score_completions` and
`_compute_loss` rather than fork the loop:

Generation side
1. TRL generates, scores and computes GRPO advantages for the original rollouts exactly as it always does. Those
   advantages are never touched afterwards (DAE: constructed rows never enter the original group's statistics).
2. DCS runs on every group (rewards and texts are gathered across processes, since the K members of a group can live
   on different ranks; blank rollouts are left out of pairing); constructions are built for the selected (wrong,
   correct) pairs on the rank that owns the wrong rollout (with the configured `cut`, `prefix_match` and
   `construction_control`), re-verified with the same reward functions, and given their DAE advantages. Every
   construction that is not trained on is counted by reason (`tapo/rejected_*`).
   A constructed row's prefix is the wrong rollout's own sampled token ids (`tapo.core.tokens.trajectory_token_ids`:
   re-tokenizing its text could split it differently), and the row ends with the terminator that rollout used.
3. A constructed trajectory is stored *on the row of the wrong rollout it repairs* (`constructed_*` columns, same
   batch dimension). That keeps every tensor's batch size equal to TRL's, so TRL's shuffling, `steps_per_generation`
   buffering and per-micro-batch splitting keep working unchanged, and each micro-batch holds its exact share of
   original rows. At most one construction per wrong rollout exists (DCS picks distinct wrong indices), so one slot
   per row suffices.

Loss side
4. `_compute_loss` = TRL's own loss on the original rows (every TRL loss type and option stays available) +
   lambda * L_ref on the constructed rows, with OOD token suppression weights (`tapo.core.losses`,
   `tapo.core.weights`). In training, L_GRPO is backpropagated before L_ref's forward (`_backward_first`), so a
   micro-batch never holds the activations of its rows and of their constructed rows at once.

Old log-probs of constructed rows: when TRL computes old log-probs for the batch (several optimizer steps per
generation, or vLLM), we compute them for the constructed rows in the same no-grad pass style, right after
construction; otherwise old = current.detach() and the ratio is 1, as for TRL's own rows. See `tapo.core.losses`.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from typing import NamedTuple

import torch
from accelerate.utils import gather, gather_object
from trl.trainer.utils import pad, use_adapter

from tapo.config import TAPOConfig
from tapo.construct import (ConstructionError, ConstructionRequest, HFGenerator, OpenAIChatGenerator, Truncated,
                            construct)
from tapo.core.advantages import decoupled_advantages
from tapo.core.losses import clipped_pg_loss, generation_batch_count, tapo_total_loss
from tapo.core.selection import select_candidates
from tapo.core.trajectory import Trajectory
from tapo.core.synthesis import REJECTIONS, TOO_LONG, WRONG_ANSWER, is_blank
from tapo.core.tokens import REFLECTION, span_fractions, trajectory_token_ids
from tapo.core.weights import ots_weights
from tapo.trainer_base import NonFiniteLossError, TrainerBase

__all__ = ["NonFiniteLossError", "TAPOConfig", "TAPOTrainer"]  # the error is re-exported: callers catch it from here


def prompt_text(prompt) -> str:
    """The problem statement: the last user message of a conversational prompt, or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


class TokenizedTrajectory(NamedTuple):
    """A built construction as the trainer stores it: the text, its completion token ids and their span labels."""

    trajectory: Trajectory
    ids: list[int]
    labels: list[int]


class TAPOTrainer(TrainerBase):
    """Drop-in replacement for `trl.GRPOTrainer` that trains with TAPO when `args.tapo_enabled`."""

    _tag_names = ["trl", "grpo", "tapo"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._teacher = None
        if self.args.tapo_enabled and self.args.constructor == "teacher":
            a = self.args
            self._teacher = (
                OpenAIChatGenerator(a.teacher_base_url, a.teacher_model, a.teacher_api_key_env, a.synthesis_max_tokens,
                                    a.temperature)
                if a.teacher_base_url
                else HFGenerator(a.teacher_model, a.synthesis_max_tokens, a.temperature,
                                 device=self.accelerator.device, dtype=self._teacher_dtype())
            )

    def _teacher_dtype(self) -> torch.dtype:
        """A local teacher only generates: it runs in the precision the policy computes in (bf16/fp16 under mixed
        precision, whose master weights stay fp32), else in the policy's parameter dtype."""
        if self.args.bf16:
            return torch.bfloat16
        if self.args.fp16:
            return torch.float16
        return self.accelerator.unwrap_model(self.model).dtype

    # ----------------------------------------------------------------------------------------------------------------
    # Generation side: DCS -> construction -> re-verification -> DAE

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.tapo_enabled and self.model.training:
            self._attach_constructions(output)
        return output

    def _attach_constructions(self, output: dict) -> None:
        """DCS -> construction -> re-verification -> DAE -> `constructed_*` columns on the rows of the repaired rollouts."""
        a, device = self.args, self.accelerator.device
        batch = self._scored_batch()
        n_local, k, offset = len(batch.prompts), self.num_generations, batch.offset
        correct, scored = batch.correct.view(-1, k), batch.scored.view(-1, k)  # (G, K)
        # A blank rollout (only its terminator, or whitespace) has nothing to repair or copy: it is left out of pairing,
        # as wrong rollout and as reference, before DCS picks (as `tapo coldstart` does).
        usable = [[i for i in range(k) if not is_blank(batch.all_texts[g * k + i])] for g in range(correct.shape[0])]

        # DCS on every group, identically on every rank (same seeded rng), so ranks agree on who builds what.
        self._generation_round += 1
        requests: dict[int, ConstructionRequest] = {}  # local row -> request
        n_eligible = 0
        for g, members in enumerate(usable):
            rng = random.Random(f"{a.seed}-{self._generation_round}-{g}")
            # Unscorable rollouts (NaN reward) are neither right nor wrong: DCS neither repairs nor copies them.
            verdicts = [bool(correct[g, i]) if scored[g, i] else None for i in members]
            pairs = select_candidates(verdicts, a.n_pos, a.n_neg, a.m_max, rng)
            n_eligible += bool(pairs)
            for wrong, reference in pairs:
                row = g * k + members[wrong] - offset
                if 0 <= row < n_local:
                    gold = batch.inputs[row].get("answer")
                    requests[row] = ConstructionRequest(prompt_text(batch.prompts[row]), batch.texts[row],
                                                        batch.all_texts[g * k + members[reference]],
                                                        None if gold is None else str(gold))

        rows = sorted(requests)
        trajectories: dict[int, TokenizedTrajectory] = {}  # local row -> its construction, when one was assembled
        rejections = Counter()  # reason -> count, this rank's
        try:
            built = construct([requests[r] for r in rows], a.constructor, self._synthesis_generator(), cut=a.cut,
                              prefix_match=a.prefix_match, control=a.construction_control)
            for row, c in zip(rows, built, strict=True):
                if c.trajectory is None:
                    rejections[c.rejection] += 1
                    continue
                sampled = batch.completion_ids[row]
                ids, labels = trajectory_token_ids(self._tokenizer, c.trajectory, sampled, self._terminator(sampled))
                if len(ids) > a.ref_max_length:
                    rejections[TOO_LONG] += 1
                    continue
                trajectories[row] = TokenizedTrajectory(c.trajectory, ids, labels)
        except ConstructionError:
            raise  # already agreed on by every rank (inside the self generator)
        except Exception as err:
            self._construction_checkpoint(error=err)  # raises ConstructionError on every rank
        self._construction_checkpoint()

        has_local = torch.zeros(n_local, dtype=torch.bool, device=device)
        has_local[list(trajectories)] = True
        has_global = gather(has_local)
        # Re-verify with the same reward functions (a collective call: every rank scores all its rows, with an empty
        # completion where it has no construction, so gathered shapes match). Skipped when no rank built anything.
        constructed_rewards = torch.zeros_like(batch.rewards)
        if has_global.any():
            texts = [trajectories[i].trajectory.text if i in trajectories else "" for i in range(n_local)]
            ids = [trajectories[i].ids if i in trajectories else [] for i in range(n_local)]
            constructed_rewards = self._rescore(batch, texts, ids)
        accepted_global = has_global & (constructed_rewards >= a.correct_threshold)

        # DAE: constructed rows get their own advantages; the original ones (already in `output`) are left untouched.
        grouped_rewards = constructed_rewards.view(-1, k)
        grouped_accepted = accepted_global.view(-1, k)
        g_ref = [grouped_rewards[g][grouped_accepted[g]] for g in range(grouped_rewards.shape[0])]
        _, g_ref_advantages = decoupled_advantages(batch.rewards.view(-1, k), g_ref, eps=1e-4,
                                                   ref_baseline=a.ref_baseline, scale=self.scale_rewards)
        advantages = torch.zeros_like(batch.rewards)
        for g, adv in enumerate(g_ref_advantages):
            advantages[g * k + grouped_accepted[g].nonzero().flatten()] = adv.to(advantages.dtype)
        accepted_local = accepted_global[offset : offset + n_local]
        rejections[WRONG_ANSWER] += len(trajectories) - int(accepted_local.sum())

        self._store_constructed_rows(output, trajectories, accepted_local, advantages[offset : offset + n_local])
        self._log_construction_stats(
            n_groups=correct.shape[0], n_eligible=n_eligible, rows=rows, built=built, trajectories=trajectories,
            accepted_local=accepted_local, rejections=rejections, correct=correct,
            n_blank=sum(k - len(members) for members in usable),
        )

    def _terminator(self, sampled: list[int]) -> int:
        """The token a rollout ended with when it is one of TRL's stop tokens (e.g. <|im_end|>), else (a rollout cut
        at max_completion_length) the tokenizer's eos: a constructed row ends the way the policy's rollouts end."""
        return sampled[-1] if sampled and sampled[-1] in self.eos_token_ids else self._tokenizer.eos_token_id

    def _store_constructed_rows(self, output: dict, trajectories: dict[int, TokenizedTrajectory], accepted: torch.Tensor,
                                advantages: torch.Tensor) -> None:
        device = self.accelerator.device
        n = output["prompt_ids"].shape[0]
        ids = [torch.tensor(trajectories[i].ids if accepted[i] else [self._tokenizer.pad_token_id]) for i in range(n)]
        mask = [torch.full((len(t),), int(bool(accepted[i])), dtype=torch.long) for i, t in enumerate(ids)]
        output["constructed_completion_ids"] = pad(ids, padding_value=self._tokenizer.pad_token_id,
                                                   padding_side="right").to(device)
        output["constructed_completion_mask"] = pad(mask, padding_value=0, padding_side="right").to(device)
        output["constructed_advantages"] = advantages.to(device)
        output["constructed_rows"] = accepted.to(device)
        # Global counts for normalizing L_ref across micro-batches and processes, like TRL's num_items_in_batch.
        output["constructed_num_items"] = gather(output["constructed_completion_mask"].sum()).sum()
        output["constructed_num_seqs"] = gather(accepted.sum()).sum()

        need_old = "old_per_token_logps" in output
        need_ref_model = self.beta != 0.0
        if (need_old or need_ref_model) and (accepted.any() or self.accelerator.num_processes > 1):
            input_ids = torch.cat([output["prompt_ids"], output["constructed_completion_ids"]], dim=1)
            attention = torch.cat([output["prompt_mask"], output["constructed_completion_mask"]], dim=1)
            keep = output["constructed_completion_ids"].shape[1]
            with torch.no_grad():
                if need_old:
                    output["constructed_old_per_token_logps"] = self._get_per_token_logps_and_entropies(
                        self.model, input_ids, attention, keep, batch_size=self.args.per_device_train_batch_size)[0]
                if need_ref_model:
                    output["constructed_ref_per_token_logps"] = self._reference_model_logps(input_ids, attention, keep)

    def _reference_model_logps(self, input_ids, attention, keep):
        """The reference model's log-probs of the constructed rows, in per_device_train_batch_size chunks as TRL's own
        reference pass (the generation batch can be many micro-batches long)."""
        chunk = self.args.per_device_train_batch_size
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(self.ref_model, input_ids, attention, keep, batch_size=chunk)[0]
        # PEFT, as TRL does for its own rows: the adapter TRL copied as "ref" when training a pretrained adapter, else
        # the base model (adapters disabled).
        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._get_per_token_logps_and_entropies(self.model, input_ids, attention, keep, batch_size=chunk)[0]

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
        n_max = self._construction_checkpoint(len(messages))
        if n_max == 0:  # no rank has a synthesis to write: all ranks skip generation together
            return []
        padded = messages + [messages[0] if messages else "."] * (n_max - len(messages))
        prompt_ids = [
            self._tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=True, add_generation_prompt=True,
                                                **self.chat_template_kwargs)
            for m in padded
        ]
        prompt_ids = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompt_ids]
        budget = self.args.synthesis_max_tokens
        with self._generation_budget(budget):
            completion_ids, _ = self._generate_single_turn(prompt_ids, None, {}, num_generations=1)
        texts = self._tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        stops = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        # Ran out of budget: as long as the budget and not ended by a stop token (TRL's clipped-completion test).
        return [Truncated(text) if len(ids) >= budget and ids[-1] not in stops else text
                for text, ids in zip(texts[: len(messages)], completion_ids[: len(messages)], strict=True)]

    def _construction_checkpoint(self, n: int = 0, error: Exception | None = None) -> int:
        """A point where all ranks agree during construction: returns the largest `n` over the ranks, or raises the
        same ConstructionError on every rank when any rank reports an error.

        Raising a construction error on every rank (rather than skipping that construction) keeps a broken generator
        or synthesis step loud, and no rank is left waiting in a collective. It works because the construction step
        has exactly these checkpoints and every checkpoint is this same call: at the entry of the self generator
        (`n` = synthesis count) and after construction. A rank that fails before the first one (prompt building)
        meets the others at their first one. A failure inside a collective generation backend (ZeRO-3, vLLM server
        mode) cannot be caught this way: there the launcher's timeout is the only guard.
        """
        message = None if error is None else f"{type(error).__name__}: {error}"
        if self.accelerator.num_processes == 1:
            status = [(n, message)]
        else:
            status = gather_object([(n, message)])
        failed = [f"rank {rank}: {msg}" for rank, (_, msg) in enumerate(status) if msg is not None]
        if failed:
            raise ConstructionError(f"constructor={self.args.constructor!r} failed on {len(failed)} of {len(status)} "
                                    f"processes ({'; '.join(failed)}); raised on every process") from error
        return max(count for count, _ in status)

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

    def _log_construction_stats(self, *, n_groups, n_eligible, rows, built, trajectories, accepted_local, rejections,
                                correct, n_blank):
        metrics = self._metrics["train"]
        # Counts summed over the ranks: attempted, parsed, accepted, truncated syntheses, then rejections by reason.
        counts = [len(rows), sum(c.parsed for c in built), int(accepted_local.sum()), sum(c.truncated for c in built),
                  *(rejections[reason] for reason in REJECTIONS)]
        gathered = gather(torch.tensor(counts, dtype=torch.float32, device=self.accelerator.device))
        attempted, parsed, accepted, truncated, *rejected = gathered.view(-1, len(counts)).sum(0).tolist()
        metrics["tapo/eligible_frac"].append(n_eligible / max(n_groups, 1))
        metrics["tapo/accuracy"].append(correct.float().mean().item())
        metrics["tapo/blank_rollouts"].append(n_blank)  # counted over the global batch, the same on every rank
        metrics["tapo/constructions_attempted"].append(attempted)
        metrics["tapo/constructions_parsed"].append(parsed)
        metrics["tapo/constructions_accepted"].append(accepted)
        metrics["tapo/synthesis_truncated"].append(truncated)
        for reason, count in zip(REJECTIONS, rejected, strict=True):
            metrics[f"tapo/rejected_{reason}"].append(count)
        metrics["tapo/parse_rate"].append(parsed / attempted if attempted else float("nan"))
        metrics["tapo/accept_rate"].append(accepted / attempted if attempted else float("nan"))
        # Means over the accepted constructions of all ranks: per-rank sums and counts, gathered like the counts above.
        kept = [trajectories[r] for r in rows if r in trajectories and accepted_local[r]]
        # Tokens of the accepted constructed rows: the testbed compares arms at equal trained tokens.
        span_names = list(span_fractions([]))
        sums = torch.zeros(4 + len(span_names), dtype=torch.float64, device=self.accelerator.device)
        for t in kept:
            sums += torch.tensor([1.0, len(t.labels), t.trajectory.prefix_fraction,
                                  sum(1 for lab in t.labels if lab == REFLECTION), *span_fractions(t.labels).values()],
                                 dtype=torch.float64, device=sums.device)
        n_kept, tokens, prefix, reflection, *spans = gather(sums).view(-1, sums.numel()).sum(0).tolist()
        metrics["tapo/constructed_tokens"].append(tokens)
        if n_kept:
            metrics["tapo/prefix_fraction"].append(prefix / n_kept)
            metrics["tapo/reflection_tokens"].append(reflection / n_kept)
            for name, total in zip(span_names, spans, strict=True):
                metrics[f"tapo/span_{name}_frac"].append(total / n_kept)

    # ----------------------------------------------------------------------------------------------------------------
    # Loss side: L = L_GRPO + lambda * L_ref

    def _compute_loss(self, model, inputs):
        grpo_loss = super()._compute_loss(model, inputs)
        if not self.args.tapo_enabled or "constructed_rows" not in inputs:
            return self._checked_finite(grpo_loss, inputs, L_GRPO=grpo_loss)
        ref_loss = None
        if self._has_ref_rows(inputs):  # L_GRPO's backward before L_ref's forward: one row's activations at a time
            grpo_loss = self._backward_first(grpo_loss, inputs, L_GRPO=grpo_loss)
            ref_loss = self._ref_loss(model, inputs)
        # Means over ranks, as TRL logs its own losses (rank 0's L_ref alone is its share of the global normalizer).
        self._metrics[self._mode()]["tapo/loss_grpo"].append(gather(grpo_loss.detach().reshape(1)).mean().item())
        loss = tapo_total_loss(grpo_loss, ref_loss, self.args.ref_loss_weight)
        if ref_loss is None:
            return self._checked_finite(loss, inputs, L_GRPO=grpo_loss)
        self._metrics[self._mode()]["tapo/loss_ref"].append(gather(ref_loss.detach().reshape(1)).mean().item())
        return self._checked_finite(loss, inputs, L_GRPO=grpo_loss, L_ref=ref_loss)

    def _has_ref_rows(self, inputs) -> bool:
        """Whether `_ref_loss` computes a loss on this micro-batch (always with several processes: collectives)."""
        return self.accelerator.num_processes > 1 or bool(inputs["constructed_rows"].any())

    def _ref_loss(self, model, inputs) -> torch.Tensor:
        """lambda-free L_ref on this micro-batch's constructed rows, normalized like TRL's DAPO loss across steps
        (called when `_has_ref_rows`)."""
        rows = inputs["constructed_rows"].nonzero().flatten()
        if rows.numel() == 0:
            rows = torch.zeros(1, dtype=torch.long, device=rows.device)  # keep collectives in step
        mask = inputs["constructed_completion_mask"][rows]
        completion_ids = inputs["constructed_completion_ids"][rows]
        input_ids = torch.cat([inputs["prompt_ids"][rows], completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"][rows], mask], dim=1)
        logps, entropy, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention, completion_ids.shape[1],
                                                                     compute_entropy=self.args.ots_enabled)
        old = (inputs["constructed_old_per_token_logps"][rows] if "constructed_old_per_token_logps" in inputs
               else logps.detach())
        ref_model_logps = (inputs["constructed_ref_per_token_logps"][rows] if "constructed_ref_per_token_logps" in inputs
                           else None)
        a = self.args
        weights = ots_weights(logps, entropy, a.ots_low, a.ots_high) if a.ots_enabled else None
        count = generation_batch_count(a.ref_loss_aggregation, inputs["constructed_num_items"],
                                       inputs["constructed_num_seqs"], a.ref_max_length)
        loss, stats = clipped_pg_loss(
            logps, old, inputs["constructed_advantages"][rows], mask, eps_low=self.epsilon_low,
            eps_high=self.epsilon_high, token_weights=weights, ref_logprobs=ref_model_logps, beta=self.beta,
            agg=a.ref_loss_aggregation, normalizer=self._accumulation_normalizer(count), max_len=a.ref_max_length,
            delta=a.delta, kl_ratio_correction=a.use_bias_correction_kl,  # as TRL applies them to L_GRPO
        )
        for name in ("weight_mean", "weight_min", "weight_max"):
            if name in stats:
                self._metrics[self._mode()][f"tapo/ots_{name}"].append(float(stats[name]))
        return loss

    @property
    def methods(self) -> list[str]:
        """What this trainer runs, as the model card names it: TAPO, or GRPO when TAPO is off."""
        return ["TAPO"] if self.args.tapo_enabled else ["GRPO"]
