r"""Operator norms of convolutions (and Linear), with a proven upper and an attained lower bound.

A convolution is a linear map :math:`A` from one example of shape ``(C_in, *n)`` to one of shape
``(C_out, *n_out)``; its operator (spectral) norm :math:`\lVert A\rVert_2` is **not** the norm of
the reshaped kernel (3x3 kernels: the true norm is typically 1.4-1.8x the reshaped one).
:func:`operator_norm` returns both sides of the true value:

* ``lower`` is **attained**: :math:`\lVert A v\rVert/\lVert v\rVert` for a vector ``v`` found by
  Lanczos iteration on :math:`A^\top A` (the functional op and its autograd adjoint, float64), so
  ``lower <= ||A||`` whatever happens.
* ``upper`` is **proven**, the smallest of the bounds below that apply (``method`` names it):

  - ``"dense"``: the exact largest singular value of the dense Jacobian, per group, when it is
    small (float64 SVD, then a relative margin of 1e-9 for rounding).
  - ``"circulant"`` (zero padding): write the stride-``s`` convolution in polyphase form (a
    stride-1 convolution on ``C_in * s^d`` phase channels with kernel ``ceil(((k-1)*dil+1)/s)``);
    embed each input grid in a cyclic grid of size ``N`` large enough that no tap reaches a
    nonzero input across the wrap (checked index by index). The operator is then a restriction
    of a circular convolution, whose norm is :math:`\max_\omega \sigma_{\max}(\hat K(\omega))`
    over the ``N``-point DFT grid (Sedghi, Gupta & Long, *The singular values of convolutional
    layers*, ICLR 2019). Groups: the operator is block diagonal, so the max over groups.
  - ``"circulant-classes"`` (zero padding, stride 1, dilation > 1): a dilated convolution splits
    into ``dil`` independent undilated convolutions on the residue classes of each grid; the norm
    is the max of theirs, each bounded as above on a smaller cyclic grid (tighter).
  - ``"circular"`` (``padding_mode="circular"``): exact for stride 1 with ``2p = dil (k-1)``
    (a circular convolution); otherwise the polyphase circular operator (stride dividing ``n``)
    or the stride-1 one, times ``sqrt`` of how often an output position repeats.
  - ``"padding-map"`` (``reflect`` / ``replicate``): ``A = C P`` with ``P`` the padding map and
    ``C`` the unpadded ("valid") convolution, so :math:`\lVert A\rVert \le \lVert P\rVert\,\lVert C\rVert`;
    :math:`P^\top P` is diagonal with the number of copies of each input entry, so
    :math:`\lVert P\rVert = \prod_i \sqrt{\text{max copies in dim } i}` (e.g. ``sqrt 2`` per dim
    for reflect): sound, and looser than the zero-padding bound.

  A transposed convolution is the adjoint of the convolution with the same weight, stride,
  padding and dilation acting on its output grid (``output_padding`` only sets that grid's size),
  and an operator has the norm of its adjoint. Linear: the exact SVD.

References: Sedghi et al. 2019 (circulant symbol); Delattre, Barthélemy, Araujo & Allauzen, *Efficient
bound of Lipschitz constant for convolutional layers by Gram iteration* (ICML 2023) and its
zero-padding sequel (2024), for faster symbol norms; the polyphase decomposition of strided filters
is textbook multirate signal processing.

Example::

    >>> conv = nn.Conv2d(16, 16, 3, padding=1)
    >>> r = operator_norm(conv, (16, 32, 32))
    >>> r.lower <= r.upper
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from fx_spectral.conv_bounds import SVD_MARGIN, conv_bound, lanczos_lower, padding_map_norm
from fx_spectral.kinds import CONV_TRANSPOSE, kind_of
from fx_spectral.nn import is_spectral_normalized, spectral_sigma

__all__ = [
    "OperatorNorm",
    "conv_operator_norm",
    "conv_upper_bound",
    "effective_weight",
    "operator_norm",
    "padding_map_norm",
]


@dataclass(frozen=True)
class OperatorNorm:
    """Both sides of an operator norm: ``lower <= ||A||_2 <= upper``.

    Attributes:
        lower: ``||A v|| / ||v||`` for the best ``v`` found (attained, so never above the norm).
        upper: a proven upper bound (see the module docstring for each ``method``).
        method: which bound gave ``upper`` (``"exact-svd"``, ``"dense"``, ``"circulant"``,
            ``"circulant-classes"``, ``"circular"``, ``"padding-map"``).
        n_iter: operator applications (forward + adjoint) spent on ``lower``.
        input_shape / output_shape: one example's shapes (no batch dimension).
    """

    lower: float
    upper: float
    method: str
    n_iter: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def gap(self) -> float:
        """``upper / lower``: how well the true norm is pinned down (1.0 = exactly)."""
        return self.upper / self.lower if self.lower > 0 else math.inf


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def effective_weight(module: nn.Module, where: str | None = None) -> Tensor:
    """The weight ``module``'s eval-mode forward computes with, detached.

    For a module normalized by :func:`fx_spectral.spectral_norm` that is ``W / sigma`` with the
    current u/v (:func:`fx_spectral.spectral_sigma`; cast to the weight's dtype as forward does);
    for a torch parametrization, the parametrized weight (read in eval mode only, since reading it
    in training mode runs a power-iteration update). Raises for an uninitialized Lazy module.
    """
    where = where or type(module).__name__
    raw = module._parameters.get("weight")
    if raw is not None and is_lazy(raw):
        raise ValueError(f"{where}: the Lazy module has not run yet, so its weight has no shape; run one forward first")
    if is_spectral_normalized(module, "weight"):
        w = module._parameters["weight"].detach()
        sigma = spectral_sigma(module)
        if float(sigma) == 0:
            return w
        return (w.to(sigma.dtype) / sigma).to(w.dtype) if w.dtype != sigma.dtype else w / sigma
    if torch.nn.utils.parametrize.is_parametrized(module, "weight") and module.training:
        raise ValueError(
            f"{where}: the weight is parametrized and the module is in training mode, where reading it runs a "
            "power-iteration update; call .eval() first"
        )
    with torch.no_grad():
        w = module.weight
    if is_lazy(w):
        raise ValueError(f"{where}: the Lazy module has not run yet, so its weight has no shape; run one forward first")
    return w.detach()


def conv_upper_bound(
    weight: Tensor,
    input_shape,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    padding_mode: str = "zeros",
    dense_limit: int = 1 << 20,
    where: str = "conv",
) -> tuple[float, str, tuple[int, ...]]:
    """Proven upper bound of a convolution's operator norm: ``(upper, method, output_shape)``.

    The arguments are those of ``torch.nn.functional.conv{d}d`` / ``conv_transpose{d}d`` (weight
    layout included) plus ``padding_mode``; ``input_shape`` is one example's ``(C_in, *n)``.
    """
    b = conv_bound(
        weight, input_shape, stride, padding, dilation, groups, transposed, output_padding, padding_mode, dense_limit,
        where,
    )
    return b.upper, b.method, b.output_shape


def conv_operator_norm(
    weight: Tensor,
    input_shape,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    padding_mode: str = "zeros",
    n_iter: int = 64,
    restarts: int = 4,
    dense_limit: int = 1 << 20,
    seed: int = 0,
    where: str = "conv",
) -> OperatorNorm:
    """:func:`operator_norm` for a functional convolution (arguments as in :func:`conv_upper_bound`)."""
    b = conv_bound(
        weight, input_shape, stride, padding, dilation, groups, transposed, output_padding, padding_mode, dense_limit,
        where,
    )
    lower, used = lanczos_lower(b.apply, b.input_shape, n_iter, restarts, seed)
    return OperatorNorm(min(lower, b.upper), b.upper, b.method, used, b.input_shape, b.output_shape)


def operator_norm(
    module: nn.Module,
    input_shape,
    *,
    n_iter: int = 64,
    restarts: int = 4,
    dense_limit: int = 1 << 20,
    seed: int = 0,
) -> OperatorNorm:
    r"""The operator norm of a Linear / Conv / ConvTranspose module's linear part, bracketed.

    Returns ``OperatorNorm(lower, upper, ...)`` with ``lower <= ||A||_2 <= upper`` where ``A`` maps
    one example of shape ``input_shape`` (no batch dimension) to one output, bias left out (it
    moves every output by the same vector). The module's weight is the one its eval-mode forward
    uses: ``W / sigma`` for a module normalized by :func:`fx_spectral.spectral_norm`.

    Args:
        module: ``nn.Linear``, ``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d`` (any padding mode,
            stride, dilation, groups, output_padding), or their Lazy variants after a forward.
        input_shape: one example, e.g. ``(3, 32, 32)`` for a Conv2d, ``(in_features,)`` (or
            ``(..., in_features)``) for a Linear.
        n_iter: Krylov dimension of each Lanczos cycle for ``lower``.
        restarts: Lanczos cycles at most (each restarts from the previous Ritz vector).
        dense_limit: largest ``dim_in * dim_out`` (per group) for which the exact dense SVD is
            also tried for ``upper``.
        seed: seed of the private generator for the starting vector (the global RNG is untouched).

    Example::

        >>> r = operator_norm(nn.Conv2d(3, 8, 3, padding=1), (3, 16, 16))
        >>> r.lower, r.upper, r.method           # e.g. (1.071, 1.083, 'dense')
    """
    where = type(module).__name__
    kind = kind_of(module)
    if kind is not None and kind.operator_norm == "matrix":  # Linear: its matrix view is the operator
        w = kind.matrix(effective_weight(module, where), kind.dim).to(torch.float64)
        shape = tuple(int(i) for i in input_shape)
        if not shape or shape[-1] != w.shape[1]:
            raise ValueError(f"{where}: expected input_shape (..., in_features={w.shape[1]}), got {shape}")
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        lower = float(torch.linalg.vector_norm(w @ vh[0])) if s.numel() else 0.0
        upper = float(s[0]) * (1 + SVD_MARGIN) if s.numel() else 0.0
        return OperatorNorm(min(lower, upper), upper, "exact-svd", 0, shape, (*shape[:-1], w.shape[0]))
    if kind is not None and kind.operator_norm == "conv":
        transposed = kind is CONV_TRANSPOSE
        w = effective_weight(module, where)
        return conv_operator_norm(
            w, input_shape, stride=module.stride, padding=module.padding, dilation=module.dilation,
            groups=module.groups, transposed=transposed, output_padding=module.output_padding if transposed else 0,
            padding_mode=module.padding_mode, n_iter=n_iter, restarts=restarts, dense_limit=dense_limit, seed=seed,
            where=where,
        )
    raise TypeError(
        f"operator_norm: expected nn.Linear, nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d (or a Lazy variant), "
        f"got {where}"
    )
