"""The loss side's log-prob pass of one default step: TRL's pass over the full padded width (every position through the
LM head) vs tapo's (trailing completion padding dropped, only labelled positions through the head).

One generation batch of the embedded default is generated once; then each variant runs the forward and backward of
every row as its own micro-batch (how the default trains), in rounds that alternate which goes first, in the same
process: the ratio tapo / TRL is the median over rounds of the per-round ratio, so a shared machine's slow phases hit
both sides. Also printed: how many positions each variant runs through the layers and the head, and the largest
log-prob difference (float rounding: the head's GEMMs change shape).

    python benchmarks/logprob_pass.py --quick    # tiny model, seconds
    python benchmarks/logprob_pass.py            # SmolLM2-135M, the embedded default (~6 min on 2 cores)
    python benchmarks/logprob_pass.py --full     # GPU: 64 rollouts of up to 512 tokens, bf16 (the head is compact there
                                                 # under TRL too, so only the padding differs)
"""

from __future__ import annotations

import statistics
import time

import torch
import trl.trainer.utils as trl_utils
from common import RESULTS, TASK, benchmark_parser, machine, make_config, parse_settings, set_threads, write_json
from trl import GRPOTrainer

from tapo.run import build_trainer, load_train_set
from tapo.trainer_base import trailing_padding

MODES = {
    "quick": dict(model="tiny", dataset=TASK, n_train=16, max_completion_length=32, max_steps=1),
    "default": dict(model="smollm2-135m", dataset=TASK, max_steps=1),  # the rest: the embedded CPU default
    "full": dict(model="smollm2-135m", dataset=TASK, n_train=1024, per_device_train_batch_size=8,
                 gradient_accumulation_steps=8, max_completion_length=512, max_steps=1, bf16=True),
}
ROUNDS = {"quick": 2, "default": 3, "full": 3}


def row_passes(trainer, ids: torch.Tensor, attention: torch.Tensor, width: int, tapo: bool) -> tuple[float, torch.Tensor]:
    """Seconds for the forward + backward of every row alone, and the rows' log-probs (B, completion `width`)."""
    scored = trainer._get_per_token_logps_and_entropies if tapo else \
        (lambda *args, **kwargs: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *args, **kwargs))
    logps = []
    start = time.perf_counter()
    for row in range(ids.shape[0]):
        lp, entropy, _ = scored(trainer.model, ids[row : row + 1], attention[row : row + 1], width, compute_entropy=True)
        (lp.sum() + entropy.sum()).backward()
        logps.append(lp.detach())
    seconds = time.perf_counter() - start
    trainer.model.zero_grad()
    return seconds, torch.cat(logps)


def main() -> None:
    parser = benchmark_parser(__doc__)
    args = parser.parse_args()
    mode = args.mode or "default"
    set_threads(args.threads)
    run, config, _ = make_config({**MODES[mode], **parse_settings(args.set)})
    trainer = build_trainer(run, config, load_train_set(run, config.seed))  # on the CPU: the compact head is set
    labelled_only = trl_utils._use_triton
    every_position = getattr(labelled_only, "trl_use_triton", labelled_only)  # TRL's switch before tapo wrapped it
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = config.gradient_accumulation_steps
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    lengths = batch["completion_mask"].sum(1)
    prompt_width, width = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    rows = len(lengths)
    positions = {"layers_trl": rows * ids.shape[1], "head_trl": rows * (ids.shape[1] - 1),
                 "layers_tapo": sum(ids.shape[1] - trailing_padding(attention[r : r + 1], width) for r in range(rows)),
                 "head_tapo": int(lengths.sum())}
    print(f"{rows} rows, prompt width {prompt_width}, completion width {width}, completion lengths "
          f"{lengths.tolist()}\npositions through the layers: TRL {positions['layers_trl']}, tapo "
          f"{positions['layers_tapo']}; through the LM head: TRL {positions['head_trl']}, tapo {positions['head_tapo']}",
          flush=True)

    times, logps = {"trl": [], "tapo": []}, {}
    for round_ in range(ROUNDS[mode]):
        for name in ("trl", "tapo") if round_ % 2 == 0 else ("tapo", "trl"):
            trl_utils._use_triton = labelled_only if name == "tapo" else every_position
            seconds, logps[name] = row_passes(trainer, ids, attention, width, tapo=name == "tapo")
            times[name].append(seconds)
            print(f"round {round_ + 1}: {name} {seconds:.2f} s", flush=True)
    trl_utils._use_triton = labelled_only
    ratio = statistics.median(t / r for t, r in zip(times["tapo"], times["trl"], strict=True))
    diff = (logps["tapo"] - logps["trl"]).abs().max().item()
    print(f"tapo / TRL: {ratio:.3f} (median of {ROUNDS[mode]} alternating rounds); max |log-prob difference| {diff:.2e}")
    write_json(RESULTS / f"logprob_pass_{mode}.json",
               {"mode": mode, "machine": machine(), "rows": rows, "prompt_width": prompt_width,
                "completion_width": width, "completion_lengths": lengths.tolist(), "positions": positions,
                "seconds": times, "ratio_tapo_over_trl": ratio, "max_abs_logprob_diff": diff})


if __name__ == "__main__":
    main()
