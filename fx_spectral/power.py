r"""The power iteration, its constants, and the u/v state: one rule for every way into fx_spectral.

Ground floor (torch only). The eager API (:mod:`fx_spectral.nn`), the graph transform and the
``"spectral"`` backend (:mod:`fx_spectral.graph`), the projection ops
(:func:`fx_spectral.projections.power_iterate`), the method handlers (:mod:`fx_spectral.methods`)
and the sharded path (:mod:`fx_spectral.distributed`) all read this module:

.. math::
    u \leftarrow \frac{W v}{\lVert W v \rVert},\quad
    v \leftarrow \frac{W^\top u}{\lVert W^\top u \rVert},\quad
    \hat\sigma = \lVert W^\top u \rVert = u^\top W v

(torch's order: ``u`` first, then ``v``). A norm at or below ``eps`` keeps the previous vector: a
zero weight must not zero u/v for good (they would stay zero once the weight grows, sigma with them).

* constants: :data:`N_WARMUP` (torch's ``_SpectralNorm.__init__``), :data:`TORCH_REGISTER_STEP` (the
  check forward of ``register_parametrization``), :data:`N_INIT` = their sum for the persistent u/v
  buffers (torch parity: same RNG state, same u/v), :func:`n_fresh` for a fresh start that is
  followed by the per-step iterations (constrain: ``N_WARMUP + n_iter``);
* :func:`normalize_or_keep` (plain, or overflow-safe for arbitrary weights) and :func:`iterate`
  (the one loop; a matrix, a batch of matrices or any linear map through ``matvec``/``rmatvec``);
* :func:`compute_dtype`: float64 weights iterate in float64, every other float dtype in float32;
* start vectors: :func:`init_uv` (random unit u/v + :data:`N_INIT` steps: the buffers),
  :func:`fresh_start` / :func:`start_vectors` (zero u, seeded random unit v: constrain's vectors);
* the u/v buffers ``{name}_u`` / ``{name}_v`` of a module: :func:`check_uv` (validate, no mutation)
  and :func:`ensure_uv` (create, reuse, or cast back to float32).

The sharded path keeps its own collective loop (one fused all-reduce computes ``Wv`` and
``WᵀWv``) but normalizes with :func:`normalize_or_keep` and starts with :func:`start_vectors`; the
graph emitter writes the same loop as graph nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = [
    "N_WARMUP",
    "TORCH_REGISTER_STEP",
    "N_INIT",
    "n_fresh",
    "normalize_or_keep",
    "iterate",
    "matrix_products",
    "compute_dtype",
    "init_uv",
    "fresh_start",
    "start_vectors",
    "check_uv",
    "ensure_uv",
]

#: Steps a fresh random start gets first: torch's ``_SpectralNorm.__init__`` runs 15.
N_WARMUP = 15
#: ``torch.nn.utils.parametrize.register_parametrization`` checks the parametrization with one more
#: training forward, which runs one more step: torch's initial u/v have seen ``N_WARMUP + 1``.
TORCH_REGISTER_STEP = 1
#: Steps :func:`init_uv` runs on the persistent u/v buffers (eager API, transform, backend): 16, so
#: that for the same RNG state our first forward equals torch's spectral_norm's.
N_INIT = N_WARMUP + TORCH_REGISTER_STEP
#: Steps an inexact ``Constraint.report(exact=False)`` runs from the stored vectors (plus the
#: :func:`start_vectors` warm-up when none fit), one process or sharded alike.
N_REPORT = 2


def n_fresh(n_iter: int) -> int:
    """Steps for a fresh start followed by ``n_iter`` per-step iterations: ``N_WARMUP + n_iter``.

    (constrain's vectors: its first projection of a weight warms up, then does its usual steps.)

    Example::

        >>> n_fresh(1)
        16
    """
    return N_WARMUP + n_iter


def normalize_or_keep(
    t: Tensor, old: Tensor, eps: float, *, dim: int | None = -1, overflow_safe: bool = False
) -> tuple[Tensor, Tensor]:
    r"""``(t / ||t||, ||t||)`` along ``dim``, or ``old`` where ``||t|| <= eps`` (batched).

    Plain: :math:`\mathrm{where}(\lVert t\rVert > \epsilon,\ t / \max(\lVert t\rVert, \epsilon),\ old)`,
    bit-identical to ``t / ||t||`` wherever the new vector is taken. ``overflow_safe=True`` takes the
    norm of ``t / max|t|`` instead, so entries near the float range (``|t|²`` overflowing) still give
    a finite unit vector (the returned norm, ``max|t| * ||t / max|t|||``, may then be inf); the
    projection ops use it, as their weights are arbitrary.

    Args:
        t: the new direction: ``(..., k)`` (a batch of vectors along ``dim=-1``), or any shape with
            ``dim=None`` (one vector: the whole tensor, e.g. an operator-mode u/v shaped like an example).
        old: same shape as ``t``, kept where ``t`` vanishes.
        eps: the threshold (a guard against division by ~0).
        dim: the vector dim (-1), or None for the whole tensor.
        overflow_safe: scale by the peak entry before taking the norm.

    Returns:
        ``(unit, norm)``; ``norm`` has ``t``'s shape without ``dim`` (0-d for ``dim=None`` or 1-D ``t``).

    Example::

        >>> unit, norm = normalize_or_keep(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0]), 1e-12)
        >>> unit.tolist(), float(norm)
        ([0.6000000238418579, 0.800000011920929], 5.0)
    """
    whole = dim is None or t.dim() == 1
    if overflow_safe:
        peak = t.abs().amax() if whole else t.abs().amax(dim, keepdim=True)
        unit = t / torch.where(peak > 0, peak, torch.ones_like(peak))
        norm_unit = torch.linalg.vector_norm(unit) if whole else torch.linalg.vector_norm(unit, dim=dim, keepdim=True)
        norm = peak * norm_unit
        unit = torch.where(norm > eps, unit / norm_unit.clamp_min(1e-30), old)
        return unit, norm if whole else norm.squeeze(dim)
    if whole:  # the eager hot path: one vector, a 0-d norm
        norm = torch.linalg.vector_norm(t)
        if _host_branch_ok(t):
            # Eager on CPU: reading the norm costs nothing (no device to wait for), and a Python
            # branch replaces gt / clamp_min / where (3 of the 5 ops). Same values: t / ||t|| is
            # t / max(||t||, eps) where ||t|| > eps; the kept vector is a copy, as where() gives.
            if norm.item() > eps:
                return t / norm, norm
            return old.clone(), norm
        return torch.where(norm > eps, t / norm.clamp_min(eps), old), norm
    norm = torch.linalg.vector_norm(t, dim=dim, keepdim=True)
    return torch.where(norm > eps, t / norm.clamp_min(eps), old), norm.squeeze(dim)


def _host_branch_ok(t: Tensor) -> bool:
    """Whether ``t``'s values may steer Python control flow for free: a plain CPU tensor in eager mode.

    Not on an accelerator (``.item()`` waits for the device), nor while anything traces or
    transforms (torch.compile, export / make_fx dispatch modes, FakeTensor, torch.func), where a
    data-dependent branch would break the graph or fail.
    """
    return (
        type(t) is Tensor
        and t.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
        and not torch._C._are_functorch_transforms_active()
    )


def _mv(X: Tensor, v: Tensor) -> Tensor:
    return (X @ v.unsqueeze(-1)).squeeze(-1)


def matrix_products(W: Tensor) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(v -> W v, u -> Wᵀ u)`` for a matrix (``torch.mv``) or a batch ``(..., m, n)`` of matrices."""
    if W.dim() == 2:
        Wt = W.t()
        return (lambda x: torch.mv(W, x)), (lambda x: torch.mv(Wt, x))
    Wt = W.mT
    return (lambda x: _mv(W, x)), (lambda x: _mv(Wt, x))


