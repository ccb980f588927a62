r"""Matrix sign and exact singular-value clipping from matrix products only (for accelerators).

:func:`msign` is the polar factor :math:`\mathrm{msign}(X) = U V^\top` (for
:math:`X = U \Sigma V^\top`), computed by an odd quintic iteration
:math:`X \leftarrow a X + (b A + c A^2) X`, :math:`A = X X^\top`, whose coefficients are the
*Polar Express* greedy minimax choice (Amsel et al., 2025): step ``k`` uses the odd quintic
:math:`p_k(x) = a x + b x^3 + c x^5` that minimizes :math:`\max |1 - p_k(x)|` over the interval
:math:`[\ell_k, u_k]` where the singular values can be after ``k`` steps; the next interval is the
image :math:`[\min p_k, \max p_k]`. :func:`polar_express_coefficients` derives them here (a Remez
exchange in float64), from :math:`[\ell_0, 1] = [10^{-3}, 1]`: after 7 steps every singular value
in :math:`[10^{-3}, 1]` is within :math:`10^{-7}` of 1; the 8th step is the Newton–Schulz
limit :math:`(15/8, -10/8, 3/8)`, which takes it to float rounding.

:func:`msign_clip` caps every singular value at ``w_max`` exactly (to float precision), with the
identity (Su et al.'s matrix-sign form of :math:`\min(1, \sigma)`; here on the small Gram side)

.. math::

    \mathrm{mclip}(M) = \tfrac12\big[M + \mathrm{msign}(M)
        + \mathrm{msign}(M M^\top - I)\,(\mathrm{msign}(M) - M)\big]
      = M + \tfrac12 (I + S)(O - M),

with :math:`O = \mathrm{msign}(M)` and :math:`S = \mathrm{msign}(M M^\top - I)` (a symmetric
``m × m`` matrix, ``m`` the smaller side; computed as the sign of :math:`M O^\top - I =
(M M^\top)^{1/2} - I`, which has the same sign and twice the separation near the cap): on a
singular direction with :math:`\sigma < 1`, :math:`S = -1` and the result is :math:`\sigma`;
with :math:`\sigma > 1`, :math:`S = +1` and the result is :math:`O`'s 1. Only the correction
:math:`\frac12(I+S)(O-M)` carries the iteration's error, and it vanishes on the directions that
are left alone: they come back to float rounding.

Cost: 8 steps of 3 products for :math:`O` (``m × m`` and ``m × n``), 8 steps of 3 ``m × m``
products for :math:`S`, 7 more (the bound, :math:`M O^\top`, the result): about
:math:`19\,m^2 n + 35\,m^3` multiply-adds in 55 products, against one ``eigh``/SVD for the other
exact modes; on a GPU those are many small fast products instead of a
serial factorization. The products run in float32 (16-bit weights are computed in float32;
see :func:`msign_clip` for why bf16 products are not offered).

Example::

    >>> W = torch.randn(256, 128) / 8
    >>> Y = msign_clip(W, w_max=1.0)      # torch.linalg.svdvals(Y) == svdvals(W).clamp_max(1)
    >>> O = msign(W)                      # ≈ U Vᵀ
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fx_spectral.matrices import addmm, check_matrix

__all__ = ["MSIGN_STEPS", "MSIGN_RANGE", "msign", "msign_clip", "polar_express_coefficients"]

#: Default number of iteration steps (for both msign(M) and msign(MMᵀ − I)).
MSIGN_STEPS = 8
#: msign_clip is exact when an upper bound of σ₁ (within ``m^{1/32}``·σ₁) is at most this many times
#: ``w_max``; beyond, the matrix is first scaled into that range (every σ by one factor), so the
#: result stays ≤ w_max but the singular values below the new threshold shrink (never NaN).
MSIGN_RANGE = 16.0
_LOWER = 1e-3  # the iteration is tuned for singular values in [_LOWER, 1] (after normalization)
_HEADROOM = 1.05  # early quintics are designed 5% past the interval's top (bf16 rounding)
_LOW_PRECISION_MARGIN = 0.01  # 16-bit weights aim 1% below the cap (rounding the result moves σ by ~3e-3)


# --------------------------------------------------------------------------------------------
# Coefficients: greedy minimax odd quintics (Polar Express), derived by a Remez exchange
# --------------------------------------------------------------------------------------------


def _grid(lo: float, hi: float) -> Tensor:
    # geometric and linear points on [lo, hi] (float64): resolves both ends of a wide interval
    geometric = torch.logspace(torch.tensor(lo).log10(), torch.tensor(hi).log10(), 4001, dtype=torch.float64)
    return torch.cat([geometric, torch.linspace(lo, hi, 4001, dtype=torch.float64)]).sort().values


def _minimax_quintic(lo: float, hi: float) -> tuple[tuple[float, float, float], float]:
    """The odd quintic minimizing ``max |1 - p|`` on ``[lo, hi]`` and that error (Remez, float64)."""
    grid = _grid(lo, hi)
    x = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), 4, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    coeffs = torch.zeros(3, dtype=torch.float64)
    for _ in range(30):
        system = torch.stack([x, x**3, x**5, signs], dim=1)
        solution = torch.linalg.solve(system, torch.ones(4, dtype=torch.float64))
        coeffs = solution[:3]
        err = 1 - (coeffs[0] * grid + coeffs[1] * grid**3 + coeffs[2] * grid**5)
        # alternating extrema of the error, endpoints included, the largest of each sign run kept
        turn = ((err[1:-1] - err[:-2]) * (err[2:] - err[1:-1]) <= 0).nonzero().squeeze(-1) + 1
        idx = torch.cat([torch.tensor([0]), turn, torch.tensor([len(grid) - 1])]).tolist()
        points, values = [], []
        for i in idx:
            e = float(err[i])
            if values and (e > 0) == (values[-1] > 0):
                if abs(e) > abs(values[-1]):
                    points[-1], values[-1] = float(grid[i]), e
            else:
                points.append(float(grid[i]))
                values.append(e)
        if len(points) != 4:
            break
        new = torch.tensor(points, dtype=torch.float64)
        if torch.allclose(new, x, rtol=1e-12, atol=0):
            break
        x = new
    err = 1 - (coeffs[0] * grid + coeffs[1] * grid**3 + coeffs[2] * grid**5)
    return (float(coeffs[0]), float(coeffs[1]), float(coeffs[2])), float(err.abs().max())


@functools.cache
def polar_express_coefficients(
    lower: float = _LOWER, steps: int = MSIGN_STEPS
) -> tuple[tuple[float, float, float], ...]:
    r"""Greedy minimax odd quintics :math:`(a, b, c)` for singular values starting in ``[lower, 1]``.

    Step ``k`` minimizes :math:`\max_{x \in [\ell_k, u_k]} |1 - (a x + b x^3 + c x^5)|` (Remez
    exchange, float64); :math:`[\ell_{k+1}, u_{k+1}]` is the image of :math:`[\ell_k, u_k]`.
    While the interval is wide (:math:`u_k - \ell_k > 0.1`) each quintic is designed on
    :math:`[\ell_k, 1.05\,u_k]`: bf16 rounding pushes singular values a few percent past
    :math:`u_k`, and without that headroom the next (steep) quintics send them off to infinity
    (measured: NaN in bf16 without it, max error 5e-3 with it; float32 unaffected, ~3e-7).
    Once the interval is within :math:`10^{-6}` of 1 the Newton–Schulz limit
    :math:`(15/8, -10/8, 3/8)` is used (its fixed point 1 has zero slope: rounding is damped).

    Example::

        >>> polar_express_coefficients(1e-3, 8)[0]   # (8.47..., -25.1..., 18.6...)
    """
    if not 0 < lower < 1:
        raise ValueError(f"polar_express_coefficients: lower must be in (0, 1), got {lower!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"polar_express_coefficients: steps must be an int >= 1, got {steps!r}")
    lo, hi = float(lower), 1.0
    out = []
    for _ in range(steps):
        if hi - lo < 1e-6:
            out.append((15 / 8, -10 / 8, 3 / 8))
            continue
        headroom = _HEADROOM if hi - lo > 0.1 else 1.0
        (a, b, c), _ = _minimax_quintic(lo, hi * headroom)
        out.append((a, b, c))
        xs = _grid(lo, hi)
        image = a * xs + b * xs**3 + c * xs**5
        lo, hi = float(image.min()), float(image.max())
    return tuple(out)


# --------------------------------------------------------------------------------------------
# The iterations
# --------------------------------------------------------------------------------------------


def _quintic_steps(X: Tensor, coefficients) -> Tensor:
    """``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ`` per step (``X``: ``(B, m, n)``, ``m ≤ n``)."""
    for a, b, c in coefficients:
        A = X @ X.mT
        X = addmm(X, addmm(A, A, A, beta=b, alpha=c), X, beta=a, alpha=1.0)
    return X


def _symmetric_sign(B: Tensor, coefficients) -> Tensor:
    """sign of a symmetric ``B`` (spectral norm ≤ 1) on its eigenvalues; kept symmetric each step."""
    Y = B
    for a, b, c in coefficients:
        Y2 = Y @ Y
        Y = addmm(Y, addmm(Y2, Y2, Y2, beta=b, alpha=c), Y, beta=a, alpha=1.0)
        Y = 0.5 * (Y + Y.mT)
    return Y


def _normalized(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``X`` (``(B, m, n)``, ``m ≤ n``) → ``(Z, rho, scale)``: ``Z = X / scale`` with ``‖Z‖_F = 1``
    (so no product below can overflow, in any dtype) and ``rho ≥ σ₁(Z)``, within a factor
    ``m^{1/32}``: ``rho² = ‖A⁸‖_F^{1/8}`` with ``A = Z Zᵀ`` (three squarings, each renormalized,
    the scale kept in logarithms). A zero matrix gets ``scale = 0`` and ``Z = 0``."""
    peak = X.abs().amax(dim=(-2, -1), keepdim=True)
    nonzero = peak > 0
    Xs = X / torch.where(nonzero, peak, torch.ones_like(peak))  # entries in [-1, 1]
    frob = torch.linalg.matrix_norm(Xs, keepdim=True)  # >= 1 for a nonzero matrix
    frob = torch.where(nonzero, frob, torch.ones_like(frob))
    Z = Xs / frob
    C = (Z @ Z.mT).float()  # eigenvalues in [0, 1]; the bound in float32 at least
    log_norm = torch.zeros_like(peak, dtype=C.dtype)  # log ‖A^(2^k)‖_F
    for _ in range(3):
        C = C @ C
        f = torch.linalg.matrix_norm(C, keepdim=True).clamp_min(torch.finfo(C.dtype).tiny)
        C = C / f
        log_norm = 2 * log_norm + f.log()
    rho = torch.exp(log_norm / 16).to(X.dtype)  # (‖A⁸‖_F)^(1/16) >= σ₁(Z)
    return Z, rho, peak * frob


