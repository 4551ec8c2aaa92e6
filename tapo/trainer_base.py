"""TrainerBase: what the tapo trainers (TAPOTrainer, OPSDTrainer) add to TRL's GRPOTrainer that is not the algorithm.

- reward bookkeeping: what TRL's `_calculate_rewards` saw for the current generation batch, as one `ScoredBatch`;
- the normalizer that spreads a generation batch's global count over micro-batches and processes (TRL's "dapo");
- the non-finite loss guard (`NonFiniteLossError` before backward), and one loss term backpropagated before the next
  one's forward (`_backward_first`);
- resume: a sampler that gives every epoch the order an uninterrupted run gives it, atomic checkpoints, and the
  trainer's own counters in RUN/checkpoint-N/tapo_state.json (`tapo.runfolder`);
- the model card (`tapo.modelcard`) in every checkpoint and in the saved model, naming what the subclass's `methods`
  ran on which base model;
- memory (`tapo.memory`): freed memory handed back to the OS after generation and after every optimizer step, and,
  when training on the CPU, smaller LM-head tiles over the labelled positions only, norms / MLPs that recompute
  their elementwise activations and (one process) a tied head's gradient added to `.grad` at once; activation
  checkpointing for the micro-batches of at least `activation_checkpointing_min_tokens` positions;
- log-prob passes without the completion columns that are padding in every row (`trailing_padding`): a micro-batch
  keeps its generation batch's padded width, and that padding would otherwise run through every layer.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate.utils import DistributedType, gather, gather_object
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler, get_config_model_id

from tapo.memory import (
    ReleaseFreedMemory,
    accumulate_tied_head_gradient,
    checkpointing,
    decoder_layers,
    lean_activations,
    release_freed_memory,
    score_labelled_positions_only,
    use_small_lm_head_tiles,
)
from tapo.modelcard import model_card
from tapo.models import describe_base_model
from tapo.runfolder import read_tapo_state, write_tapo_state


def completion_text(completion) -> str:
    """TRL completions are strings, or chat message lists for conversational datasets."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


class ScoredBatch(NamedTuple):
    """One generation batch as TRL scored it: this process's rows, plus the rewards and texts of all processes (the
    K rollouts of a group can live on different ranks)."""

    inputs: list[dict]  # this process's dataset rows, one per rollout
    prompts: list  # this process's prompts (strings or chat messages)
    completions: list  # this process's completions, shaped like TRL's
    texts: list[str]  # this process's completion texts
    completion_ids: list[list[int]]  # this process's completions as sampled: token ids up to and with the terminator
    all_texts: list[str]  # every process's completion texts, in global row order
    rewards: torch.Tensor  # (B_global,) weighted total reward per rollout
    correct: torch.Tensor  # (B_global,) bool: rewards >= correct_threshold
    scored: torch.Tensor  # (B_global,) bool: some reward function scored the rollout (its reward is not NaN)
    offset: int  # global index of this process's first row


