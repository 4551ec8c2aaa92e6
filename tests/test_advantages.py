import math

import pytest
import torch

from tapo.core.advantages import (
    ADVANTAGE_ESTIMATORS,
    decoupled_advantages,
    get_advantage_estimator,
    grpo_advantages,
    register_advantage,
)

NAN = float("nan")
# Row 0: one of four correct; row 1: two of four.
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
SQRT3 = math.sqrt(3.0)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_group_scale():
    # Row 0: mean 0.25, squared deviations 0.5625 + 3 * 0.0625 = 0.75, unbiased var 0.75 / 3 = 0.25, std 0.5
    #   -> 0.75 / 0.5 = 1.5 and -0.25 / 0.5 = -0.5.
    # Row 1: mean 0.5, squared deviations 4 * 0.25 = 1, var 1 / 3, std 1 / sqrt(3) -> +-0.5 * sqrt(3).
    h = 0.5 * SQRT3
    close(grpo_advantages(REWARDS, eps=0.0), [[1.5, -0.5, -0.5, -0.5], [h, h, -h, -h]])


def test_default_eps_is_trls_1e4():
    # Row 0 with std 0.5: 0.75 / (0.5 + 1e-4).
    close(grpo_advantages(REWARDS)[0, 0], 0.75 / 0.5001)


def test_batch_scale_pools_std_but_keeps_group_means():
    # All 8 rewards: mean 3/8, squared deviations 3 * 0.625^2 + 5 * 0.375^2 = 1.171875 + 0.703125 = 1.875,
    # unbiased var 1.875 / 7, std 0.5175492. Deviations still from the group means 0.25 and 0.5.
    std = math.sqrt(1.875 / 7)
    expected = [[0.75 / std] + [-0.25 / std] * 3, [0.5 / std] * 2 + [-0.5 / std] * 2]
    close(grpo_advantages(REWARDS, eps=0.0, scale="batch"), expected)


def test_none_scale_only_centres():
    close(grpo_advantages(REWARDS, scale="none"), [[0.75, -0.25, -0.25, -0.25], [0.5, 0.5, -0.5, -0.5]])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_single_rollout_groups_get_zero(scale):
    # K = 1: the group std is undefined and every reward equals its group mean.
    advantages = grpo_advantages(torch.tensor([[0.0], [1.0]]), scale=scale)
    assert torch.equal(advantages, torch.zeros(2, 1))


def test_nan_rewards_are_excluded_and_get_zero():
    # Row 0 scorable [1, 0, 0]: mean 1/3, squared deviations 4/9 + 2 * 1/9 = 6/9, var (6/9) / 2 = 1/3, std 1/sqrt(3)
    #   -> (2/3) * sqrt(3) = 1.1547 and -(1/3) * sqrt(3) = -0.57735; the NaN slot gets 0.
    # Row 1 has one scorable reward (std undefined) and row 2 none: all 0.
    rewards = torch.tensor([[1.0, 0.0, NAN, 0.0], [1.0, NAN, NAN, NAN], [NAN, NAN, NAN, NAN]])
    a, b = 2 / 3 * SQRT3, -1 / 3 * SQRT3
    close(grpo_advantages(rewards, eps=0.0), [[a, b, 0.0, b], [0.0] * 4, [0.0] * 4])


def test_integer_rewards_are_accepted():
    close(grpo_advantages(torch.tensor([[1, 0, 0, 0]]), eps=0.0), [[1.5, -0.5, -0.5, -0.5]])


def test_matches_trl_formula():
    # The lines of TRL 1.16 `_generate_and_score_completions` (sum_then_normalize), with TRL's own nanstd.
    from trl.trainer.utils import nanstd  # a declared dependency: a moved module must fail, not skip
    rewards = torch.tensor([[0.3, 1.0, NAN, 0.0, 0.7], [2.0, -1.0, 0.5, 0.5, 0.0]])
    flat, k = rewards.reshape(-1), rewards.shape[1]
    mean = torch.nanmean(rewards, dim=1).repeat_interleave(k)
    for scale, std in [("group", nanstd(rewards, dim=1).repeat_interleave(k)), ("batch", nanstd(flat).expand(10))]:
        trl = torch.nan_to_num((flat - mean) / (std + 1e-4), nan=0.0).view(2, k)
        torch.testing.assert_close(grpo_advantages(rewards, scale=scale), trl)
    torch.testing.assert_close(grpo_advantages(rewards, scale="none"), torch.nan_to_num(flat - mean).view(2, k))


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(0, 4), torch.zeros(2, 2, 2)])
def test_rewards_must_be_a_matrix(bad):
    with pytest.raises(ValueError, match=r"\(G, K\)"):
        grpo_advantages(bad)


