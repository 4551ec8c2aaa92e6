"""Log-prob passes drop the completion columns that are padding in every row (`tapo.trainer_base.trailing_padding`):
a one-row micro-batch carries its generation batch's completion padding. The result must be TRL's own pass over the
full width, bit for bit: same shapes, the same values where a token is scored, 0 where it is padding."""

import pytest
import torch
from trl import GRPOTrainer

from tapo.trainer_base import trailing_padding

from scripted import generation_batch
from test_trainer import make_trainer


def mask(*rows: str) -> torch.Tensor:
    return torch.tensor([[int(c) for c in row] for row in rows])


@pytest.mark.parametrize("rows, completion_width, expected", [
    (["0011" "1100"], 4, 2),             # one row: 2 trailing pads (the prompt's leading pads stay)
    (["0011" "1100", "0111" "1110"], 4, 1),  # a column is kept when any row attends to it
    (["1111" "1111"], 4, 0),             # nothing to drop
    (["0001" "0000"], 4, 3),             # an empty completion (all masked): one column is kept
    (["0011" "1011"], 4, 0),             # a masked token inside the completion is not trailing padding
    (["11" "1000000"], 7, 6),
])
def test_trailing_padding(rows, completion_width, expected):
    assert trailing_padding(mask(*rows), completion_width) == expected


def test_one_row_passes_equal_trls_full_width_pass(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, tapo_enabled=False)
    batch = generation_batch(trainer)
    prompt_mask, completion_mask = batch["prompt_mask"], batch["completion_mask"]
    lengths = completion_mask.sum(1)
    assert lengths.min() < completion_mask.shape[1]  # some rows are right-padded (the scripted texts differ in length)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    width = completion_mask.shape[1]
    trimmed_some = False
    with torch.no_grad():
        for row in range(input_ids.shape[0]):
            ids, att = input_ids[row : row + 1], attention[row : row + 1]
            trimmed_some |= trailing_padding(att, width) > 0
            ours = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, width, compute_entropy=True)
            full = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, att, width,
                                                                   compute_entropy=True)
            for a, b in zip(ours[:2], full[:2]):
                assert a.shape == b.shape == (1, width)
                assert torch.equal(a, b)
                assert (a[0, int(lengths[row]):] == 0).all()
    assert trimmed_some
