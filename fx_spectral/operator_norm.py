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

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from fx_spectral.kinds import CONV_FN, CONV_T_FN, CONV_TRANSPOSE, kind_of
from fx_spectral.nn import is_spectral_normalized, spectral_sigma

__all__ = [
    "OperatorNorm",
    "conv_operator_norm",
    "conv_upper_bound",
    "effective_weight",
    "operator_norm",
    "padding_map_norm",
]

#: Relative margin added to every SVD-based value used as a proof (float64 SVD is accurate to
#: about ``dim * 1e-16`` relative; 1e-9 covers any size that fits in memory).
SVD_MARGIN = 1e-9
#: How many valid cyclic grid sizes the zero-padding bound tries (the smallest and the next ones).
GRID_TRIES = 4
_CONV_FN = CONV_FN  # spatial dims -> F.conv{d}d (the kinds table)
_CONV_T_FN = CONV_T_FN  # spatial dims -> F.conv_transpose{d}d


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
# Geometry: every conv kind as a forward convolution (transposed ones as their adjoint)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Conv:
    """A forward convolution ``y[t] = sum_j W[j] x_pad[t*s + j*d]`` per spatial dim, no bias."""

    weight: Tensor  # (C_out, C_in / groups, *k), float64
    n: tuple[int, ...]  # input spatial size
    pads: tuple[tuple[int, int], ...]  # (left, right) per dim
    n_out: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    mode: str  # zeros | circular | reflect | replicate

    @property
    def k(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def group_weights(self) -> Tensor:
        """``(groups, C_out/groups, C_in/groups, *k)``."""
        w = self.weight
        return w.reshape(self.groups, w.shape[0] // self.groups, *w.shape[1:])

    def apply(self, x: Tensor, weight: Tensor | None = None, groups: int | None = None) -> Tensor:
        """The operator on a batch ``x`` of shape ``(B, C_in, *n)``."""
        pad = [p for lr in reversed(self.pads) for p in lr]
        x = F.pad(x, pad, mode="constant" if self.mode == "zeros" else self.mode)
        w = self.weight if weight is None else weight
        groups = self.groups if groups is None else groups
        return _CONV_FN[len(self.n)](x, w, None, self.stride, 0, self.dilation, groups)


def _tuple(v, d: int, what: str, where: str) -> tuple[int, ...]:
    t = (v,) * d if isinstance(v, int) else tuple(v)
    if len(t) != d or not all(isinstance(i, int) for i in t):
        raise ValueError(f"{where}: expected {what} to be an int or {d} ints, got {v!r}")
    return t


def _forward_conv(
    weight: Tensor, input_shape, stride, padding, dilation, groups, transposed, output_padding, padding_mode, where
) -> tuple[_Conv, tuple[int, ...], tuple[int, ...]]:
    """The forward convolution whose norm is the op's, with the op's (input, output) example shapes."""
    d = weight.dim() - 2
    if d not in (1, 2, 3):
        raise ValueError(f"{where}: expected a 3-, 4- or 5-d conv weight, got shape {tuple(weight.shape)}")
    shape = tuple(int(i) for i in input_shape)
    c_in = weight.shape[0] if transposed else weight.shape[1] * groups
    if len(shape) != d + 1 or shape[0] != c_in or min(shape) < 1:
        raise ValueError(
            f"{where}: expected input_shape (C_in={c_in}, {d} spatial sizes) for one example (no batch dim), "
            f"got {shape}"
        )
    stride, dilation = _tuple(stride, d, "stride", where), _tuple(dilation, d, "dilation", where)
    k, n = tuple(weight.shape[2:]), shape[1:]
    w64 = weight.detach().to(torch.float64)
    if transposed:
        if padding_mode != "zeros":
            raise ValueError(
                f"{where}: transposed convolutions only support padding_mode='zeros', got {padding_mode!r}"
            )
        pad, op = _tuple(padding, d, "padding", where), _tuple(output_padding, d, "output_padding", where)
        big = tuple((n[i] - 1) * stride[i] - 2 * pad[i] + dilation[i] * (k[i] - 1) + op[i] + 1 for i in range(d))
        if min(big) < 1:
            raise ValueError(f"{where}: the output of the transposed convolution would be empty ({big})")
        c_out = weight.shape[1] * groups
        spec = _Conv(w64, big, tuple((p, p) for p in pad), n, stride, dilation, groups, "zeros")
        if _out_size(spec) != n:
            raise ValueError(f"{where}: output_padding {op} is not smaller than stride or dilation")
        return spec, shape, (c_out, *big)
    if isinstance(padding, str):
        if padding == "valid":
            pads = ((0, 0),) * d
        elif padding == "same":
            pads = tuple((t // 2, t - t // 2) for t in (dilation[i] * (k[i] - 1) for i in range(d)))
        else:
            raise ValueError(f"{where}: padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    else:
        pads = tuple((p, p) for p in _tuple(padding, d, "padding", where))
    if padding_mode not in ("zeros", "circular", "reflect", "replicate"):
        raise ValueError(f"{where}: unknown padding_mode {padding_mode!r}")
    spec = _Conv(w64, n, pads, (0,) * d, stride, dilation, groups, padding_mode)
    n_out = _out_size(spec)
    if min(n_out) < 1:
        raise ValueError(f"{where}: input {shape} is too small for kernel {k} (output size {n_out})")
    spec = _Conv(w64, n, pads, n_out, stride, dilation, groups, padding_mode)
    return spec, shape, (weight.shape[0], *n_out)


def _out_size(spec: _Conv) -> tuple[int, ...]:
    return tuple(
        (spec.n[i] + sum(spec.pads[i]) - spec.dilation[i] * (spec.k[i] - 1) - 1) // spec.stride[i] + 1
        for i in range(len(spec.n))
    )


# --------------------------------------------------------------------------------------------
# Upper bounds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DimPlan:
    """One spatial dim of a cyclic embedding: grid size, phases, each tap's (position, phase), and
    the largest number of outputs landing on one grid position."""

    grid: int
    phases: int
    taps: tuple[tuple[int, int], ...]
    mult: int


def _zero_plan(n: int, pl: int, n_out: int, s: int, d: int, k: int, skip: int = 0) -> _DimPlan:
    """Polyphase cyclic embedding of a zero-padded dim with no aliasing onto the input's support
    (the smallest valid grid, or the ``skip``-th valid one after it: each gives a sound bound)."""
    taps = tuple(((j * d) // s, (j * d) % s) for j in range(k))
    # Phase b holds x_pad[s q + b]; x occupies x_pad[pl : pl + n].
    support = {b: range(-((b - pl) // s), -((b - pl - n) // s)) for b in range(s)}
    accessed = {b: {t + a for (a, bb) in taps if bb == b for t in range(n_out)} for b in range(s)}
    grid = max(n_out, 1)
    for _ in range(skip + 1):
        while not all(_no_alias(support[b], accessed[b], grid) for b in range(s)):
            grid += 1
        grid += 1
    return _DimPlan(grid - 1, s, taps, 1)


def _no_alias(sup: range, accessed: set[int], grid: int) -> bool:
    """Whether the cyclic grid holds ``sup`` without overlap and no accessed index outside ``sup``
    lands on it modulo ``grid`` (then the cyclic operator restricted to ``sup`` is the true one)."""
    if len(sup) == 0:
        return True
    lo, width = sup.start, len(sup)
    return width <= grid and not any(not lo <= q < sup.stop and (q - lo) % grid < width for q in accessed)


def _circular_plan(n: int, pl: int, n_out: int, s: int, d: int, k: int) -> _DimPlan:
    """Circular padding: ``x_pad[m] = x[(m - pl) mod n]``; polyphase when ``s`` divides ``n``."""
    if n % s == 0:
        grid = n // s
        taps = tuple((((j * d - pl) // s) % grid, (j * d - pl) % s) for j in range(k))
        positions = [t % grid for t in range(n_out)]
        phases = s
    else:
        grid, phases = n, 1
        taps = tuple(((j * d - pl) % n, 0) for j in range(k))
        positions = [(t * s) % n for t in range(n_out)]
    mult = max(positions.count(p) for p in set(positions))
    return _DimPlan(grid, phases, taps, mult)


def _symbol_bound(gw: Tensor, plans: list[_DimPlan], chunk_elems: int = 1 << 22) -> float:
    r"""``sqrt(prod mult) * max_w sigma_max(K_hat(w))`` over the plans' DFT grid, groups batched.

    ``K_hat(w)[o, (c, b)] = sum_{j: phase(j) = b} W[o, c, j] exp(-2 pi i <a_j, w / grid>)``: a
    direct DFT over the kernel's taps (few), so no grid-sized kernel is ever materialized. Half the
    grid suffices: a real kernel has ``K_hat(-w) = conj(K_hat(w))``.
    """
    g, co, ci = gw.shape[:3]
    D = len(plans)
    phase_count = math.prod(p.phases for p in plans)
    taps = list(itertools.product(*(range(len(p.taps)) for p in plans)))
    pos = torch.tensor([[plans[i].taps[j[i]][0] for i in range(D)] for j in taps], dtype=torch.float64)
    phase = torch.tensor(
        [sum(plans[i].taps[j[i]][1] * math.prod(p.phases for p in plans[i + 1 :]) for i in range(D)) for j in taps]
    )
    w_taps = gw.reshape(g, co, ci, -1)  # (g, co, ci, T) in the order of itertools.product
    # Scatter taps by phase: (g, co, ci, P, T) with zeros where a tap belongs to another phase.
    scat = torch.zeros(g, co, ci, phase_count, len(taps), dtype=torch.float64)
    scat[:, :, :, phase, torch.arange(len(taps))] = w_taps
    scat = scat.to(torch.complex128)
    sizes = [p.grid for p in plans]
    sizes_half = sizes[:-1] + [sizes[-1] // 2 + 1]
    freqs = torch.cartesian_prod(*(torch.arange(m, dtype=torch.float64) for m in sizes_half)).reshape(-1, D)
    inv = torch.tensor([1.0 / m for m in sizes], dtype=torch.float64)
    per = max(1, chunk_elems // max(1, g * co * ci * phase_count))
    best = 0.0
    for f in freqs.split(per):
        e = torch.exp(-2j * math.pi * ((f * inv) @ pos.T))  # (F, T)
        k_hat = torch.einsum("gocpt,ft->fgocp", scat, e).reshape(-1, co, ci * phase_count)
        best = max(best, float(torch.linalg.matrix_norm(k_hat, ord=2).max()))
    return math.sqrt(math.prod(p.mult for p in plans)) * best


def _zero_bound(spec: _Conv) -> tuple[float, str]:
    D = len(spec.n)
    gw = spec.group_weights()
    # Every valid grid gives a sound bound; the DFT samples differ, so take the best of a few.
    best, method = min(
        _symbol_bound(gw, [_zero_plan(spec.n[i], spec.pads[i][0], spec.n_out[i], spec.stride[i], spec.dilation[i],
                                      spec.k[i], skip) for i in range(D)])
        for skip in range(GRID_TRIES)
    ), "circulant"
    plans = [_zero_plan(spec.n[i], spec.pads[i][0], spec.n_out[i], spec.stride[i], spec.dilation[i], spec.k[i])
             for i in range(D)]
    if any(spec.stride[i] == 1 and spec.dilation[i] > 1 for i in range(D)):
        # Residue classes mod the dilation: independent undilated convolutions on sub-grids.
        per_dim: list[set[_DimPlan]] = []
        for i in range(D):
            n, (pl, _), n_out = spec.n[i], spec.pads[i], spec.n_out[i]
            s, d, k = spec.stride[i], spec.dilation[i], spec.k[i]
            if s != 1 or d == 1:
                per_dim.append({plans[i]})
                continue
            classes = set()
            for r in range(min(d, n_out)):
                m0 = (r - pl) % d
                n_in_r = len(range(m0, n, d))
                n_out_r = len(range(r, n_out, d))
                pl_r = (pl + m0 - r) // d
                if n_in_r and n_out_r:
                    classes.add((n_in_r, pl_r, n_out_r, 1, 1, k))
            per_dim.append(classes)
        classes_bound = max(
            min(_symbol_bound(gw, [c if isinstance(c, _DimPlan) else _zero_plan(*c, skip) for c in combo])
                for skip in range(GRID_TRIES))
            for combo in itertools.product(*per_dim)
        )
        if classes_bound < best:
            best, method = classes_bound, "circulant-classes"
    return best, method


def padding_map_norm(n: int, pl: int, pr: int, mode: str) -> float:
    """Norm of 1-d ``reflect`` / ``replicate`` / ``circular`` padding of ``n`` entries by ``(pl, pr)``:
    ``sqrt`` of the largest number of copies of one entry (``P^T P`` is diagonal)."""
    idx = torch.arange(-pl, n + pr)
    if mode == "circular":
        idx = idx % n
    elif mode == "reflect":
        idx = torch.where(idx < 0, -idx, idx)
        idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx)
    else:
        idx = idx.clamp(0, n - 1)
    return math.sqrt(int(torch.bincount(idx, minlength=n).max()))


def _structured_bound(spec: _Conv) -> tuple[float, str]:
    D = len(spec.n)
    if spec.mode == "zeros":
        return _zero_bound(spec)
    if spec.mode == "circular":
        plans = [_circular_plan(spec.n[i], spec.pads[i][0], spec.n_out[i], spec.stride[i], spec.dilation[i],
                                spec.k[i]) for i in range(D)]
        return _symbol_bound(spec.group_weights(), plans), "circular"
    p_norm = math.prod(padding_map_norm(spec.n[i], *spec.pads[i], spec.mode) for i in range(D))
    valid = _Conv(spec.weight, tuple(spec.n[i] + sum(spec.pads[i]) for i in range(D)), ((0, 0),) * D, spec.n_out,
                  spec.stride, spec.dilation, spec.groups, "zeros")
    return p_norm * _zero_bound(valid)[0], "padding-map"


def _dense_bound(spec: _Conv) -> float:
    """Exact largest singular value of each group's dense Jacobian (float64), max over groups."""
    gw = spec.group_weights()
    c_in_g = spec.weight.shape[1]
    dim_in = c_in_g * math.prod(spec.n)
    eye = torch.eye(dim_in, dtype=torch.float64).reshape(dim_in, c_in_g, *spec.n)
    best = 0.0
    for w in gw:
        rows = spec.apply(eye, w, 1).reshape(dim_in, -1)  # row i = A e_i, i.e. A^T
        small = rows.T @ rows if rows.shape[1] < rows.shape[0] else rows @ rows.T
        best = max(best, float(torch.linalg.eigvalsh(small)[-1].clamp_min(0).sqrt()))
    return best


def _dense_size(spec: _Conv) -> tuple[int, int]:
    c_out_g = spec.weight.shape[0] // spec.groups
    return spec.weight.shape[1] * math.prod(spec.n), c_out_g * math.prod(spec.n_out)


def _upper(spec: _Conv, dense_limit: int) -> tuple[float, str]:
    best, method = _structured_bound(spec)
    dim_in, dim_out = _dense_size(spec)
    if min(dim_in, dim_out) <= 1024 and dim_in * dim_out <= dense_limit:
        dense = _dense_bound(spec)
        if dense <= best:
            best, method = dense, "dense"
    return best * (1 + SVD_MARGIN), method


# --------------------------------------------------------------------------------------------
# Lower bound: Lanczos on A^T A (functional op + autograd adjoint), float64
# --------------------------------------------------------------------------------------------


def _lanczos_lower(op, in_shape: tuple[int, ...], n_iter: int, restarts: int, seed: int) -> tuple[float, int]:
    dim = math.prod(in_shape)
    m = max(2, min(n_iter, dim, (1 << 24) // max(dim, 1)))  # keep the two bases under ~256 MB

    def gram(v: Tensor) -> Tensor:
        x = v.reshape(1, *in_shape).requires_grad_(True)
        with torch.enable_grad():
            y = op(x)
            (g,) = torch.autograd.grad(y, x, y.detach())
        return g.reshape(-1)

    def attained(v: Tensor) -> float:
        with torch.no_grad():
            return float(torch.linalg.vector_norm(op(v.reshape(1, *in_shape))) / torch.linalg.vector_norm(v))

    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=gen, dtype=torch.float64)
    best, used = 0.0, 0
    for _ in range(max(1, restarts)):
        Q = torch.zeros(m, dim, dtype=torch.float64)
        BQ = torch.zeros(m, dim, dtype=torch.float64)  # B q_i, for an exact Rayleigh-Ritz step
        q, b_prev, top = v / torch.linalg.vector_norm(v), 0.0, 0.0
        k = 0
        for i in range(m):
            Q[i] = q
            BQ[i] = gram(q)
            used += 1
            k = i + 1
            a = float(BQ[i] @ q)
            top = max(top, abs(a))
            w = BQ[i] - a * q - (b_prev * Q[i - 1] if i else 0)
            # Full reorthogonalization (twice is enough) against the whole basis.
            for _ in range(2):
                w = w - Q[:k].T @ (Q[:k] @ w)
            b_prev = float(torch.linalg.vector_norm(w))
            if b_prev <= 1e-10 * top:  # the Krylov space is exhausted (invariant subspace found)
                break
            q = w / b_prev
        # Rayleigh-Ritz on span(Q) with the stored products: robust to any loss of orthogonality.
        H = Q[:k] @ BQ[:k].T
        _, vecs = torch.linalg.eigh((H + H.T) / 2)
        v = Q[:k].T @ vecs[:, -1]
        value = attained(v)
        improved = value > best * (1 + 1e-12)
        best = max(best, value)
        if not improved or k < m:
            break
    return best, used


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
    spec, _, out_shape = _forward_conv(
        weight, input_shape, stride, padding, dilation, groups, transposed, output_padding, padding_mode, where
    )
    upper, method = _upper(spec, dense_limit)
    return upper, method, out_shape


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
    spec, in_shape, out_shape = _forward_conv(
        weight, input_shape, stride, padding, dilation, groups, transposed, output_padding, padding_mode, where
    )
    upper, method = _upper(spec, dense_limit)
    if transposed:
        d = weight.dim() - 2
        w64, st, pd = spec.weight, spec.stride, tuple(p for p, _ in spec.pads)
        op_pad = _tuple(output_padding, d, "output_padding", where)
        op = lambda x: _CONV_T_FN[d](x, w64, None, st, pd, op_pad, groups, spec.dilation)  # noqa: E731
    else:
        op = spec.apply
    lower, used = _lanczos_lower(op, in_shape, n_iter, restarts, seed)
    return OperatorNorm(min(lower, upper), upper, method, used, in_shape, out_shape)


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
