"""Group-relative advantages: GRPO for the original rollouts, DAE (decoupled advantage estimation) for constructions.

GRPO (matching TRL 1.16 `GRPOTrainer._generate_and_score_completions`, multi_objective_aggregation
"sum_then_normalize"): for query g with rewards r_g1..r_gK,

    A_gk = (r_gk - mean_g) / (std + eps)

with `std` the group's std ("group"), the std over all G*K rewards ("batch"; the mean stays per group), or no division
("none"). The std is the unbiased (Bessel-corrected, / (n - 1)) one, as TRL's `nanstd`. eps defaults to TRL's 1e-4.
NaN rewards mark unscorable rollouts: they are left out of mean and std and get advantage 0. A std that is zero or
undefined (fewer than two scorable rewards) yields advantage 0 instead of NaN or a 1/eps blow-up.

DAE: the constructed (micro-reflective) trajectories of query g form their own set G_ref[g]. They never enter the
original group's statistics, so adding or rescoring constructions cannot move the original advantages; see
`decoupled_advantages` for how they are scored.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from tapo.core.registry import Registry

SCALES = ("group", "batch", "none")
REF_BASELINES = ("orig", "ref", "union")

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
register_advantage = ADVANTAGE_ESTIMATORS.register  # decorator: @register_advantage("name")
get_advantage_estimator = ADVANTAGE_ESTIMATORS.lookup


def _nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Unbiased std ignoring NaNs: sqrt(sum (x - mean)^2 / (n - 1)) over the n non-NaN values; NaN when n < 2."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~x.isnan()).sum(dim=dim, keepdim=True)
    squares = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True)
    std = torch.where(count > 1, squares / (count - 1).clamp(min=1), torch.nan).sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


def _standardize(rewards: Tensor, mean: Tensor, std: Tensor | None, eps: float) -> Tensor:
    """(rewards - mean) / (std + eps), or rewards - mean when std is None; 0 for NaN rewards and degenerate std."""
    advantages = rewards - mean
    if std is not None:
        advantages = advantages / (std + eps)
        # A zero-spread group carries no signal. Its own members already get 0 (numerator 0), but a reward scored
        # against it from outside (DAE, ref_baseline="orig") would get (r - mean) / eps; same "is zero" test as TRL.
        degenerate = std.isnan() | torch.isclose(std, torch.zeros_like(std))
        advantages = torch.where(degenerate, 0.0, advantages)
    return torch.nan_to_num(advantages, nan=0.0)


def _baselines(groups: Sequence[Tensor], scale: str) -> list[tuple[Tensor, Tensor | None]]:
    """Per group (mean, divisor std or None): the group's nanmean and, by `scale`, its own/the pooled/no std."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    pooled_std = _nanstd(torch.cat([g.reshape(-1) for g in groups])) if scale == "batch" else None
    stats = []
    for group in groups:
        mean = torch.nanmean(group) if group.numel() else group.new_tensor(torch.nan)
        stats.append((mean, _nanstd(group) if scale == "group" else pooled_std))
    return stats


def _check_matrix(rewards: Tensor) -> Tensor:
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty (G, K) matrix, got shape {tuple(rewards.shape)}")
    return rewards if rewards.is_floating_point() else rewards.float()


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, eps: float = 1e-4, scale: str = "group") -> Tensor:
    """GRPO advantages for a (G, K) reward matrix (G queries, K rollouts each): A = (r - mean_g) / (std + eps).

    scale: "group" (std of the K rewards of the query), "batch" (std of all G*K rewards), "none" (A = r - mean_g).
    Unbiased std; NaN rewards excluded from the statistics and given A = 0; zero or undefined std (K = 1) -> A = 0.
    """
    rewards = _check_matrix(rewards)
    stats = _baselines(list(rewards), scale)
    return torch.stack([_standardize(row, mean, std, eps) for row, (mean, std) in zip(rewards, stats)])


@register_advantage("tapo_dae")
def decoupled_advantages(
    orig_rewards: Tensor,
    ref_rewards: list[Tensor],
    eps: float = 1e-4,
    ref_baseline: str = "orig",
    scale: str = "group",
) -> tuple[Tensor, list[Tensor]]:
    """DAE: GRPO advantages for the original (G, K) rollouts, and separately for each query's constructions.

    Original rows: exactly `grpo_advantages(orig_rewards, eps, scale)`; constructions never enter these statistics.
    ref_rewards[g] (1-D, possibly empty) holds the rewards of query g's constructed trajectories, scored as
        ref_baseline="orig": A = (r - mean(orig_g)) / (std_orig + eps)   (the original group's baseline)
        ref_baseline="ref":  A = (r - mean(G_ref[g])) / (std_ref + eps)  (the constructions' own group)
        ref_baseline="union": A = (r - mean(U_g)) / (std_U + eps), U_g = orig_g + G_ref[g] (the group with its
                              accepted constructions: the most literal "decoupled" reading that still carries signal
                              when every construction is correct; applied to the constructions only)
    where std_* follows `scale` ("batch" pools the original rewards, resp. all constructions' rewards, resp. all
    rewards of all unions). Zero or undefined std -> A = 0 (never NaN/inf); NaN rewards -> A = 0 and are left out of
    the statistics; an empty group -> an empty tensor.

    Why "orig" is the default: constructions are accepted only after re-verification, so every G_ref[g] is all
    correct, has zero variance, and "ref" gives them zero advantage, i.e. no learning signal at all. Under "orig" a
    repaired trajectory is credited relative to the group it repairs: with group success rate p (binary rewards)
    its advantage is (1 - p) / std_orig > 0. DCS only picks mixed groups, so std_orig > 0 whenever constructions exist.
    """
    if ref_baseline not in REF_BASELINES:
        raise ValueError(f"ref_baseline must be one of {REF_BASELINES}, got {ref_baseline!r}")
    orig_rewards = _check_matrix(orig_rewards)
    if len(ref_rewards) != orig_rewards.shape[0]:
        raise ValueError(
            f"ref_rewards has {len(ref_rewards)} groups but orig_rewards has {orig_rewards.shape[0]} queries"
        )
    for g, group in enumerate(ref_rewards):
        if group.dim() != 1:
            raise ValueError(f"ref_rewards[{g}] must be 1-D, got shape {tuple(group.shape)}")
    ref_rewards = [group if group.is_floating_point() else group.float() for group in ref_rewards]
    orig_advantages = grpo_advantages(orig_rewards, eps, scale)
    baseline_groups = {
        "orig": list(orig_rewards),
        "ref": ref_rewards,
        "union": [torch.cat([orig, ref]) for orig, ref in zip(orig_rewards, ref_rewards)],
    }[ref_baseline]
    stats = _baselines(baseline_groups, scale)
    ref_advantages = [_standardize(group, mean, std, eps) for group, (mean, std) in zip(ref_rewards, stats)]
    return orig_advantages, ref_advantages