def iterate(
    matvec: Callable[[Tensor], Tensor] | Tensor,
    rmatvec: Callable[[Tensor], Tensor] | None,
    u: Tensor,
    v: Tensor,
    n_iter: int,
    eps: float,
    *,
    overflow_safe: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""``n_iter`` power-iteration steps, torch's order: :math:`u = N(Wv)`, then :math:`v = N(W^\top u)`.

    ``N`` is :func:`normalize_or_keep`. Pure: returns new tensors (for ``n_iter >= 1``), the inputs
    are not modified; call it under ``torch.no_grad()`` (u and v are constants of the estimate).

    Args:
        matvec: ``v -> W v``, or the matrix ``W`` itself (``(m, n)`` or a batch ``(..., m, n)``;
            then ``rmatvec`` is None).
        rmatvec: ``u -> Wᵀ u`` (None when ``matvec`` is a matrix).
        u, v: the current vectors, in the compute dtype.
        n_iter: steps (0 returns the inputs and no norm).
        eps: see :func:`normalize_or_keep`.
        overflow_safe: see :func:`normalize_or_keep`.

    Returns:
        ``(u, v, ||Wᵀu||)``; the last is the estimate :math:`\hat\sigma = u^\top W v` (None for 0 steps).

    Example::

        >>> W = torch.randn(8, 4)
        >>> u, v, sigma = iterate(W, None, torch.zeros(8), F.normalize(torch.ones(4), dim=0), 30, 1e-12)
    """
    if isinstance(matvec, Tensor):
        matvec, rmatvec = matrix_products(matvec)
    norm = None
    for _ in range(n_iter):
        u, _ = normalize_or_keep(matvec(v), u, eps, overflow_safe=overflow_safe)
        v, norm = normalize_or_keep(rmatvec(u), v, eps, overflow_safe=overflow_safe)
    return u, v, norm


def compute_dtype(weight_dtype: torch.dtype, override: torch.dtype | None = None) -> torch.dtype:
    """The dtype a power iteration runs in: ``override`` if given, else float64 for float64 weights and
    float32 for every other float dtype (fp16/bf16 u/v would lose the estimate's precision).

    Example::

        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64), compute_dtype(torch.float16, torch.float64)
        (torch.float32, torch.float64, torch.float64)
    """
    if override is not None:
        return override
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _matrix(weight: Tensor, dim: int) -> Tensor:
    # The matrix view of a weight (output dim first, the rest flattened); a view when possible.
    if dim != 0:
        weight = weight.movedim(dim, 0)
    return weight.flatten(1)


@torch.no_grad()
def init_uv(weight: Tensor, dim: int, eps: float) -> tuple[Tensor, Tensor]:
    """Fresh float32 u/v for ``weight``'s matrix view: random unit vectors (the global RNG, as torch's
    spectral_norm) and :data:`N_INIT` steps on the float32 matrix. Same RNG state: torch's u/v.

    Example::

        >>> u, v = init_uv(torch.randn(8, 3, 2), 0, 1e-12)
        >>> u.shape, v.shape, u.dtype
        (torch.Size([8]), torch.Size([6]), torch.float32)
    """
    w_mat = _matrix(weight.detach().float(), dim)
    h, w = w_mat.shape
    u = F.normalize(w_mat.new_empty(h).normal_(0, 1), dim=0, eps=eps)
    v = F.normalize(w_mat.new_empty(w).normal_(0, 1), dim=0, eps=eps)
    u, v, _ = iterate(w_mat, None, u, v, N_INIT, eps)
    return u, v


def fresh_start(
    m: int,
    n: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    batch: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A fresh start for ``(..., m, n)`` matrices: ``u = 0`` (replaced by the first step) and a random
    unit ``v`` drawn from ``generator`` (the global RNG if None)."""
    v = torch.randn(*batch, n, dtype=dtype, device=device, generator=generator)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return torch.zeros(*batch, m, dtype=dtype, device=device), v


