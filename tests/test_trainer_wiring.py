"""TAPOTrainer's glue checked against independent recomputations, not against the trainer's own metrics.

The core functions (tapo/core) have hand-computed unit tests; these tests check that the trainer feeds them the right
things: L_ref recomputed from a forward pass of the model over the constructed rows (log-probs, entropies, OTS
weights hitting both clamps, advantages, the global normaliser with steps_per_generation > 1 and gradient
accumulation) for every aggregation; re-verification rejecting a construction that ends in a wrong answer; the
old-log-prob and reference-model branches (num_iterations > 1, beta > 0), the stored old log-probs on the second
pass after an optimizer step, the PEFT references (base model, or TRL's "ref" adapter copy); DAE advantages for
every ref_baseline and reward scaling; DCS picking a uniform random subset of the wrong rollouts; the TAPO counters
restored into a NEW trainer on resume. Generation is scripted (tests/scripted.py); everything after it is the real code.
"""

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer

from tapo.core.verify import math_reward
from tapo.runfolder import TAPO_STATE_FILE
from tapo.trainer import TAPOConfig, TAPOTrainer

from scripted import COLUMNS, K, PROBLEMS, generation_batch, script_generation, synthesis_for

SQRT_1_3 = 0.57735027  # unbiased std of a group [1, 1, 0, 0]
SQRT_4_14 = 0.53452248  # unbiased std of [1, 1, 0, 0] * 2 (pooled over the batch): sqrt(8 * 0.25 / 7)
SQRT_4_15 = 0.51639778  # unbiased std of [1, 1, 0, 0, 1, 1]: sqrt((4/9 + 8/9) / 5)
SQRT_24_99 = 0.49236596  # unbiased std of [1, 1, 0, 0, 1, 1] * 2: sqrt((8/9 + 16/9) / 11)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(model_dir, tmp_path, model=None, pattern="RRWW", synthesis=synthesis_for, peft_config=None,
                 **overrides):
    """TAPOTrainer (splice constructions, DCS n_pos=1, n_neg=2, m_max=2) over the two scripted problems."""
    torch.manual_seed(0)
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2 * len(pattern),
                  num_generations=len(pattern), max_completion_length=64, max_steps=1, learning_rate=1e-3,
                  report_to="none", logging_steps=1, save_strategy="no", seed=0, use_cpu=True, disable_tqdm=True,
                  loss_type="grpo", constructor="splice", n_pos=1, n_neg=2, m_max=2)
    kwargs.update(overrides)
    rows = [{"prompt": [{"role": "user", "content": f"Compute {p}. Put the answer in \\boxed{{}}."}], "answer": gold}
            for p, (gold, _, _) in PROBLEMS.items()]
    trainer = TAPOTrainer(model=model or AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[math_reward],
                          args=TAPOConfig(**kwargs), train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft_config)
    script_generation(trainer, pattern=pattern, synthesis=synthesis)
    return trainer


