import math

import pytest
import torch

from tapo.core.weights import ots_weights


def test_clamps_both_ends_and_keeps_the_middle():
    # exp(-1 + 1) = 1; exp(log 0.5 + 0.1) = 0.5 * e^0.1 = 0.5525855; exp(-10 + 0.5) = 7.5e-5 -> 0.01;
    # exp(-0.1 + 3) = e^2.9 = 18.17 -> 10.
    logprobs = torch.tensor([[-1.0, math.log(0.5), -10.0, -0.1]])
    entropy = torch.tensor([[1.0, 0.1, 0.5, 3.0]])
    expected = torch.tensor([[1.0, 0.5525855, 0.01, 10.0]])
    torch.testing.assert_close(ots_weights(logprobs, entropy), expected)


def test_custom_bounds():
    # e^0 = 1 lies above high = 0.5; e^-3 = 0.0498 lies below low = 0.1.
    weights = ots_weights(torch.tensor([0.0, -3.0]), torch.zeros(2), low=0.1, high=0.5)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.1]))


def test_weights_carry_no_gradient():
    logprobs = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    entropy = torch.tensor([[0.2, 0.4]], requires_grad=True)
    weights = ots_weights(logprobs, entropy)
    assert weights.grad_fn is None and not weights.requires_grad


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="low <= high"):
        ots_weights(torch.zeros(2), torch.zeros(2), low=2.0, high=1.0)
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        ots_weights(torch.zeros(2), torch.zeros(3))