def start_vectors(
    prev: tuple[Tensor, Tensor] | None,
    m: int,
    n: int,
    seed: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Where constrain's power iteration of an ``(m, n)`` matrix starts: ``(u, v, extra_steps)``.

    The stored ``prev = (u, v)`` if it fits the matrix (copies, in ``dtype`` on ``device``; 0 extra
    steps), else :func:`fresh_start` from a generator seeded with ``seed`` (so every rank and every
    rerun draws the same start) and :data:`N_WARMUP` extra steps.

    Example::

        >>> u, v, extra = start_vectors(None, 4, 3, seed=7, dtype=torch.float32)
        >>> extra, float(u.abs().sum()), round(float(v.norm()), 6)
        (15, 0.0, 1.0)
    """
    if prev is not None and prev[0].shape[-1] == m and prev[1].shape[-1] == n:
        return prev[0].to(device, dtype).clone(), prev[1].to(device, dtype).clone(), 0
    gen = torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)
    u, v = fresh_start(m, n, dtype=dtype, device=device, generator=gen)
    return u, v, N_WARMUP


# --------------------------------------------------------------------------------------------
# The u/v buffers of a module
# --------------------------------------------------------------------------------------------

UVAction = Literal["create", "recast", "keep"]


def check_uv(owner: nn.Module, name: str, weight: Tensor, dim: int, where: str) -> UVAction:
    """Validate the u/v buffers ``{name}_u`` / ``{name}_v`` of ``owner`` for ``weight`` (no mutation).

    The rule every way in shares (eager API, graph transform, backend): u/v are float32 vectors of
    lengths (rows, cols) of the matrix view of ``weight`` (``dim`` first, the rest flattened).

    Returns:
        ``"create"`` (neither buffer exists), ``"keep"`` (both fit), or ``"recast"`` (both fit but one
        has another floating dtype, e.g. after ``model.double()`` / ``.half()`` on a plain module:
        they are cast back to float32).

    Raises:
        ValueError: naming ``{where}_u`` / ``{where}_v``: a buffer of the wrong shape or a non-float
        dtype, only one of the two, or an attribute of that name that is not a buffer.
    """
    shape = list(weight.shape)
    rows = shape.pop(dim)
    cols = math.prod(shape)
    have = [owner._buffers.get(name + k) for k in ("_u", "_v")]
    if all(t is None for t in have):
        for k in ("_u", "_v"):
            if hasattr(owner, name + k):
                raise ValueError(
                    f"{where}{k}: {type(owner).__name__} already has an attribute {name + k!r} that is not a "
                    "buffer, where the power-iteration vector goes"
                )
        return "create"
    action: UVAction = "keep"
    for t, n, k in zip(have, (rows, cols), ("_u", "_v")):
        if not (isinstance(t, Tensor) and t.dtype.is_floating_point and tuple(t.shape) == (n,)):
            got = "missing" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
            raise ValueError(
                f"{where}{k} must be a float32 vector of length {n} (the matrix view of a weight of shape "
                f"{tuple(weight.shape)}, dim={dim}), got {got}; remove it, or load a matching checkpoint"
            )
        if t.dtype != torch.float32:
            action = "recast"
    return action


def ensure_uv(owner: nn.Module, name: str, weight: Tensor, dim: int, eps: float, where: str) -> UVAction:
    """Give ``owner`` float32 u/v buffers ``{name}_u`` / ``{name}_v`` for ``weight``: the one u/v helper.

    Missing: created by :func:`init_uv` (registered buffers: part of ``state_dict()`` from now on).
    Existing and fitting: reused. Fitting but of another floating dtype: cast back to float32.
    Anything else: ``ValueError`` (see :func:`check_uv`), and nothing is changed. To validate several
    weights before changing any, call :func:`check_uv` on all of them first, then this on each (a
    weight listed twice is then created once, and kept the second time).

    Args:
        owner: the module that holds (or will hold) the buffers.
        name: the parameter's name on ``owner``.
        weight: the parameter (its matrix view sizes u/v).
        dim: the output dim of ``weight`` (first in the matrix view).
        eps: see :func:`init_uv`.
        where: the module path and parameter name for messages (e.g. ``"spectral backend: fc.weight"``).

    Returns:
        What was done: ``"create"``, ``"recast"`` or ``"keep"``.

    Example::

        >>> fc = nn.Linear(3, 4)
        >>> ensure_uv(fc, "weight", fc.weight, 0, 1e-12, "fc.weight")
        'create'
        >>> _ = fc.double()  # a plain module converts its buffers too
        >>> ensure_uv(fc, "weight", fc.weight, 0, 1e-12, "fc.weight"), fc.weight_u.dtype
        ('recast', torch.float32)
    """
    action = check_uv(owner, name, weight, dim, where)
    if action == "recast":
        for k in (name + "_u", name + "_v"):
            # NB: replaces the converted buffers in owner._buffers by float32 copies.
            owner._buffers[k] = owner._buffers[k].float()
    elif action == "create":
        with torch.inference_mode(False):  # a first call under inference_mode must not create inference tensors
            u, v = init_uv(weight, dim, eps)
        # NB: registers {name}_u / {name}_v on owner.
        owner.register_buffer(name + "_u", u)
        owner.register_buffer(name + "_v", v)
    return action