def sharpened_model(model_dir):
    """The tiny model with an untied LM head crafted so that OTS weights w = p * e^H hit both clamps.

    The head is the tied embedding x 5 (peaked enough that most tokens get p * e^H < 0.01) plus, on the row of the
    scripted texts' most frequent token, a push along the mean hidden state: where that token is the target, it
    gets a moderate p on top of a flat tail of high entropy, so p * e^H > 10."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "\n".join(right for _, right, _ in PROBLEMS.values())
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        frequent = int(torch.bincount(ids[0]).argmax())
        direction = hidden.mean(0) / hidden.mean(0).norm()
        head = model.lm_head.weight.detach().clone() * 5.0
        head[frequent] += 2.0 * direction
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    return model


def micro_batches(batch: dict, size: int) -> list[dict]:
    """Consecutive slices of `size` rows, as TRL splits a buffered generation batch (scalars are shared)."""
    n = batch["prompt_ids"].shape[0]
    return [{k: v[i : i + size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
            for i in range(0, n, size)]


def constructed_logps(trainer, model, batch, rows):
    """Log-probs and entropies of the constructed completion tokens, from one plain forward pass of `model`, under
    the trainer's autocast (TRL's default bf16, on CPU too): hence tolerances of ~1e-2 on single log-probs."""
    ids, mask = batch[COLUMNS["ids"]][rows], batch[COLUMNS["mask"]][rows]
    prompt = batch["prompt_ids"][rows]
    with torch.no_grad(), trainer.accelerator.autocast():
        logits = model(input_ids=torch.cat([prompt, ids], 1),
                       attention_mask=torch.cat([batch["prompt_mask"][rows], mask], 1)).logits
    logits = logits[:, prompt.shape[1] - 1 : -1].float() / trainer.temperature
    log_probs = logits.log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1), entropy


def expected_ref_loss(trainer, micro, whole, beta=None):
    """L_ref of one micro-batch, from scratch: per token -min(r A, clip(r) A) * w + beta * k3-KL, with
    w = clamp(exp(log p + H), ots_low, ots_high) and r = exp(log p - old); summed, then divided by the GLOBAL count of the
    whole generation batch `whole` (tokens, sequences or sequences x ref_max_length) x grad_accum / steps_per_gen.
    Reference log-probs come from a forward pass of trainer.ref_model; beta defaults to the trainer's.
    Returns (loss, raw OTS weights, ratios) of the constructed tokens."""
    a = trainer.args
    beta = trainer.beta if beta is None else beta
    rows = micro[COLUMNS["rows"]].nonzero().flatten()
    if rows.numel() == 0:  # no construction in this micro-batch: no L_ref
        return torch.tensor(0.0), torch.empty(0), torch.empty(0)
    mask = micro[COLUMNS["mask"]][rows].float()
    logp, entropy = constructed_logps(trainer, trainer.model, micro, rows)
    raw_w = (logp + entropy).exp()
    w = raw_w.clamp(a.ots_low, a.ots_high)
    old = micro[COLUMNS["old_logps"]][rows] if COLUMNS["old_logps"] in micro else logp
    ratio = (logp - old).exp()
    adv = micro[COLUMNS["advantages"]][rows].unsqueeze(1)
    clipped = ratio.clamp(1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv) * w
    if beta:
        ref, _ = constructed_logps(trainer, trainer.ref_model, micro, rows)
        per_token = per_token + beta * ((ref - logp).exp() - (ref - logp) - 1)
    all_masks = whole[COLUMNS["mask"]][whole[COLUMNS["rows"]]].float()
    n_tokens, n_seqs = all_masks.sum(), all_masks.shape[0]
    window = a.gradient_accumulation_steps / a.steps_per_generation
    if a.ref_loss_aggregation == "token_mean":
        loss = (per_token * mask).sum() / (n_tokens * window)
    elif a.ref_loss_aggregation == "seq_mean_token_mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1)).sum() / (n_seqs * window)
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (n_seqs * a.ref_max_length * window)
    return loss, raw_w[mask.bool()], ratio[mask.bool()]


def trainer_ref_loss(trainer, micro):
    """(L_total - L_GRPO) / lambda, with L_GRPO from TRL's own GRPOTrainer._compute_loss on the same micro-batch."""
    with torch.no_grad():
        total = trainer._compute_loss(trainer.model, micro)
        grpo = GRPOTrainer._compute_loss(trainer, trainer.model, micro)
    return (total - grpo) / trainer.args.ref_loss_weight


def uneven_synthesis(prompt: str) -> str:
    """A correct synthesis, with a much longer reflection for one problem: constructions of unequal length, so that
    the per-sequence and per-token means differ."""
    extra = " Let me redo every step slowly and check each sum twice before going on." * 2 if "7 + 8 + 9" in prompt else ""
    return synthesis_for(prompt).replace("Wait, the first step is wrong.", "Wait, the first step is wrong." + extra)