def test_unknown_scale_is_rejected():
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(REWARDS, scale="global")


def test_dae_orig_baseline_scores_against_the_original_group():
    # Row 0 (p = 0.25, std 0.5): a repaired trajectory gets (1 - 0.25) / 0.5 = 1.5.
    # Row 1 (p = 0.5, std 1/sqrt(3)): (1 - 0.5) * sqrt(3) = 0.866; a failed one (0) gets -0.866.
    orig, ref = decoupled_advantages(REWARDS, [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])], eps=0.0)
    torch.testing.assert_close(orig, grpo_advantages(REWARDS, eps=0.0))
    close(ref[0], [1.5, 1.5])
    close(ref[1], [0.5 * SQRT3, -0.5 * SQRT3])


def test_dae_ref_baseline_uses_the_constructions_own_group():
    # [1, 0, 0]: mean 1/3, std 1/sqrt(3) -> [1.1547, -0.57735, -0.57735]. All-correct [1, 1]: std 0 -> 0.
    # A single construction [1]: std undefined -> 0.
    ref_rewards = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0])]
    _, ref = decoupled_advantages(REWARDS, ref_rewards, eps=0.0, ref_baseline="ref")
    close(ref[0], [2 / 3 * SQRT3, -1 / 3 * SQRT3, -1 / 3 * SQRT3])
    close(ref[1], [0.0, 0.0])
    _, ref = decoupled_advantages(REWARDS[:1], [torch.tensor([1.0])], ref_baseline="ref")
    close(ref[0], [0.0])


def test_dae_union_baseline_pools_the_group_with_its_constructions():
    # Row 0: union [1, 0, 0, 0, 1, 1]: mean 0.5, squares 6 * 0.25 = 1.5, unbiased std sqrt(1.5 / 5) = sqrt(0.3);
    # each accepted construction gets 0.5 / sqrt(0.3) = 0.91287. Row 1: union [1, 1, 0, 0, 0]: mean 0.4, squares
    # 2 * 0.36 + 3 * 0.16 = 1.2, std sqrt(1.2 / 4) = sqrt(0.3); a failed construction gets -0.4 / sqrt(0.3).
    ref_rewards = [torch.tensor([1.0, 1.0]), torch.tensor([0.0])]
    orig, ref = decoupled_advantages(REWARDS, ref_rewards, eps=0.0, ref_baseline="union")
    torch.testing.assert_close(orig, grpo_advantages(REWARDS, eps=0.0))  # original rows: exactly GRPO's
    close(ref[0], [0.5 / math.sqrt(0.3)] * 2)
    close(ref[1], [-0.4 / math.sqrt(0.3)])
    # scale="batch": one std over all 11 rewards of both unions (5 ones, 6 zeros): squares 5 * 36/121 + 6 * 25/121
    # = 330/121, std sqrt(3/11); the means stay per union.
    _, ref = decoupled_advantages(REWARDS, ref_rewards, eps=0.0, ref_baseline="union", scale="batch")
    close(ref[0], [0.5 / math.sqrt(3 / 11)] * 2)
    close(ref[1], [-0.4 / math.sqrt(3 / 11)])
    # A NaN construction reward stays out of the union's statistics and gets 0.
    _, ref = decoupled_advantages(REWARDS, [torch.tensor([1.0, 1.0, NAN]), torch.tensor([])], eps=0.0,
                                  ref_baseline="union")
    close(ref[0], [0.5 / math.sqrt(0.3)] * 2 + [0.0])


