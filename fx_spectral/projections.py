r"""Spectral weight-regulation ops (Lipschitz transformers, arXiv 2507.13338), pure and batched.

Every op takes a matrix or a batch of matrices ``W`` of shape ``(..., m, n)`` and returns a new
tensor of the same shape and dtype (the input is never modified). Ops compute in ``W.dtype`` unless
``dtype=`` says otherwise (bf16 is allowed; the result is cast back to ``W.dtype``). Batched inputs
give exactly what a loop over the matrices gives (nothing is divided by the batch size).

==========================  =================================================================
op                          effect on the singular values :math:`\sigma_i` of ``W``
==========================  =================================================================
:func:`spectral_normalize`  all divided by :math:`\max(1, \hat\sigma_1 / w_{max})`
:func:`hard_cap`            :math:`\sigma \mapsto w_{max}\, p_4\circ p_3\circ p_2\circ p_1(\sigma / w_{max})`
                            with :math:`p_j(x) = x(a_j + b_j x^2 + c_j x^4)` (≈ min(w_max, σ));
                            ``exact=True``: exactly :math:`\min(w_{max}, \sigma)`
                            (eigh; ``mode="msign"``: by matrix products)
:func:`soft_cap`            :math:`f(\sigma) = \sigma - 3\alpha^2\sigma^5 + 3\alpha^3\sigma^7 - \alpha^4\sigma^9`
:func:`spectral_hammer`     :math:`\hat\sigma_1 \mapsto w_{max}`, the others unchanged
:func:`spectral_weight_decay` :math:`\hat\sigma_1 \mapsto (1 - wd)\,\hat\sigma_1`, the others unchanged
:func:`pure_svd`            :math:`\min(w_{max}, \sigma)` exactly (SVD)
:func:`orthogonalize`       all → ≈1 (Newton–Schulz quintic, Muon's coefficients); ``exact``: 1
==========================  =================================================================

Polynomial ops (soft cap, hard cap, orthogonalize) multiply on the cheaper Gram side: with
:math:`m \le n` they form :math:`X X^\top` (``m × m``), otherwise they work on :math:`X^\top`.
Rank-one ops use a power-iteration estimate :math:`(u, \hat\sigma, v)` from :func:`power_iterate`,
either passed in as ``estimate=`` (e.g. persistent vectors, 1–2 iterations) or computed fresh.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fx_spectral import power as P
from fx_spectral.matrices import addmm, check_matrix

__all__ = [
    "power_iterate",
    "spectral_normalize",
    "hard_cap",
    "soft_cap",
    "spectral_hammer",
    "spectral_weight_decay",
    "pure_svd",
    "orthogonalize",
    "soft_cap_coupling",
    "HARD_CAP_COEFFICIENTS",
    "NS_COEFFICIENTS",
    "hard_cap_polynomial",
    "soft_cap_polynomial",
]

#: The paper's four odd polynomial steps x ← x(a + b x² + c x⁴) approximating min(1, x) (arXiv 2507.13338).
HARD_CAP_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)

try:  # torch.optim.Muon's Newton–Schulz coefficients, so orthogonalize matches Muon's update.
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS
except ImportError:  # pragma: no cover - older/newer torch layouts
    DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS = 3.4445, -4.7750, 2.0315, 5

#: Newton–Schulz quintic coefficients (a, b, c) used by :func:`orthogonalize` (torch.optim.Muon's).
NS_COEFFICIENTS: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C)

_DEFAULT_FRESH_ITERATIONS = P.N_WARMUP  # a fresh random vector gets this many, as torch's spectral_norm


# --------------------------------------------------------------------------------------------
# Scalar maps (what each polynomial op does to one singular value; used by tests and coupling)
# --------------------------------------------------------------------------------------------


def soft_cap_polynomial(sigma, alpha: float):
    r""":math:`f(\sigma) = \sigma - 3\alpha^2\sigma^5 + 3\alpha^3\sigma^7 - \alpha^4\sigma^9` (scalars or tensors)."""
    t = alpha * sigma * sigma
    return sigma * (1 - 3 * t**2 + 3 * t**3 - t**4)


def hard_cap_polynomial(sigma, w_max: float = 1.0):
    r"""The composition of the four hard-cap steps applied to ``sigma / w_max``, times ``w_max``."""
    x = sigma / w_max
    for a, b, c in HARD_CAP_COEFFICIENTS:
        x2 = x * x
        x = x * (a + b * x2 + c * x2 * x2)
    return x * w_max


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _compute(W: Tensor, dtype: torch.dtype | None) -> Tensor:
    return W if dtype is None or dtype == W.dtype else W.to(dtype)


def _wide(X: Tensor) -> tuple[Tensor, bool]:
    # Work on the side whose Gram matrix is smaller: (m, n) with m <= n.
    if X.shape[-2] > X.shape[-1]:
        return X.mT, True
    return X, False


def _flat3(X: Tensor) -> Tensor:
    # (..., m, n) -> (B, m, n); a 2-D input stays 2-D (addmm beats baddbmm on one matrix).
    return X if X.ndim <= 3 else X.reshape(-1, *X.shape[-2:])


def _gram(X: Tensor) -> Tensor:
    return X @ X.mT


def _odd_poly_(
    X: Tensor, coefficients, normalize_frobenius: bool = False, matmul_dtype: torch.dtype | None = None
) -> Tensor:
    """Apply σ ← σ(a + bσ² + cσ⁴) steps (c may be 0) to every singular value of ``X``.

    ``matmul_dtype`` (e.g. bf16 for an fp32 ``X``): the products run in that dtype and only the
    correction term ``(bA + cA²)X`` is rounded; ``aX`` and the sum stay in ``X.dtype``.
    """
    shape = X.shape
    X, transposed = _wide(_flat3(X))
    if normalize_frobenius:  # X / ||X||_F, safe for huge and tiny X (a zero matrix stays zero)
        X = _peak_scaled(X)[0]
        norm = torch.linalg.matrix_norm(X, keepdim=True)
        X = X / torch.where(norm > 0, norm, torch.ones_like(norm))
    low = matmul_dtype is not None and matmul_dtype != X.dtype
    for a, b, c in coefficients:
        Xm = X.to(matmul_dtype) if low else X
        A = _gram(Xm)
        if low:
            P = A @ Xm if c == 0 else addmm(A, A, A, beta=b, alpha=c) @ Xm
            # (type promotion: the low-precision product is added to X in X's dtype, no extra pass)
            X = torch.add(X * a if a != 1 else X, P, alpha=b if c == 0 else 1.0)
        elif c == 0:  # a X + b (X Xᵀ) X: two products per step (the soft cap)
            X = addmm(X, A, X, beta=a, alpha=b)
        else:  # a X + (b A + c A²) X: three products per step
            X = addmm(X, addmm(A, A, A, beta=b, alpha=c), X, beta=a, alpha=1.0)
    if transposed:
        X = X.mT
    return X.reshape(shape)


def _outer(u: Tensor, v: Tensor) -> Tensor:
    return u.unsqueeze(-1) * v.unsqueeze(-2)


def _normalize_or_keep(t: Tensor, old: Tensor, eps: float) -> Tensor:
    # t / ||t|| per matrix, or the old vector where ||t|| <= eps (a zero weight never gives NaN):
    # power.normalize_or_keep's overflow-safe rule (entries near the float range still normalize).
    return P.normalize_or_keep(t, old, eps, overflow_safe=True)[0]


def _fro(X: Tensor) -> Tensor:
    """Frobenius norm per matrix, ``(..., 1, 1)``, without overflow (entries near the float range)."""
    peak = X.abs().amax((-2, -1), keepdim=True)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.linalg.matrix_norm(X / safe, keepdim=True) * peak


def _peak_scaled(X: Tensor) -> tuple[Tensor, Tensor]:
    # (X / max|X|, max|X|) per matrix; a zero matrix keeps factor 1. Every entry of the first is in [-1, 1].
    peak = X.abs().amax((-2, -1), keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return X / peak, peak


def _mv(X: Tensor, v: Tensor) -> Tensor:
    return (X @ v.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Power iteration
# --------------------------------------------------------------------------------------------


def power_iterate(
    W: Tensor,
    n_iter: int | None = None,
    u: Tensor | None = None,
    v: Tensor | None = None,
    *,
    eps: float = 1e-12,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Estimate the top singular triple :math:`(u, \sigma_1, v)` of ``W`` (batched).

    One step is :math:`u = \mathrm{normalize}(W v)`, then :math:`v = \mathrm{normalize}(W^\top u)`,
    and :math:`\hat\sigma = u^\top W v` (torch's spectral_norm order). ``sigma`` is
    differentiable with respect to ``W`` (u and v are constants); u and v are returned detached.

    Args:
        W: ``(..., m, n)``.
        n_iter: iterations; default 1 when ``u`` or ``v`` is given, else 15 from a random ``v``.
        u, v: starting vectors ``(..., m)`` / ``(..., n)`` (not modified). With only ``u``,
            ``v = normalize(Wᵀu)`` starts the iteration.
        eps: norms at or below ``eps`` keep the previous vector (a zero weight gives sigma 0).
        dtype: compute dtype; default float32 for fp16/bf16 input (sigma is kept in float32 under low precision),
            else ``W.dtype``.
        generator: for the random start.

    Returns:
        ``(u, sigma, v)`` with shapes ``(..., m)``, ``(...)``, ``(..., n)`` in the compute dtype.

    Example::

        >>> W = torch.randn(64, 32)
        >>> u, sigma, v = power_iterate(W, n_iter=30)
        >>> u, sigma, v = power_iterate(W, u=u, v=v)  # warm start: 1 iteration
    """
    check_matrix(W, "power_iterate")
    dtype = P.compute_dtype(W.dtype, dtype)
    Wc = _compute(W, dtype)
    X = Wc.detach()
    batch, (m, n) = X.shape[:-2], X.shape[-2:]
    fresh = u is None and v is None
    if n_iter is None:
        n_iter = _DEFAULT_FRESH_ITERATIONS if fresh else 1
    if n_iter < 0:
        raise ValueError(f"power_iterate: n_iter must be >= 0, got {n_iter}")
    with torch.no_grad():
        if u is not None:
            u = u.to(device=X.device, dtype=dtype).expand(*batch, m)
        if v is not None:
            v = v.to(device=X.device, dtype=dtype).expand(*batch, n)
        elif u is not None:
            v = _normalize_or_keep(_mv(X.mT, u), torch.full_like(X[..., 0, :], n**-0.5), eps)
        else:  # u = 0 (replaced by the first step), v a random unit vector
            u, v = P.fresh_start(m, n, dtype=dtype, device=X.device, batch=batch, generator=generator)
        if u is None:
            u = torch.zeros(*batch, m, dtype=dtype, device=X.device)
        if n_iter == 0:
            u = _normalize_or_keep(_mv(X, v), u, eps)
        # power.iterate with the batched products (the same loop as the eager API's, overflow-safe)
        Xt = X.mT
        u, v, _ = P.iterate(lambda x: _mv(X, x), lambda x: _mv(Xt, x), u, v, n_iter, eps, overflow_safe=True)
        u, v = u.clone(), v.clone()
    sigma = (u * _mv(Wc, v)).sum(-1)
    return u, sigma, v