def _wide3(X: Tensor) -> tuple[Tensor, bool]:
    X = X if X.ndim <= 3 else X.reshape(-1, *X.shape[-2:])
    transposed = X.shape[-2] > X.shape[-1]
    return (X.mT if transposed else X), transposed


def msign(W: Tensor, *, steps: int = MSIGN_STEPS, dtype: torch.dtype | None = None) -> Tensor:
    r"""The polar factor :math:`U V^\top` of ``W`` (batched), by the Polar Express iteration.

    ``W`` is scaled so that its singular values lie in ``(0, 1]`` (by an upper bound of
    :math:`\sigma_1` within a factor :math:`m^{1/32}`), then :func:`polar_express_coefficients`
    steps run on the smaller Gram side. Singular values at least :math:`10^{-3} m^{1/32}` times
    below :math:`\sigma_1` come out within float rounding of 1 (float32: ~1e-6); smaller ones are
    mapped into [0, 1.05]; a zero matrix gives zero. Finite for every finite input.

    Args:
        W: ``(..., m, n)``.
        steps: iteration steps (default 8).
        dtype: compute dtype (default ``W.dtype``; bf16 works, at bf16 accuracy).

    Example::

        >>> O = msign(torch.randn(4, 64, 32))
    """
    check_matrix(W, "msign")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"msign: steps must be an int >= 1, got {steps!r}")
    X = W if dtype is None else W.to(dtype)
    shape = X.shape
    X, transposed = _wide3(X)
    Z, rho, _ = _normalized(X)
    Q = _quintic_steps(Z / rho, polar_express_coefficients(_LOWER, steps))
    Q = Q.mT if transposed else Q
    return Q.reshape(shape).to(W.dtype)


