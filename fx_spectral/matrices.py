"""Small helpers shared by the matrix ops (:mod:`fx_spectral.projections`, :mod:`fx_spectral.msign`)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["addmm", "check_matrix"]


def check_matrix(W: Tensor, op: str) -> None:
    """Raise a TypeError/ValueError naming ``op`` unless ``W`` is a floating matrix or batch ``(..., m, n)``."""
    if not isinstance(W, Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor of shape (..., m, n), got {type(W).__name__}")
    if W.ndim < 2:
        raise ValueError(f"{op}: expected a matrix or a batch of matrices (..., m, n), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point tensor, got dtype {W.dtype}")


def addmm(inp: Tensor, m1: Tensor, m2: Tensor, *, beta: float, alpha: float) -> Tensor:
    """``beta * inp + alpha * m1 @ m2`` in one fused kernel, for one matrix or a 3-D batch."""
    if inp.ndim == 2:
        return torch.addmm(inp, m1, m2, beta=beta, alpha=alpha)
    return torch.baddbmm(inp, m1, m2, beta=beta, alpha=alpha)