def _estimate(W: Tensor, estimate, n_iter: int | None, generator, op: str):
    if estimate is not None:
        if len(estimate) != 3:
            raise ValueError(f"{op}: estimate must be (u, sigma, v) as power_iterate returns it")
        return estimate
    return power_iterate(W, n_iter, generator=generator)


# --------------------------------------------------------------------------------------------
# Rank-one and scaling ops
# --------------------------------------------------------------------------------------------


def spectral_normalize(
    W: Tensor,
    w_max: float = 1.0,
    *,
    estimate: tuple[Tensor, Tensor, Tensor] | None = None,
    n_iter: int | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Scale ``W`` so its spectral norm is at most ``w_max``: :math:`W / \max(1, \hat\sigma / w_{max})`.

    Differentiable through ``W`` (and through :math:`\hat\sigma`). ``estimate`` is a
    ``(u, sigma, v)`` from :func:`power_iterate`; otherwise a fresh estimate is computed.

    Example::

        >>> Y = spectral_normalize(torch.randn(3, 16, 8), w_max=2.0, n_iter=30)
    """
    check_matrix(W, "spectral_normalize")
    _, sigma, _ = _estimate(W, estimate, n_iter, generator, "spectral_normalize")
    X = _compute(W, dtype)
    factor = torch.clamp_min(sigma.to(X.dtype) / w_max, 1.0)
    return (X / factor[..., None, None]).to(W.dtype)


def spectral_hammer(
    W: Tensor,
    w_max: float = 1.0,
    *,
    estimate: tuple[Tensor, Tensor, Tensor] | None = None,
    n_iter: int | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Set the top singular value to ``w_max`` with a rank-one update: :math:`W + (w_{max} - \hat\sigma) u v^\top`.

    The other singular values are unchanged (exactly so when :math:`(u, \hat\sigma, v)` is the exact
    top triple). Suits low stable-rank updates (AdamW). Note it also *raises* a top singular value
    below ``w_max``, as in the paper.

    Example::

        >>> Y = spectral_hammer(torch.randn(16, 8), w_max=1.0, n_iter=50)
    """
    check_matrix(W, "spectral_hammer")
    return _rank_one_update(W, lambda sigma: w_max - sigma, estimate, n_iter, dtype, generator, "spectral_hammer")


def _rank_one_update(W: Tensor, change, estimate, n_iter: int | None, dtype, generator, op: str) -> Tensor:
    # W + change(sigma) u v^T in the compute dtype, from the estimate (u, sigma, v) or a fresh one.
    u, sigma, v = _estimate(W, estimate, n_iter, generator, op)
    X = _compute(W, dtype)
    c = change(sigma).to(X.dtype)[..., None, None]
    return (X + c * _outer(u.to(X.dtype), v.to(X.dtype))).to(W.dtype)


def spectral_weight_decay(
    W: Tensor,
    wd: float,
    *,
    estimate: tuple[Tensor, Tensor, Tensor] | None = None,
    n_iter: int | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Shrink only the top singular value by :math:`(1 - wd)`: :math:`W - wd\,\hat\sigma\, u v^\top`.

    Example::

        >>> Y = spectral_weight_decay(torch.randn(16, 8), wd=0.1, n_iter=50)
    """
    check_matrix(W, "spectral_weight_decay")
    if not 0.0 <= wd <= 1.0:
        raise ValueError(f"spectral_weight_decay: wd must be in [0, 1], got {wd}")
    return _rank_one_update(W, lambda sigma: -(wd * sigma), estimate, n_iter, dtype, generator, "spectral_weight_decay")


# --------------------------------------------------------------------------------------------
# Full-spectrum ops
# --------------------------------------------------------------------------------------------


def soft_cap(
    W: Tensor,
    alpha: float,
    *,
    limit: float | None = None,
    dtype: torch.dtype | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Soft cap: :math:`X \leftarrow X - \alpha X X^\top X`, then :math:`X \leftarrow X + \alpha X X^\top X`.

    Each singular value is mapped by :math:`f(\sigma) = \sigma - 3\alpha^2\sigma^5 + 3\alpha^3\sigma^7
    - \alpha^4\sigma^9` (:func:`soft_cap_polynomial`); singular vectors are kept. Four matrix
    products on the smaller Gram side. Choose ``alpha`` with :func:`soft_cap_coupling`.

    Range guard: :math:`f` rises to its peak at :math:`\sigma^* = \sqrt{t^*/\alpha}`
    (:math:`t^* = 1/3`), falls to 0 at :math:`1/\sqrt\alpha` and diverges (as :math:`-\alpha^4\sigma^9`)
    beyond. A matrix whose estimated top singular value exceeds ``limit`` (default and at most
    :math:`1/\sqrt\alpha`) is first scaled down so that it is ``limit`` (every singular value by
    one factor; a 10-step power estimate, bounded by the Frobenius norm), so no finite input gives
    a huge or NaN result: every output singular value is at most the peak :math:`f(\sigma^*)`.

    Args:
        W: ``(..., m, n)``.
        alpha: the strength, ``>= 0``.
        limit: the largest singular value fed to the polynomial (``0 < limit``, default
            :math:`1/\sqrt\alpha`); e.g. the coupling's :math:`k`, where :math:`f(k) = w_{max}`.
        dtype: compute dtype (default ``W.dtype``; bf16 works).
        matmul_dtype: dtype of the matrix products only (e.g. bf16, Muon's precision): the
            correction ``∓αXXᵀX`` is rounded, ``X`` itself keeps ``dtype``'s precision.

    Example::

        >>> alpha = soft_cap_coupling(w_max=1.0, wd=0.0, max_update_norm=0.05)
        >>> Y = soft_cap(torch.randn(64, 64) / 16, alpha)
    """
    check_matrix(W, "soft_cap")
    alpha = float(alpha)
    if alpha < 0 or not math.isfinite(alpha):
        raise ValueError(f"soft_cap: alpha must be a finite number >= 0, got {alpha}")
    if limit is not None and not (isinstance(limit, (int, float)) and 0 < limit < math.inf):
        raise ValueError(f"soft_cap: limit must be a finite number > 0, got {limit!r}")
    X = _compute(W, dtype)
    if alpha == 0:  # f is the identity: only the limit (if any) applies
        return (X.clone() if limit is None else _into_range(X, float(limit), margin=1.0)).to(W.dtype)
    zero_at = 1 / math.sqrt(alpha)  # f(zero_at) = 0; f < 0 and diverging beyond
    X = _into_range(X, zero_at if limit is None else min(float(limit), zero_at), margin=1.0)
    Y = _odd_poly_(X, ((1.0, -alpha, 0.0), (1.0, alpha, 0.0)), matmul_dtype=matmul_dtype)
    return Y.to(W.dtype)


def hard_cap(
    W: Tensor,
    w_max: float = 1.0,
    *,
    exact: bool = False,
    mode: str | None = None,
    dtype: torch.dtype | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Cap every singular value at ``w_max``: approximately (the paper's polynomial) or exactly.

    ``mode``: ``"polynomial"`` (default), ``"eigh"`` (exact; the same as ``exact=True``; the
    cheapest exact choice on CPU) or ``"msign"`` (exact to float rounding from float32 matrix
    products only, :func:`fx_spectral.msign.msign_clip`: the accelerator choice).

    Polynomial mode (default): four odd steps :math:`\sigma \leftarrow \sigma(a + b\sigma^2 +
    c\sigma^4)` (:data:`HARD_CAP_COEFFICIENTS`) on ``W / w_max``, times ``w_max``: 0.5→0.498,
    1→0.966, 1.185→1.0109 (the peak), 2→1.002 (times ``w_max``). The polynomial holds up to
    σ ≈ 3.5·w_max and diverges beyond: a matrix whose estimated σ exceeds 3·w_max is first scaled
    down into range (all its singular values by one factor), so large steps never give NaN. Every
    finite input gives a finite result (huge entries are divided by the largest one first, so no
    intermediate overflows).
    ``exact=True``: :math:`\min(w_{max}, \sigma)` exactly, as
    :math:`X\, g(X^\top X)` with :math:`g(\lambda) = \min(1, w_{max}/\sqrt\lambda)` from an
    eigendecomposition of the smaller Gram matrix (float32 at least), of ``X / max|X|`` (so the Gram
    never overflows); a matrix with every singular value at most ``w_max`` is returned unchanged.

    Example::

        >>> Y = hard_cap(torch.randn(32, 64) / 4)
        >>> Y = hard_cap(torch.randn(8, 32, 64), w_max=2.0, exact=True)
    """
    check_matrix(W, "hard_cap")
    if not w_max > 0:
        raise ValueError(f"hard_cap: w_max must be > 0, got {w_max}")
    if mode not in HARD_CAP_MODES:
        raise ValueError(f"hard_cap: mode must be one of {HARD_CAP_MODES}, got {mode!r}")
    if exact and mode not in (None, "eigh"):
        raise ValueError(f"hard_cap: exact=True means mode='eigh'; it conflicts with mode={mode!r}")
    if mode == "msign":
        from fx_spectral.msign import msign_clip

        if matmul_dtype is not None and matmul_dtype.itemsize < 4:
            raise ValueError(
                f"hard_cap: mode='msign' runs its products in float32 at least (16-bit products leave the "
                f"polar factor's singular vectors off by several percent); got matmul_dtype={matmul_dtype}"
            )
        return msign_clip(W, w_max, dtype=dtype)
    exact = exact or mode == "eigh"
    X = _compute(W, dtype)
    if not exact:
        X = _into_range(X / w_max, _HARD_CAP_RANGE, margin=1.1)
        return (_odd_poly_(X, HARD_CAP_COEFFICIENTS, matmul_dtype=matmul_dtype) * w_max).to(W.dtype)
    edtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    Y, transposed = _wide(X.to(edtype))  # (m, n), m <= n: the Gram X Xᵀ is m × m
    # One pass leaves an error of about eps·σ₁(X) (the eigenvectors' rounding times the input), so
    # a σ₁ far above w_max (one huge update) takes a few passes, each on the previous result.
    for _ in range(_EXACT_CAP_PASSES):
        Y, ratio = _exact_cap_pass(Y, w_max)
        if not bool((ratio > 2.0).any()):
            break
    if transposed:
        Y = Y.mT
    return Y.to(W.dtype)


_EXACT_CAP_PASSES = 8  # enough for σ₁/w_max up to the float32 range (each pass gains ~1e-6)


def _exact_cap_pass(Xe: Tensor, w_max: float) -> tuple[Tensor, Tensor]:
    # min(σ, w_max) on a wide (m <= n) matrix via eigh of the Gram of Xe / max|Xe| (no overflow);
    # also returns σ₁/w_max of the input. A matrix with nothing to cap is returned as it is.
    Z, peak = _peak_scaled(Xe)  # Z = Xe / peak: entries in [-1, 1], its Gram cannot overflow
    lam, Q = torch.linalg.eigh(_gram(Z))
    sigma = lam.clamp_min(0).sqrt()  # singular values of Z; those of Xe are peak times these
    bound = w_max / peak.squeeze(-1)  # w_max in Z's units, (..., 1)
    g = torch.where(sigma > bound, bound / sigma.clamp_min(1e-30), torch.ones_like(sigma))
    # X_capped = Q g(Λ) Qᵀ X  (left polar factor form, since X Xᵀ = Q Λ Qᵀ)
    Y = (Q * g.unsqueeze(-2)) @ (Q.mT @ Xe)
    inside = (g == 1).all(-1)[..., None, None]  # nothing to cap: the input itself, not Q Qᵀ X
    return torch.where(inside, Xe, Y), sigma[..., -1] / bound.squeeze(-1)


#: ``hard_cap``'s modes (None: "eigh" with ``exact=True``, else "polynomial").
HARD_CAP_MODES = (None, "polynomial", "eigh", "msign")

#: The hard-cap polynomial stays within 1% of 1 up to about 3.5, then turns negative and diverges.
_HARD_CAP_RANGE = 3.0
_RANGE_ITERATIONS = 10


def _into_range(X: Tensor, limit: float, *, margin: float) -> Tensor:
    # Matrices whose spectral norm may exceed a polynomial's range are scaled down into it first
    # (every singular value shrinks by the same factor, so the top ones still land near the top of
    # the range): without this, one large optimizer step turns the weight into NaN. The Frobenius
    # norm bounds sigma from above, so most small matrices stop there; otherwise a power-iteration
    # estimate (times ``margin``, from a private generator so the global RNG does not move)
    # decides, and the factor never exceeds what the Frobenius bound alone would need. Huge
    # entries are divided by the largest one first, so nothing overflows. Differentiable.
    fro = _fro(X.detach())
    if bool((fro <= limit).all()):
        return X
    Z, peak = _peak_scaled(X)  # entries in [-1, 1]; sigma(X) = peak * sigma(Z)
    generator = torch.Generator(X.device).manual_seed(0)
    _, sigma, _ = power_iterate(Z, _RANGE_ITERATIONS, generator=generator)  # carries d(u^T Z v)/dZ
    top = torch.minimum(margin * sigma.abs()[..., None, None], fro.to(Z.dtype) / peak)  # in Z's units
    return torch.where(peak * top > limit, Z * (limit / top.clamp_min(1e-30)).to(X.dtype), X)


def pure_svd(W: Tensor, w_max: float = 1.0, *, dtype: torch.dtype | None = None) -> Tensor:
    r"""Exact cap by SVD: :math:`U \min(S, w_{max}) V^\top` (float32 at least for the SVD).

    Example::

        >>> Y = pure_svd(torch.randn(16, 8), w_max=1.0)
    """
    check_matrix(W, "pure_svd")
    if not w_max > 0:
        raise ValueError(f"pure_svd: w_max must be > 0, got {w_max}")
    X = _compute(W, dtype)
    sdtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(X.to(sdtype), full_matrices=False)
    return ((U * S.clamp_max(w_max).unsqueeze(-2)) @ Vh).to(W.dtype)


def orthogonalize(
    W: Tensor,
    *,
    steps: int = DEFAULT_NS_STEPS,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    exact: bool = False,
    dtype: torch.dtype | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Send every singular value towards 1: :math:`\approx U V^\top` (Newton–Schulz quintic).

    ``W / ‖W‖_F`` then ``steps`` iterations :math:`X \leftarrow aX + (bA + cA^2)X`,
    :math:`A = X X^\top`, with torch.optim.Muon's coefficients: singular values land in about
    [0.68, 1.2] (not exactly 1, by design of those coefficients). ``exact=True`` returns
    :math:`U V^\top` from an SVD (zero singular values stay 0: a zero matrix gives zero).
    Batched, on the smaller Gram side, in ``dtype`` (Muon itself uses bf16).

    Example::

        >>> O = orthogonalize(torch.randn(4, 32, 64))
    """
    check_matrix(W, "orthogonalize")
    X = _compute(W, dtype)
    if exact:
        sdtype = torch.float64 if X.dtype == torch.float64 else torch.float32
        U, S, Vh = torch.linalg.svd(X.to(sdtype), full_matrices=False)
        # U Vᵀ on the numerical range; directions with a zero singular value map to 0 (as
        # Newton–Schulz does), so a zero matrix stays zero instead of becoming an arbitrary U Vᵀ.
        tol = S[..., :1] * (max(X.shape[-2:]) * torch.finfo(sdtype).eps)
        keep = (S > tol).to(sdtype)
        return ((U * keep.unsqueeze(-2)) @ Vh).to(W.dtype)
    a, b, c = coefficients
    return _odd_poly_(X, ((a, b, c),) * steps, normalize_frobenius=True, matmul_dtype=matmul_dtype).to(W.dtype)


# --------------------------------------------------------------------------------------------
# Coupling with the optimizer: the math lives in fx_spectral.coupling (the names stay importable here)
# --------------------------------------------------------------------------------------------

# soft_cap_coupling's old home.
from fx_spectral.coupling import soft_cap_coupling  # noqa: E402, F401