def test_ref_loss_matches_an_independent_recomputation_for_every_aggregation(tiny_model_dir, tmp_path):
    # 8 rows per generation, 2 rows per micro-batch: 4 micro-steps per generation, 2 per optimizer step, so the
    # normaliser's grad_accum / steps_per_generation = 1/2 matters, and TRL computes old log-probs.
    trainer = make_trainer(tiny_model_dir, tmp_path, model=sharpened_model(tiny_model_dir), per_device_train_batch_size=2,
                           steps_per_generation=4, gradient_accumulation_steps=2, ref_loss_weight=0.5,
                           constructor="self", synthesis=uneven_synthesis, ref_max_length=400)
    whole = generation_batch(trainer)
    trainer.current_gradient_accumulation_steps = 2
    assert int(whole[COLUMNS["rows"]].sum()) == 4 and COLUMNS["old_logps"] in whole
    lengths = whole[COLUMNS["mask"]].sum(1)[whole[COLUMNS["rows"]]]
    assert lengths.max() > 1.3 * lengths.min()
    ref_losses = {}
    for aggregation in ("token_mean", "seq_mean_token_mean", "dr_grpo"):
        trainer.args.ref_loss_aggregation = aggregation
        weights = []
        for micro in micro_batches(whole, 2):
            expected, raw_w, ratio = expected_ref_loss(trainer, micro, whole)
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=2e-2, rtol=0)  # first pass: old = current
            torch.testing.assert_close(trainer_ref_loss(trainer, micro), expected, atol=2e-4, rtol=2e-3)
            weights.append(raw_w)
        ref_losses[aggregation] = sum(expected_ref_loss(trainer, m, whole)[0] for m in micro_batches(whole, 2))
        weights = torch.cat(weights)
        assert (weights < 0.01).any() and (weights > 10).any()  # both OTS clamps bite
        assert ((weights > 0.01) & (weights < 10)).any()
    # The three aggregations really are different numbers here, so one cannot pass for another.
    values = sorted(abs(v.item()) for v in ref_losses.values())
    assert values[0] > 0 and values[1] > 1.03 * values[0] and values[2] > 1.03 * values[1]  # >> the rtol above


def wrong_synthesis(prompt: str) -> str:
    """A well-formed synthesis (it parses and assembles) whose corrected solution ends in a wrong answer."""
    return synthesis_for(prompt).replace("\\boxed{56}", "\\boxed{57}").replace("\\boxed{24}", "\\boxed{23}")


def test_a_construction_with_a_wrong_final_answer_is_rejected_and_never_trained_on(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    import tapo.trainer

    built = []

    def spy(*args, **kwargs):
        result = construct(*args, **kwargs)
        built.extend(result)
        return result

    construct = tapo.trainer.construct
    monkeypatch.setattr(tapo.trainer, "construct", spy)
    trainer = make_trainer(tiny_model_dir, tmp_path, constructor="self", synthesis=wrong_synthesis)
    batch = generation_batch(trainer)

    assert len(built) == 4 and all(c.parsed and c.trajectory is not None for c in built)  # assembled ...
    assert all("\\boxed{57}" in c.trajectory.text or "\\boxed{23}" in c.trajectory.text for c in built)
    metrics = trainer._metrics["train"]
    assert metrics["tapo/constructions_attempted"] == [4.0] and metrics["tapo/constructions_parsed"] == [4.0]
    assert metrics["tapo/constructions_accepted"] == [0.0]  # ... but re-verification rejects every one
    assert not batch[COLUMNS["rows"]].any() and int(batch[COLUMNS["num_items"]]) == 0
    assert not batch[COLUMNS["mask"]].any() and not batch[COLUMNS["advantages"]].any()

    # Nothing of them is trained on: loss and gradient are exactly TRL's GRPO ones.
    model = trainer.model
    model.zero_grad()
    trainer._compute_loss(model, batch).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    GRPOTrainer._compute_loss(trainer, model, batch).backward()
    for a, b in zip(ours, (p.grad for p in model.parameters()), strict=True):
        assert torch.equal(a, b)
    assert "tapo/loss_ref" not in metrics


def test_old_logps_and_reference_branches_with_several_iterations_and_kl(tiny_model_dir, tmp_path):
    # The policy is the sharpened model, the reference model (loaded by TRL from the folder) the plain one: KL > 0.
    trainer = make_trainer(tiny_model_dir, tmp_path, model=sharpened_model(tiny_model_dir), num_iterations=2, beta=0.04,
                           per_device_train_batch_size=K, steps_per_generation=2, gradient_accumulation_steps=2)
    whole = generation_batch(trainer)
    trainer.current_gradient_accumulation_steps = 2
    assert COLUMNS["old_logps"] in whole and COLUMNS["ref_logps"] in whole  # both branches ran
    assert trainer.ref_model is not None
    rows = whole[COLUMNS["rows"]].nonzero().flatten()
    mask = whole[COLUMNS["mask"]][rows].bool()
    ref_logps, _ = constructed_logps(trainer, trainer.ref_model, whole, rows)
    torch.testing.assert_close(whole[COLUMNS["ref_logps"]][rows][mask], ref_logps[mask], atol=2e-2, rtol=0)
    current, _ = constructed_logps(trainer, trainer.model, whole, rows)
    torch.testing.assert_close(whole[COLUMNS["old_logps"]][rows][mask], current[mask], atol=2e-2, rtol=0)  # ratio 1
    assert (current - ref_logps)[mask].abs().mean() > 0.5  # the KL term is far from zero

    for micro in micro_batches(whole, K):
        expected, _, ratio = expected_ref_loss(trainer, micro, whole)
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=2e-2, rtol=0)
        torch.testing.assert_close(trainer_ref_loss(trainer, micro), expected, atol=2e-4, rtol=2e-3)
        # ... and that number holds a KL term of real size: without it L_ref would be clearly different.
        assert abs((expected - expected_ref_loss(trainer, micro, whole, beta=0.0)[0]).item()) > 1e-2



