r"""The convolution machinery behind :mod:`fx_spectral.operator_norms`: geometry, proven upper
bounds and an attained lower bound of a convolution's operator norm.

- Geometry: every conv kind (any stride, dilation, groups, padding mode; transposed ones as the
  adjoint of a forward convolution on their output grid) becomes one forward convolution
  ``_Conv`` acting on one example, with its input and output shapes (:func:`conv_bound`).
- Upper bounds (proven): the circulant symbol of a cyclic embedding (polyphase for strides; zero
  padding on a grid large enough that nothing aliases, or one sub-grid per dilation residue class;
  circular padding exactly), the padding map's norm times the unpadded convolution's (reflect /
  replicate), and the dense Jacobian's exact largest singular value when it is small. The math of
  each, and the ``method`` names, are in :mod:`fx_spectral.operator_norms`.
- Lower bound (attained): Lanczos on :math:`A^\top A` with the functional op and its autograd
  adjoint, in float64 (:func:`lanczos_lower`).

Example::

    >>> b = conv_bound(torch.randn(8, 3, 3, 3), (3, 16, 16), 1, 1, 1, 1, False, 0, "zeros", 1 << 20, "conv")
    >>> b.upper, b.method, b.output_shape      # e.g. (2.91, 'dense', (8, 16, 16))
    >>> lower, _ = lanczos_lower(b.apply, b.input_shape, n_iter=64, restarts=4, seed=0)
    >>> lower <= b.upper
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fx_spectral.kinds import CONV_FN, CONV_T_FN

__all__ = [
    "GRID_TRIES",
    "SVD_MARGIN",
    "ConvBound",
    "conv_bound",
    "lanczos_lower",
    "padding_map_norm",
]

#: Relative margin added to every SVD-based value used as a proof (float64 SVD is accurate to
#: about ``dim * 1e-16`` relative; 1e-9 covers any size that fits in memory).
SVD_MARGIN = 1e-9
#: How many valid cyclic grid sizes the zero-padding bound tries (the smallest and the next ones).
GRID_TRIES = 4
_CONV_FN = CONV_FN  # spatial dims -> F.conv{d}d (the kinds table)
_CONV_T_FN = CONV_T_FN  # spatial dims -> F.conv_transpose{d}d


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




@dataclass(frozen=True)
class ConvBound:
    """A convolution set up for its operator norm: the proven upper bound and the op itself.

    Attributes:
        upper: proven upper bound of the operator norm (``SVD_MARGIN`` included).
        method: which bound gave ``upper`` (see :mod:`fx_spectral.operator_norms`).
        input_shape / output_shape: one example's shapes (no batch dimension).
        apply: the op (bias-free) on a batch of shape ``(B, *input_shape)``, differentiable.
    """

    upper: float
    method: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    apply: Callable[[Tensor], Tensor]


def conv_bound(
    weight: Tensor,
    input_shape,
    stride,
    padding,
    dilation,
    groups: int,
    transposed: bool,
    output_padding,
    padding_mode: str,
    dense_limit: int,
    where: str,
) -> ConvBound:
    """The geometry and proven upper bound of a functional convolution, checked (``ValueError``
    naming ``where`` on a bad argument). The arguments are those of
    :func:`fx_spectral.operator_norms.conv_upper_bound`; the weight is read in float64, detached.
    """
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
    return ConvBound(upper, method, in_shape, out_shape, op)


# --------------------------------------------------------------------------------------------
# Lower bound: Lanczos on A^T A (functional op + autograd adjoint), float64
# --------------------------------------------------------------------------------------------


def lanczos_lower(op, in_shape: tuple[int, ...], n_iter: int, restarts: int, seed: int) -> tuple[float, int]:
    """The best attained ``||op(v)|| / ||v||`` over at most ``restarts`` Lanczos cycles of ``n_iter``
    steps on ``op^T op`` (the adjoint by autograd), float64: ``(lower, operator applications)``.

    Attained, so never above the operator norm whatever the convergence; ``seed`` seeds a private
    generator for the starting vector (the global RNG is untouched).
    """
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