def trailing_padding(attention_mask: torch.Tensor, completion_width: int) -> int:
    """How many trailing columns of `attention_mask` (B, prompt + completion) no row attends to, at most
    `completion_width - 1` (TRL scores the last `logits_to_keep` positions; 0 would mean all of them). Completions are
    right-padded to the longest of the generation batch, so a micro-batch of a few of its rows carries columns that
    are padding in all of them. (Leading prompt padding is left alone: without position ids, dropping it shifts the
    positions, which moved the tiny test model's log-probs by 2e-3, and TAPO off must stay TRL's GRPO to the bit.)"""
    attended = attention_mask[:, attention_mask.shape[1] - completion_width:].bool().any(0)
    last = int(attended.nonzero().max()) if attended.any() else 0
    return completion_width - 1 - last


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss; raised before its backward and the optimizer step, so the weights and every saved checkpoint
    stay as they were."""


class ResumableRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler draws one permutation per epoch from a generator seeded once, so a run resumed in epoch e
    would replay epoch 0's order. `set_epoch(e)` (called by the Trainer before each epoch) re-seeds and skips e
    permutations: every epoch gets the order an uninterrupted run gives it."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)


class TrainerBase(GRPOTrainer):
    """GRPOTrainer plus reward bookkeeping, the shared loss normalizer, the non-finite loss guard and exact resume."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(ReleaseFreedMemory())
        if self.accelerator.device.type == "cpu":
            use_small_lm_head_tiles()
            score_labelled_positions_only()
            lean_activations(self.model)
            if self.accelerator.distributed_type == DistributedType.NO:
                accumulate_tied_head_gradient(self.model)
        self._layers = decoder_layers(self.model)  # checkpointed for long micro-batches (activation_checkpointing_min_tokens)
        if self.args.activation_checkpointing_min_tokens and not self._layers:
            raise ValueError(f"activation_checkpointing_min_tokens={self.args.activation_checkpointing_min_tokens}: "
                             f"{type(self.model).__name__} has no transformers decoder layers to checkpoint "
                             "(GradientCheckpointingLayer); set it to 0")
        self._scored = None  # what TRL's _calculate_rewards saw for the current generation batch
        self._generation_round = 0  # generation batches trained on; seeds DCS identically on every rank

    # ----------------------------------------------------------------------------------------------------------------
    # Reward bookkeeping

    def _generate_and_score_completions(self, inputs):
        self._scored = None
        output = super()._generate_and_score_completions(inputs)
        release_freed_memory()  # the generation cache and the rollouts' temporaries, before the first micro-batch
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._scored = (inputs, prompts, completions, completion_ids_list, rewards_per_func)
        return rewards_per_func

    def _total_reward(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """Weighted sum over the reward functions that scored a row (TRL's nansum); NaN where none did. As in TRL's
        advantages, such an unscorable rollout is missing, not 0: the group baselines (nanmean/nanstd) leave it out,
        and it never counts as correct."""
        weights = self.reward_weights.to(rewards_per_func.device)
        total = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        return total.masked_fill(rewards_per_func.isnan().all(dim=1), torch.nan)

    def _scored_batch(self) -> ScoredBatch:
        """The generation batch TRL just scored (rewards are gathered by TRL; texts are gathered here)."""
        inputs, prompts, completions, completion_ids, rewards_per_func = self._scored
        rewards = self._total_reward(rewards_per_func)
        texts = [completion_text(c) for c in completions]
        all_texts = gather_object(texts) if self.accelerator.num_processes > 1 else texts
        return ScoredBatch(inputs, prompts, completions, texts, [list(ids) for ids in completion_ids], all_texts, rewards,
                           rewards >= self.args.correct_threshold, ~rewards.isnan(),
                           self.accelerator.process_index * len(prompts))

    def _rescore(self, batch: ScoredBatch, texts: list[str], completion_ids: list[list[int]]) -> torch.Tensor:
        """(B_global,) weighted total reward of other texts for this process's rows (e.g. constructions), through TRL's
        reward path (a collective call) but not recorded as the batch's scores.

        Reward functions may call `log_extra` / `log_metric`; TRL queues those in `_pending_extra_logs` /
        `_pending_metrics` and flushes the queue into the logs when it scores the *next* generation batch. Calls made
        while rescoring are dropped, so they neither add a second value to this batch's metrics nor land, misaligned,
        in the next batch's completion table."""
        completions = [text if isinstance(like, str) else [{"role": "assistant", "content": text}]
                       for like, text in zip(batch.completions, texts, strict=True)]
        queued = self._pending_extra_logs, self._pending_metrics
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        try:
            rewards_per_func = GRPOTrainer._calculate_rewards(self, batch.inputs, batch.prompts, completions,
                                                              completion_ids)
        finally:
            self._pending_extra_logs, self._pending_metrics = queued
        return self._total_reward(rewards_per_func)

    # ----------------------------------------------------------------------------------------------------------------
    # Loss plumbing

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extras):
        """TRL's, without the `trailing_padding` columns: the embedded default trains one-row micro-batches, each as
        wide as its generation batch's longest completion, so a short completion's padding went through every layer
        and the LM head. TRL returns 0 (log-prob and entropy) where the label is padding, so the dropped columns are
        put back as zeros: same shapes, same values, bit for bit (causal attention: no kept position sees them).
        Text batches only (images and other extras are indexed by position: passed through untouched). A training
        forward over at least `activation_checkpointing_min_tokens` kept positions checkpoints the decoder layers."""
        right = 0 if any(v is not None for v in extras.values()) else trailing_padding(attention_mask, logits_to_keep)
        end = input_ids.shape[1] - right
        with self._checkpointing_if_long(input_ids.shape[0] * end):
            logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
                model, input_ids[:, :end], attention_mask[:, :end], logits_to_keep - right, batch_size, compute_entropy,
                compute_aux_loss, **extras)
        if right == 0:
            return logps, entropies, aux_loss
        pad = lambda t: None if t is None else torch.nn.functional.pad(t, (0, right))  # noqa: E731
        return pad(logps), pad(entropies), aux_loss

    def _checkpointing_if_long(self, positions: int):
        """`checkpointing` of the decoder layers for a training forward over at least
        `activation_checkpointing_min_tokens` token positions; for any other forward, a block that changes nothing."""
        long = 0 < self.args.activation_checkpointing_min_tokens <= positions
        return checkpointing(self._layers, enabled=long and self.model.training and torch.is_grad_enabled())

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _accumulation_normalizer(self, count: torch.Tensor) -> torch.Tensor:
        """A global count of the generation batch, rescaled to one accumulation window (mirrors TRL's 'dapo'): the
        per-micro-batch sums divided by it add up to the mean over the generation batch."""
        normalizer = count.float().clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _backward_first(self, loss: torch.Tensor, inputs: dict, **parts: torch.Tensor) -> torch.Tensor:
        """Backpropagate `loss`, one term of this micro-batch's loss, now, and return it detached; the caller adds it
        to the terms it computes next and returns the sum, whose backward (Trainer.training_step) then covers only
        those. Same gradient (a sum of the terms' gradients, same scaling through `accelerator.backward`), but the
        activations of one forward are freed before the next forward runs, instead of all being alive until one
        backward: for TAPO, a row and its constructed row. Only in a single process (DDP, FSDP and DeepSpeed
        synchronize or count per backward) and in training; otherwise `loss` is returned as it is."""
        if not (self.model.training and torch.is_grad_enabled() and loss.requires_grad) or \
                self.accelerator.distributed_type != DistributedType.NO:
            return loss
        self._checked_finite(loss, inputs, **parts)
        self.accelerator.backward(loss)
        return loss.detach()

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
            write_tapo_state(os.path.join(staging, name), {"generation_round": self._generation_round, "step": self._step})
            self._write_model_card(os.path.join(staging, name), shown_as=target)
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
        state = read_tapo_state(checkpoint)
        if state is not None:
            self._generation_round, self._step = state["generation_round"], state["step"]

    # ----------------------------------------------------------------------------------------------------------------
    # Model card

    @property
    def methods(self) -> list[str]:
        """What the trainer runs, as the model card names it (the subclasses say)."""
        raise NotImplementedError

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's hook (GRPOTrainer calls it before every checkpoint; push_to_hub too): tapo's card, in output_dir,
        instead of TRL's, which is driven by the class attributes `_name` / `_paper` and can only say "GRPO"."""
        self._write_model_card(self.args.output_dir, model_name, dataset_name, tags)

    def save_model(self, output_dir=None, _internal_call=False):
        """Also puts the card beside the weights (final/; `_save_checkpoint` does it for checkpoint-N/)."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call:
            self._write_model_card(output_dir or self.args.output_dir)

    def _write_model_card(self, folder, model_name=None, dataset_name=None, tags=None, shown_as=None) -> None:
        """`shown_as`: the folder's path once in place, when it is written in a staging folder first."""
        if not self.is_world_process_zero():
            return
        base_model, base_model_text = describe_base_model(get_config_model_id(self.model.config))
        hub_id = self.args.hub_model_id
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = model_card(
            methods=self.methods, args=self.args, base_model=base_model, base_model_text=base_model_text,
            model_name=model_name or (hub_id.split("/")[-1] if hub_id else Path(self.args.output_dir).name),
            model_path=hub_id or str(shown_as or folder), steps_done=self.state.global_step,
            tags=sorted({*tags, *self._tag_names, *(m.lower() for m in self.methods)}),
            method_paper=GRPOTrainer._paper if self.methods == ["GRPO"] else None, dataset_name=dataset_name,
        )
        card.save(os.path.join(folder, "README.md"))