def test_second_pass_ratios_use_the_stored_old_logps_and_the_ots_bounds(tiny_model_dir, tmp_path):
    # num_iterations=2: the generation batch is trained on twice. After the first pass's optimizer step the policy
    # has moved, so the constructed rows' ratios r = exp(log p - old) are no longer 1: old must be the stored
    # no-grad log-probs from generation time. Non-default OTS bounds and clip range, all of which bite.
    trainer = make_trainer(tiny_model_dir, tmp_path, model=sharpened_model(tiny_model_dir), num_iterations=2,
                           per_device_train_batch_size=K, steps_per_generation=2, gradient_accumulation_steps=2,
                           ots_low=0.3, ots_high=3.0, epsilon=0.02, epsilon_high=0.05, constructor="self",
                           synthesis=uneven_synthesis, ref_max_length=400)
    whole = generation_batch(trainer)
    trainer.current_gradient_accumulation_steps = 2
    # Negative advantages in the second micro-batch, as a construction gets when it scores below its group's mean
    # (non-binary rewards): only there does the lower clip epsilon_low matter.
    whole[COLUMNS["advantages"]][K:] *= -1
    # A step small enough that OTS weights stay on both sides of the bounds (AdamW moves every weight by ~lr).
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-4)
    for micro in micro_batches(whole, K):  # the first pass: one optimizer step over the generation batch
        trainer._compute_loss(trainer.model, micro).backward()
    optimizer.step()

    ratios = []
    for micro in micro_batches(whole, K):  # the second pass
        expected, _, ratio = expected_ref_loss(trainer, micro, whole)
        torch.testing.assert_close(trainer_ref_loss(trainer, micro), expected, atol=2e-4, rtol=2e-3)
        ratios.append(ratio)
    # Any one default setting would give another L_ref for the generation batch, by far more than the tolerance above.
    total = sum(expected_ref_loss(trainer, micro, whole)[0] for micro in micro_batches(whole, K))
    for owner, name, default in ((trainer.args, "ots_low", 0.01), (trainer.args, "ots_high", 10.0),
                                 (trainer, "epsilon_low", 0.2), (trainer, "epsilon_high", 0.2)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(owner, name, default)
            other = sum(expected_ref_loss(trainer, micro, whole)[0] for micro in micro_batches(whole, K))
        assert abs((other - total).item()) > 5 * (2e-4 + 2e-3 * abs(total.item()))
    assert (torch.cat(ratios) - 1).abs().mean() > 0.05  # far beyond the bf16 noise of the tolerance above


# Rewards [1, 1, 0, 0] in both groups; every accepted construction has reward 1.
@pytest.mark.parametrize(("ref_baseline", "scale", "original", "constructed"), [
    ("orig", "group", 0.5 / (SQRT_1_3 + 1e-4), 0.5 / (SQRT_1_3 + 1e-4)),
    ("orig", "batch", 0.5 / (SQRT_4_14 + 1e-4), 0.5 / (SQRT_4_14 + 1e-4)),
    ("orig", "none", 0.5, 0.5),
    # G_ref = {1, 1}: its own mean is 1, so A = 0 whatever the scale (the "batch" std of all constructions is 0).
    ("ref", "group", 0.5 / (SQRT_1_3 + 1e-4), 0.0),
    ("ref", "batch", 0.5 / (SQRT_4_14 + 1e-4), 0.0),
    ("ref", "none", 0.5, 0.0),
    # U = the group with its two accepted constructions, [1, 1, 0, 0, 1, 1]: mean 2/3, unbiased std sqrt(4/15); the
    # "batch" std pools both unions (8 ones, 4 zeros): sqrt((8/9 + 16/9) / 11).
    ("union", "group", 0.5 / (SQRT_1_3 + 1e-4), (1 / 3) / (SQRT_4_15 + 1e-4)),
    ("union", "batch", 0.5 / (SQRT_4_14 + 1e-4), (1 / 3) / (SQRT_24_99 + 1e-4)),
    ("union", "none", 0.5, 1 / 3),
])
def test_constructed_advantages_follow_ref_baseline_and_scale_rewards(tiny_model_dir, tmp_path, ref_baseline, scale,
                                                                      original, constructed):
    trainer = make_trainer(tiny_model_dir, tmp_path, ref_baseline=ref_baseline, scale_rewards=scale)
    batch = generation_batch(trainer)
    right = torch.tensor([r % K < 2 for r in range(2 * K)])  # scripted: members 0, 1 right, 2, 3 wrong
    torch.testing.assert_close(batch["advantages"].cpu(), torch.where(right, original, -original), atol=1e-5, rtol=0)
    rows = batch[COLUMNS["rows"]].cpu()
    assert rows.tolist() == (~right).tolist()  # every wrong rollout repaired, on its own row
    torch.testing.assert_close(batch[COLUMNS["advantages"]].cpu(), torch.where(rows, constructed, 0.0), atol=1e-5, rtol=0)


def test_dcs_picks_a_uniform_random_subset_of_the_wrong_rollouts(tiny_model_dir, tmp_path):
    # Groups of 8 with 6 wrong rollouts (members 2..7) and m_max = 2: each generation round picks 2 of the 6 per group.
    trainer = make_trainer(tiny_model_dir, tmp_path, pattern="RRWWWWWW", n_neg=2, m_max=2)
    counts = torch.zeros(8)
    picks = []
    rounds = 8
    for _ in range(rounds):
        rows = generation_batch(trainer)[COLUMNS["rows"]].cpu().view(2, 8)
        counts += rows.sum(0)
        picks += [tuple(group.nonzero().flatten().tolist()) for group in rows]
    assert counts[:2].sum() == 0 and counts.sum() == 2 * 2 * rounds
    # Pearson's chi-square over the 6 wrong members against uniform (expected 32 / 6 each): a correct sampler
    # exceeds 20 with probability < 0.2 % (5 degrees of freedom; sampling without replacement only lowers it),
    # "always the first m_max" scores 64, "the same pair every round" at least 37.
    expected = counts.sum() / 6
    chi_square = ((counts[2:] - expected) ** 2 / expected).sum().item()
    assert chi_square < 20, (counts.tolist(), chi_square)
    assert len(set(picks)) >= 6  # the choice varies from round to round and group to group

    # Another seed gives other picks for the same rounds.
    other = make_trainer(tiny_model_dir, tmp_path / "other", pattern="RRWWWWWW", n_neg=2, m_max=2, seed=1)
    other_picks = [tuple(group.nonzero().flatten().tolist())
                   for _ in range(rounds) for group in generation_batch(other)[COLUMNS["rows"]].cpu().view(2, 8)]
    assert other_picks != picks
    # The same seed gives the same picks again (a resumed or repeated run constructs the same rows).
    again = make_trainer(tiny_model_dir, tmp_path / "again", pattern="RRWWWWWW", n_neg=2, m_max=2)
    assert [tuple(group.nonzero().flatten().tolist())
            for _ in range(rounds) for group in generation_batch(again)[COLUMNS["rows"]].cpu().view(2, 8)] == picks


def test_re_verification_gives_the_reward_functions_the_constructed_token_ids(tiny_model_dir, tmp_path):
    """Reward functions that read `completion_ids` (TRL's signature) see, when constructions are re-verified, each
    constructed row's own tokens, and no tokens for the rows that have no construction."""
    trainer = make_trainer(tiny_model_dir, tmp_path)
    seen, real = [], trainer.reward_funcs[0]

    def recording_reward(prompts, completions, completion_ids, **kwargs):
        seen.append([list(ids) for ids in completion_ids])
        return real(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)

    trainer.reward_funcs[0] = recording_reward
    batch = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in generation_batch(trainer).items()}
    rollouts, constructions = seen  # scoring the rollouts, then re-verifying the constructions
    assert rollouts == [ids[mask.bool()].tolist() for ids, mask in zip(batch["completion_ids"], batch["completion_mask"])]
    rows = batch[COLUMNS["rows"]]
    assert int(rows.sum()) == 4
    assert constructions == [ids[mask.bool()].tolist() if row else []
                             for ids, mask, row in zip(batch[COLUMNS["ids"]], batch[COLUMNS["mask"]], rows)]