def msign_clip(
    W: Tensor,
    w_max: float = 1.0,
    *,
    steps: int = MSIGN_STEPS,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Cap every singular value at ``w_max`` with matrix products only: :math:`\min(\sigma, w_{max})`.

    :math:`M = W / w_{max}` is normalized, :math:`O = \mathrm{msign}(M)` by ``steps`` Polar
    Express steps, then :math:`S = \mathrm{sign}(|M^\top| - I)` with :math:`|M^\top| = M O^\top =
    (M M^\top)^{1/2}` (``m × m``, the same sign as :math:`M M^\top - I` but twice as well
    separated near the cap) by ``steps`` more, and the result is
    :math:`w_{max}\,[M + \frac12 (I + S)(O - M)]` (module docstring).

    Accuracy (tests, 256×128, :math:`\sigma \le 3 w_{max}`, against ``torch.linalg.svd``):
    float32 max :math:`|\sigma_{out} - \min(\sigma, w_{max})| \le 10^{-4} w_{max}` (measured
    ~4e-5, reached only by singular values within 0.1% of the cap; ~4e-7 elsewhere). A 16-bit
    ``W`` or ``dtype`` (bf16/fp16) is computed in float32 and aims at :math:`0.99\,w_{max}`:
    rounding the result to 16 bits moves its singular values by ~3e-3, and the 1% margin keeps
    them below the cap (measured: max error 1.2e-2, top singular value ≤ 0.996·w_max).
    The products always run in float32 at least: an iteration in bf16 products leaves the polar
    factor's singular *vectors* off by up to 9% on clustered spectra (measured on an 8×8 weight of
    the demo), which put a clipped singular value 1% above the cap; no polishing step in float32
    removes that (it fixes singular values, not vectors).

    Range: exact while an upper bound :math:`\rho \ge \sigma_1` (:math:`\rho \le m^{1/32}
    \sigma_1`) is at most :data:`MSIGN_RANGE` ``· w_max``; near the cap the error grows like
    :math:`(\rho / w_{max}) \cdot 10^{-5}`. A matrix beyond that range is first scaled down by
    :math:`\rho / (16\, w_{max})` (like the polynomial hard cap): the result is still at most
    ``w_max`` and finite, but its singular values below the cap shrink by that factor. A matrix
    with :math:`\rho \le w_{max}` is returned unchanged, zero stays zero, and any finite input
    gives a finite result.

    Args:
        W: ``(..., m, n)``; the result has its shape and dtype.
        w_max: the cap, > 0.
        steps: iteration steps for each of :math:`O` and :math:`S` (default 8).
        dtype: compute dtype (default ``W.dtype``); 16-bit dtypes round the input and the result
            only (see above).

    Example::

        >>> W = torch.randn(8, 256, 128) / 6
        >>> Y = msign_clip(W, w_max=1.0)
    """
    check_matrix(W, "msign_clip")
    if isinstance(w_max, bool) or not (isinstance(w_max, (int, float)) and 0 < w_max < float("inf")):
        raise ValueError(f"msign_clip: w_max must be a finite float > 0, got {w_max!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"msign_clip: steps must be an int >= 2, got {steps!r}")
    X = W if dtype is None or dtype == W.dtype else W.to(dtype)
    sixteen = (torch.float16, torch.bfloat16)
    # 16-bit in or out: the result is rounded to 16 bits, which moves singular values by ~3e-3;
    # aim 1% below the cap so that the rounded result stays under it.
    cap = w_max * (1 - _LOW_PRECISION_MARGIN) if X.dtype in sixteen or W.dtype in sixteen else float(w_max)
    X = X.to(torch.promote_types(X.dtype, torch.float32))
    shape = X.shape
    X, transposed = _wide3(X / cap)  # (B?, m, n), m <= n; clip at 1

    Z, rho, scale = _normalized(X)  # Z = X / scale: clip Z at t = 1 / scale
    # guard: threshold max(t, rho / RANGE), i.e. X scaled by g = max(1, rho·scale / RANGE) first
    g = torch.clamp_min(rho * scale / MSIGN_RANGE, 1.0)
    theta = (g / (rho * scale)).nan_to_num(posinf=2.0)  # the threshold in units of rho
    keep = (scale == 0) | (theta >= 1)  # nothing above the cap (or zero): returned as is
    P = X / g
    if bool(keep.all()):
        Y = P
    else:
        th = theta.clamp_max(1.0)
        coefficients = polar_express_coefficients(_LOWER, steps)
        Zn = Z / rho  # singular values in (0, 1]
        Q = _quintic_steps(Zn, coefficients)  # O = msign(M) -> U Vᵀ
        eye = torch.eye(Zn.shape[-2], dtype=Zn.dtype, device=Zn.device)
        R = Zn @ Q.mT  # |Mᵀ|/ρ: eigenvalues σ/ρ (twice the separation of σ²/ρ² near the cap)
        B = (0.5 * (R + R.mT) - th * eye) / torch.maximum(th, 1 - th)  # eigenvalues in [-1, 1]
        S = _symmetric_sign(B, coefficients)
        # in units of the threshold: P + ½(I + S)(O − P); the correction carries all the iteration error
        Y = torch.add(P, (0.5 * (S + eye)) @ (Q - P))
        Y = torch.where(keep, P, Y)
    Y = Y * cap
    Y = Y.mT if transposed else Y
    return Y.reshape(shape).to(W.dtype)
