"""OTS (OOD token suppression, as in the paper): per-token weights for the loss on constructed trajectories.

    w_t = clamp(exp(log p_t + H_t), low, high) = clamp(p_t * e^{H_t}, low, high)

p_t is the policy's probability of token t of the constructed sequence and H_t the entropy of its next-token
distribution at t. Tokens the policy already finds likely, or where it is uncertain (high entropy), weigh more; tokens
it confidently rejects (low p_t at low H_t, typical of out-of-distribution text it did not write) weigh less, so they
cannot dominate L_ref.
The clamp bounds the scale. The weights are constants: no gradient flows through them.
"""

import torch
from torch import Tensor


@torch.no_grad()
def ots_weights(logprobs: Tensor, entropy: Tensor, low: float = 0.01, high: float = 10.0) -> Tensor:
    """w_t = clamp(exp(logprobs_t + entropy_t), low, high), detached; same shape as the (B, T) inputs."""
    if low > high:
        raise ValueError(f"ots_weights: need low <= high, got {low=}, {high=}")
    if logprobs.shape != entropy.shape:
        raise ValueError(f"ots_weights: logprobs {tuple(logprobs.shape)} and entropy {tuple(entropy.shape)} differ")
    return torch.exp(logprobs.detach() + entropy.detach()).clamp(low, high)