def test_resume_restores_the_tapo_counters_into_a_new_trainer(tiny_model_dir, tmp_path):
    first = make_trainer(tiny_model_dir, tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    first.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert json.loads((checkpoint / TAPO_STATE_FILE).read_text()) == {"generation_round": 2, "step": 2}

    # A new trainer (new process in real life): counters start at 0 and come back only from the checkpoint.
    resumed = make_trainer(tiny_model_dir, tmp_path, max_steps=3, save_strategy="no")
    assert resumed._generation_round == 0 and resumed._step == 0
    rounds_seen = []
    attach = resumed._attach_constructions

    def record(output):
        rounds_seen.append(resumed._generation_round)
        attach(output)

    resumed._attach_constructions = record
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert rounds_seen == [2]  # DCS of the one new generation is seeded by round 3, not round 1
    assert resumed._generation_round == 3 and resumed._step == 3
    # The optimizer state came back too: AdamW has taken 3 steps, not 1.
    assert {int(state["step"]) for state in resumed.optimizer.state.values()} == {3}
    assert math.isfinite(resumed.state.log_history[-1]["train_loss"])


def randomize_lora(model, seed=1, scale=1.0):
    """Random LoRA B matrices of the active adapter (seeded): the adapter then really changes the model (LoRA starts
    from B = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def pretrained_adapter(model_dir, lora):
    """The tiny model with a LoRA adapter that changes it (seeded: the same adapter on every call)."""
    from peft import get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    randomize_lora(model)
    return model


@pytest.mark.parametrize("adapter", ["new", "pretrained"])
def test_peft_reference_is_the_base_model_or_the_ref_adapter_copy(tiny_model_dir, tmp_path, monkeypatch, adapter):
    # With PEFT TRL has no ref_model: for a new adapter (peft_config) the reference is the base model, adapters off;
    # for a pretrained adapter (a PeftModel passed in, beta > 0) TRL copies it as adapter "ref" at start. Each policy
    # is then moved away from its reference (as training would), so that policy, base and reference all differ.
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=adapter == "new")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    settings = dict(beta=0.04, per_device_train_batch_size=K, steps_per_generation=2)
    if adapter == "new":
        trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=lora, **settings)
        reference = base
    else:
        trainer = make_trainer(tiny_model_dir, tmp_path, model=pretrained_adapter(tiny_model_dir, lora), **settings)
        assert set(trainer.model.peft_config) == {"default", "ref"}
        reference = pretrained_adapter(tiny_model_dir, lora)  # the adapter as it was when training started
    assert trainer.ref_model is None
    randomize_lora(trainer.model, seed=2, scale=2.0)  # "training" moved the policy's adapter
    calls = []
    real = trainer._get_per_token_logps_and_entropies

    def spy(model, input_ids, *args, **kwargs):
        calls.append(kwargs.get("batch_size"))
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", spy)
    whole = generation_batch(trainer)
    assert calls and set(calls) == {K}  # chunked like TRL's own reference pass (the generation batch holds 2K rows)
    rows = whole[COLUMNS["rows"]].nonzero().flatten()
    assert rows.numel() == 4
    mask = whole[COLUMNS["mask"]][rows].bool()
    expected, _ = constructed_logps(trainer, reference, whole, rows)
    torch.testing.assert_close(whole[COLUMNS["ref_logps"]][rows][mask], expected[mask], atol=2e-2, rtol=0)
    # ... and not the policy, nor (for a pretrained adapter) the base model.
    for other in [trainer.model] + ([base] if adapter == "pretrained" else []):
        logps, _ = constructed_logps(trainer, other, whole, rows)
        assert (logps - expected)[mask].abs().mean() > 0.1


def test_a_loss_computed_in_evaluation_is_logged_under_eval(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    batch = generation_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    assert len(trainer._metrics["eval"]["tapo/loss_grpo"]) == 1 and len(trainer._metrics["eval"]["tapo/loss_ref"]) == 1
    assert "tapo/loss_grpo" not in trainer._metrics["train"]
