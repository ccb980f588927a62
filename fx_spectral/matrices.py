"""Small helpers shared by the matrix ops (:mod:`fx_spectral.projections`, :mod:`fx_spectral.msign`) and the
sigma gradients (:mod:`fx_spectral.sn_autograd`, :mod:`fx_spectral.graph.emit`)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["add_outer", "addmm", "check_matrix", "outer_in_layout"]


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


def outer_in_layout(a: Tensor, b: Tensor, shape: torch.Size | tuple[int, ...], dim: int) -> Tensor:
    r"""The outer product :math:`a b^\top` laid out as a weight of ``shape`` whose matrix view it is.

    The matrix view of a weight puts ``dim`` first and flattens the rest (``a`` has
    ``shape[dim]`` entries, ``b`` the product of the others), so the result ``R`` satisfies
    ``R.movedim(dim, 0).flatten(1) == outer(a, b)``.

    Example::

        >>> w = torch.randn(3, 4, 2, 2)  # a ConvTranspose2d weight: matrix view (4, 12), dim=1
        >>> a, b = torch.randn(4), torch.randn(12)
        >>> r = outer_in_layout(a, b, w.shape, 1)
        >>> torch.equal(r.movedim(1, 0).flatten(1), torch.outer(a, b))
        True
    """
    dim %= len(shape)
    moved = (shape[dim], *shape[:dim], *shape[dim + 1:])
    return torch.outer(a, b).view(moved).movedim(0, dim)


def add_outer(t: Tensor, a: Tensor, b: Tensor, dim: int, *, alpha: float, in_place: bool) -> Tensor:
    r"""``t + alpha · a bᵀ`` in ``t``'s matrix view (``dim`` first, the rest flattened): a weight
    gradient plus the rank-one sigma term.

    Eager with ``in_place=True`` (``t`` is a gradient the caller just computed): ``addr_`` /
    ``addcmul_`` on ``t``, one pass, the outer product never materialized. Otherwise (``t`` not
    the caller's to modify, or traced by ``torch.compile``): ``t - (-alpha · a) bᵀ``, a new tensor.
    Traced code must get the subtraction: inductor on CPU rewrites ``add(mm(...), r)`` (what an
    in-place ``addr_`` on a GEMM's result becomes) into ``addmm(r, ...)``, which writes the
    W-sized ``r`` and copies it before the GEMM; a subtraction stays one fused pass after it.

    Example::

        >>> t, a, b = torch.zeros(3, 2), torch.ones(3), torch.ones(2)
        >>> torch.equal(add_outer(t, a, b, 0, alpha=-1.0, in_place=False), -torch.ones(3, 2))
        True
    """
    if in_place and not torch.compiler.is_compiling():
        # NB: t is updated in place.
        if dim == 0 and t.is_contiguous():
            t.flatten(1).addr_(a, b, alpha=alpha)  # a view of contiguous t (zero-size included)
        else:
            moved = t.movedim(dim, 0)
            moved.addcmul_(a.view(-1, *[1] * (moved.dim() - 1)), b.view(1, *moved.shape[1:]), value=alpha)
        return t
    return t - outer_in_layout(a if alpha == -1 else a * -alpha, b, t.shape, dim)