def test_dae_zero_std_original_group_gives_zero_not_inf():
    # All-wrong original group: (1 - 0) / (0 + eps) would be 1e4; the degenerate group carries no signal -> 0.
    # With scale="none" nothing is divided, so the plain difference 1 - 0 stands.
    all_wrong = torch.zeros(1, 4)
    _, ref = decoupled_advantages(all_wrong, [torch.tensor([1.0])])
    close(ref[0], [0.0])
    _, ref = decoupled_advantages(all_wrong, [torch.tensor([1.0])], scale="none")
    close(ref[0], [1.0])


def test_dae_batch_scale_divides_by_the_pooled_original_std():
    # Pooled std of the 8 original rewards is sqrt(1.875 / 7) (see test_batch_scale...): (1 - 0.25) / 0.5175492.
    _, ref = decoupled_advantages(REWARDS, [torch.tensor([1.0]), torch.tensor([])], eps=0.0, scale="batch")
    close(ref[0], [0.75 / math.sqrt(1.875 / 7)])


@pytest.mark.parametrize("ref_baseline", ["orig", "ref", "union"])
def test_dae_empty_groups_stay_empty(ref_baseline):
    _, ref = decoupled_advantages(REWARDS, [torch.tensor([]), torch.tensor([])], ref_baseline=ref_baseline)
    assert [tuple(r.shape) for r in ref] == [(0,), (0,)]


def test_dae_nan_construction_reward_gets_zero():
    _, ref = decoupled_advantages(REWARDS[:1], [torch.tensor([1.0, NAN])], eps=0.0)
    close(ref[0], [1.5, 0.0])


@pytest.mark.parametrize("ref_baseline", ["orig", "ref", "union"])
def test_dae_constructions_never_move_original_advantages(ref_baseline):
    expected = grpo_advantages(REWARDS)
    for ref_rewards in ([torch.tensor([1.0]), torch.tensor([])], [torch.tensor([0.0, 5.0, -3.0]), torch.ones(4)]):
        orig, _ = decoupled_advantages(REWARDS, ref_rewards, ref_baseline=ref_baseline)
        assert torch.equal(orig, expected)


def test_dae_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2 queries"):
        decoupled_advantages(REWARDS, [torch.tensor([1.0])])
    with pytest.raises(ValueError, match=r"ref_rewards\[1\] must be 1-D"):
        decoupled_advantages(REWARDS, [torch.tensor([1.0]), torch.ones(1, 2)])
    with pytest.raises(ValueError, match="ref_baseline"):
        decoupled_advantages(REWARDS, [torch.tensor([]), torch.tensor([])], ref_baseline="both")


def test_registry():
    assert get_advantage_estimator("grpo") is grpo_advantages
    assert get_advantage_estimator("tapo_dae") is decoupled_advantages
    with pytest.raises(KeyError, match=r"'gae'.*\['grpo', 'tapo_dae'\]"):
        get_advantage_estimator("gae")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda rewards: rewards)


def test_register_new_estimator():
    try:
        register_advantage("test_centred")(lambda rewards: rewards - rewards.mean())
        close(get_advantage_estimator("test_centred")(torch.tensor([1.0, 3.0])), [-1.0, 1.0])
    finally:
        ADVANTAGE_ESTIMATORS.pop("test_centred", None)


def test_dae_nan_in_the_original_group_is_missing_from_its_baseline():
    # Original [1, 1, 0, NaN] (the 4th unscorable, as TRL marks it): the scored three have mean 2/3 and unbiased std
    # sqrt((1/9 + 1/9 + 4/9) / 2) = sqrt(1/3); a construction with reward 1 gets (1/3) / sqrt(1/3) = sqrt(1/3) under
    # "orig". Under "union" the pool is [1, 1, 0, 1] (NaN left out): mean 3/4, std sqrt(0.75 / 3) = 1/2 -> 1/2.
    # The NaN rollout's own advantage is 0, as in TRL.
    orig_rewards = torch.tensor([[1.0, 1.0, 0.0, NAN]])
    orig, ref = decoupled_advantages(orig_rewards, [torch.tensor([1.0])], eps=0.0, ref_baseline="orig")
    close(ref[0], [math.sqrt(1 / 3)])
    close(orig[0], [math.sqrt(1 / 3), math.sqrt(1 / 3), -2 * math.sqrt(1 / 3), 0.0])
    _, ref = decoupled_advantages(orig_rewards, [torch.tensor([1.0])], eps=0.0, ref_baseline="union")
    close(ref[0], [0.5])
