"""Activation checkpointing recomputes the forward inside backward: the eager API must not run a
second power-iteration update there (u/v would advance twice per step, and backward would use a
sigma that differs from the one forward used). The reference is the same model without checkpointing:
buffers and gradients must match bit for bit."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fx_spectral


@pytest.mark.parametrize("batch", [1, 64])  # 1: output-scaling route, 64: weight-dividing route (matrix mode)
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("mode", ["matrix", "operator"])
def test_checkpoint_recompute_does_not_update_uv_again(batch, use_reentrant, mode):
    torch.manual_seed(0)
    if mode == "matrix":
        net = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))
        x = torch.randn(batch, 32)
    else:
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1))
        x = torch.randn(batch, 3, 6, 6)
    fx_spectral.apply_spectral_norm(net, mode=mode)
    net(x)  # operator mode takes its input shape here
    ref = copy.deepcopy(net)
    x_in = x.clone().requires_grad_(use_reentrant)  # reentrant checkpoint needs an input that requires grad
    for _ in range(2):
        ref(x).square().sum().backward()
        checkpoint(net, x_in, use_reentrant=use_reentrant).square().sum().backward()
    for (key, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
