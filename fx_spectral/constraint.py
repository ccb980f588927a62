r"""``constrain()``: project weights after every optimizer step (Lipschitz-transformer style).

.. math::
    W \leftarrow s\cdot\mathrm{project}(W / s), \qquad s = \sqrt{\mathrm{fan\_out}/\mathrm{fan\_in}}

so every cap is on the RMS→RMS operator norm :math:`\sigma_1(W)/s` (arXiv 2507.13338). The ops live in
:mod:`fx_spectral.projections`; what one projection of one matrix does (the method configs,
:func:`~fx_spectral.methods.project_matrix`, the soft cap's coupling to torch.optim.Muon) in
:mod:`fx_spectral.methods`; this file is the machinery that selects weights, keeps persistent
power-iteration vectors, hooks the optimizer and reports; which weights it selects is
:mod:`fx_spectral.selection`.

Structure (so other pieces can hook in):

* every per-weight projection goes through :func:`fx_spectral.methods.project_matrix`; the method
  configs are re-exported here (``from fx_spectral.constraint import SoftCap`` works);
* :meth:`Constraint._project_all` holds the ONE DTensor dispatch point, which hands all sharded
  parameters together to ``fx_spectral.distributed_projection.prepare_dtensors(handle, targets, method)``;
* a projection step is all or nothing (validate and compute everything, then write), and
  ``constrain()`` projects into the ball once at registration (``initial_projection``).
"""

from __future__ import annotations

import functools
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fx_spectral import methods as _methods
from fx_spectral import power as P
from fx_spectral import projections as C
from fx_spectral.coupling import decay, is_muon_group, muon_update_norm
from fx_spectral.errors import ProjectionError, projection_error
from fx_spectral.kinds import module_rms_scale, weight_matrix
from fx_spectral.methods import *  # noqa: F403  (the method configs and METHODS: re-exported, see __all__)
from fx_spectral.methods import (
    HardCap,
    Method,
    ProjectionContext,
    SpectralNormalize,
    method_config,
    project_matrix,
    registration,
)
from fx_spectral.selection import (  # noqa: F401  (HEAD_NAMES, default_names: re-exported, their old home)
    HEAD_NAMES,
    Target,
    activation_modules,
    default_names,
    is_dtensor,
    matrices,
    select_targets,
)

__all__ = [  # plus fx_spectral.methods' public names (every registered method config, METHODS, ...)
    "constrain",
    "Constraint",
    "Target",
    "Piece",
    "VectorStore",
    "ProjectionError",
    *_methods.__all__,
]

def initial_projection_method(method: Method) -> Method | None:
    """The exact projection into the ball that ``constrain(..., initial_projection=True)`` applies.

    Read from the method's registration (:func:`fx_spectral.methods.register`). Rank-one methods
    (spectral normalize, hammer): ``W / max(1, σ₁/w_max)`` with the exact σ₁
    (``SpectralNormalize(exact=True)``), which keeps the spectrum's shape (and its gap, which the
    persistent power iteration needs); the others: the exact cap ``min(σᵢ, w_max)``
    (``HardCap(exact=True)``); a method that does not cap (spectral weight decay): None.
    """
    reg = registration(method)
    if not reg.caps:
        return None
    if reg.kind == "rank_one":
        return SpectralNormalize(exact=True, dtype=method.dtype)
    return HardCap(exact=True, dtype=method.dtype)


# optimizer owning a parameter's state -> {id(param): the live handle projecting it}. Weak on
# both sides: forgetting an optimizer or a handle never keeps it alive.
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _scale(matrix: Tensor, module: nn.Module | None = None) -> float:
    # s = sqrt(fan_out / fan_in) of the matrix view: the kind's RMS -> RMS scale (fx_spectral.kinds).
    return module_rms_scale(module, matrix.shape[0], matrix.shape[1])


def _distributed():
    try:
        from fx_spectral import distributed_projection
    except ImportError as e:
        raise NotImplementedError(
            "constrain: DTensor (FSDP2 / tensor-parallel) parameters need fx_spectral.distributed_projection, "
            f"which is not available in this build ({e}); constrain the unsharded model instead"
        ) from e
    return distributed_projection


_Target = Target  # the former private name (kept for existing callers)


# --------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------


class Piece(NamedTuple):
    """One matrix a target is projected as: its key (None: the whole weight) and (rows, cols)."""

    key: str | None
    shape: tuple[int, int]


def _state_keys(key: str | None) -> tuple[str, str]:
    return ("spectral_u", "spectral_v") if key is None else (f"spectral_u[{key}]", f"spectral_v[{key}]")


class VectorStore:
    """The persistent power-iteration vectors ``(u, v)`` of a handle's targets (``handle.vectors``).

    Kept in ``optimizer.state[param]["spectral_u"/"spectral_v"]`` (``["spectral_u[key]"]`` for split
    sub-views) once the optimizer has state for the param, so ``optimizer.state_dict()`` carries
    them; before that (a param the optimizer has not stepped yet) in a side dict, because
    Adam-style optimizers initialize their state only when it is empty.
    """

    def __init__(self) -> None:
        self._side: dict[tuple[int, str | None], tuple[Tensor, Tensor]] = {}

    def get(self, t: Target, key: str | None) -> tuple[Tensor, Tensor] | None:
        """The stored ``(u, v)`` of piece ``key`` of target ``t`` (float32 or float64), or None."""
        st = t.optimizer.state.get(t.param)
        ku, kv = _state_keys(key)
        if st and ku in st:
            u, v = st[ku], st[kv]
            if u.dtype not in (torch.float32, torch.float64):  # load_state_dict casts to the param dtype
                u, v = st[ku], st[kv] = u.float(), v.float()  # NB: recast in the optimizer state
            return u, v
        return self._side.get((id(t.param), key))

    def put(self, t: Target, key: str | None, u: Tensor, v: Tensor) -> None:
        """Store ``(u, v)`` for piece ``key`` of target ``t``. NB: mutates the optimizer's state."""
        st = t.optimizer.state.get(t.param)
        if st:
            ku, kv = _state_keys(key)
            st[ku], st[kv] = u, v  # NB: mutates the optimizer's state dict
            self._side.pop((id(t.param), key), None)
        else:
            self._side[(id(t.param), key)] = (u, v)


class Constraint:
    """The handle :func:`constrain` returns: ``remove()``, ``report()``, ``project()``.

    Attributes:
        method: the method config in use.
        names: the projected weights' names (``fqn`` or ``fqn[key]`` for split sub-views).
        targets: the projected parameters (:class:`Target`).
        vectors: their persistent power-iteration vectors (:class:`VectorStore`).

    Building blocks for code that projects a handle's weights itself (``fx_spectral.distributed_projection``,
    the TorchTitan checkpoint state): :attr:`targets`, :meth:`pieces` / :meth:`views` (the
    matrices a target is projected as), :attr:`vectors`, :meth:`context` (what one projection
    needs) and :meth:`cache` (per-handle scratch space).
    """

    def __init__(self, model, optimizer, method, targets, split, act_modules):
        self.model, self.optimizer, self.method = model, optimizer, method
        self._targets: list[Target] = targets
        self._split = split
        self.vectors = VectorStore()
        self._caches: dict[str, dict] = {}
        self._act: dict[str, Tensor] = {}
        self._hooks = [optimizer.register_step_post_hook(self._after_step)]
        for mod_name, mod in act_modules:
            self._hooks.append(mod.register_forward_hook(functools.partial(self._record, mod_name)))
        self.tracks_activations = bool(act_modules)
        me = weakref.ref(self)
        for t in targets:  # NB: registers this handle as the one projecting t.param (see remove())
            _ACTIVE.setdefault(t.optimizer, {})[id(t.param)] = me

    @property
    def names(self) -> list[str]:
        return [t.name(k) for t in self._targets for k in t.w_max]

    @property
    def targets(self) -> tuple[Target, ...]:
        """The projected parameters, in selection order."""
        return tuple(self._targets)

    def views(self, t: Target, tensor: Tensor) -> dict[str, Tensor] | None:
        """The sub-views of ``tensor`` (shaped like ``t.param``: the param, a meta probe, an index
        tensor) that are projected as separate matrices, by key; None when the whole weight is one
        matrix (no ``split=``, or ``split`` declines this parameter)."""
        return self._split(t.fqn, tensor) if self._split is not None else None

    def pieces(self, t: Target) -> list[Piece]:
        """The matrices target ``t`` is projected as: ``[Piece(key, (rows, cols)), ...]`` (from a
        meta probe: nothing is allocated). One ``Piece(None, ...)`` for an unsplit weight, the
        weight's matrix view with its output dim first."""
        probe = torch.empty(t.param.shape, device="meta")
        views = self.views(t, probe)
        if views is None:
            return [Piece(None, tuple(weight_matrix(probe, t.dim).shape))]
        return [Piece(k, tuple(v.reshape(-1, v.shape[-1]).shape)) for k, v in views.items()]

    def context(self, t: Target, key: str | None, scale: float) -> ProjectionContext:
        """What projecting piece ``key`` of ``t`` needs besides the matrix: its ``w_max``, the Muon
        coupling (update norm in RMS→RMS units, for the matrix's ``scale``), decoupled decay, its
        persistent vectors (read and written through :attr:`vectors`) and its seed."""
        group = t.group
        muon = is_muon_group(group)
        update = muon_update_norm(group, t.param.shape) / scale if muon else None
        return ProjectionContext(
            w_max=t.w_max[key],
            decay=decay(group),
            update_norm=update,
            get_vectors=lambda: self.vectors.get(t, key),
            put_vectors=lambda u, v: self.vectors.put(t, key, u, v),
            seed=zlib.crc32(t.name(key).encode()),
            muon=muon,
        )

    def cache(self, namespace: str) -> dict:
        """A dict owned by this handle, one per ``namespace`` (e.g. ``"distributed.layouts"``), for
        derived data that lives as long as the handle. NB: the same dict on every call."""
        return self._caches.setdefault(namespace, {})

    # The former private names (tests and older callers use them; not deprecated).
    def _get_vectors(self, t: Target, key: str | None):
        return self.vectors.get(t, key)

    def _put_vectors(self, t: Target, key: str | None, u: Tensor, v: Tensor) -> None:
        self.vectors.put(t, key, u, v)

    def _context(self, t: Target, key: str | None, matrix: Tensor, scale: float) -> ProjectionContext:
        return self.context(t, key, scale)

    # --- projection ----------------------------------------------------------------------------

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._project_all(self.method, only_stepped=True, when="after the optimizer step")

    @torch.no_grad()
    def _project_all(
        self, method: Method, only_stepped: bool, when: str = "in project()", store_vectors: bool = True
    ) -> None:
        """Project every (stepped) target, all or nothing.

        Three phases: (1) every input matrix is checked finite; (2) every new matrix is computed
        (and checked finite), with the persistent vectors held back; (3) only then are weights and
        vectors written. A failure in (1) or (2) raises :class:`ProjectionError` naming the weight,
        with every weight as it was (as the optimizer left it, after a step). Memory: phase (2)
        holds one new copy of the projected weights. DTensor weights follow the same phases in
        :func:`fx_spectral.distributed_projection.prepare_dtensors` (collectively: every rank raises the same error).
        """
        local, sharded = [], []
        for t in self._targets:
            if only_stepped and t.param.grad is None:
                continue  # the optimizer did not update it this step
            (sharded if is_dtensor(t.param) else local).append(t)
        pieces = [(t, key, matrix, write_back) for t in local for key, matrix, write_back in matrices(t, self._split)]
        for t, key, matrix, _ in pieces:
            if not bool(torch.isfinite(matrix).all()):
                raise self._failure(t.name(key), when, "it holds NaN or inf")
        writes: list[Callable[[], None]] = []
        for t, key, matrix, write_back in pieces:
            scale = _scale(matrix, t.module)
            held: list[tuple[Tensor, Tensor]] = []
            ctx = self.context(t, key, scale)
            ctx.put_vectors = lambda u, v, held=held: held.append((u, v))  # written in phase (3)
            try:
                Y = project_matrix(matrix, method, ctx, scale=scale)
            except (RuntimeError, ValueError) as e:  # e.g. torch.linalg.LinAlgError
                raise self._failure(t.name(key), when, f"{type(e).__name__}: {e}") from e
            if not bool(torch.isfinite(Y).all()):
                raise self._failure(t.name(key), when, f"{type(method).__name__} gave a non-finite result")
            writes.append(functools.partial(write_back, Y))
            if held and store_vectors:
                writes.append(functools.partial(self.vectors.put, t, key, *held[-1]))
        if sharded:
            # ---- the single DTensor dispatch point (FSDP2 / TP shards): fx_spectral.distributed_projection
            # All DTensor weights together: shared collectives, full-spectrum work spread over ranks.
            # Building blocks there (the handle's public interface): handle.pieces(target) /
            # handle.views(target, tensor) (the matrices), handle.vectors.get/put (persistent
            # vectors), handle.context(target, key, scale) (w_max, Muon coupling, vectors),
            # handle.cache(namespace); project_matrix(full_matrix, method, ctx, scale=...).
            # It validates and computes (raising self._failure(...) on every rank alike) and
            # returns its writes, so the whole step stays all or nothing.
            writes.extend(_distributed().prepare_dtensors(self, sharded, method, when=when))
        for write in writes:  # NB: phase (3): weights (in place) and persistent vectors
            write()

    def _failure(self, name: str, when: str, why: str) -> ProjectionError:
        return projection_error(name, self.method, when, why)

    def project(self, method: str | Method | None = None, **options) -> Constraint:
        """Project every selected weight now (e.g. once before training), with this handle's method
        or another one (``handle.project("pure_svd")`` puts weights inside the ball exactly).
        NB: modifies the weights in place. Returns the handle."""
        cfg = self.method if method is None and not options else method_config(method or self.method, options)
        self._project_all(cfg, only_stepped=False)
        return self

    def remove(self) -> None:
        """Stop projecting (and stop recording activations). Weights and stored vectors stay;
        the weights may be constrained again (``constrain()`` refuses a weight that a live
        handle already projects for the same optimizer)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for t in self._targets:
            active = _ACTIVE.get(t.optimizer, {})
            if active.get(id(t.param)) is not None and active[id(t.param)]() is self:
                del active[id(t.param)]

    # --- metrics -------------------------------------------------------------------------------

    def _record(self, mod_name: str, module, inputs, output) -> None:
        out = output
        while isinstance(out, (tuple, list)) and out:
            out = out[0]
        if isinstance(out, Tensor) and out.is_floating_point() and out.numel():
            m = out.detach().abs().amax().float()
            prev = self._act.get(mod_name)
            self._act[mod_name] = m if prev is None else torch.maximum(prev, m)

    @torch.no_grad()
    def report(self, *, exact: bool = True, activations: bool | None = None) -> dict[str, dict[str, float]]:
        """The paper's health metrics, keyed by name.

        For every projected weight (``fqn``, or ``fqn[key]`` for split sub-views):
        ``{"sigma": σ₁/scale (RMS→RMS), "sigma_raw": σ₁, "w_max": ..., "scale": ...}``, σ₁ from
        ``torch.linalg.matrix_norm(ord=2)`` (``exact=False``: two power iterations from the stored
        vectors, cheap; where none fit the weight, from a fresh start seeded by its name, with the
        warm-up steps first: :func:`fx_spectral.power.start_vectors`). With activation tracking
        (``constrain(..., track_activations=True)``),
        also one entry per tracked module fqn: ``{"max_activation": max |output|}``, the running
        maximum over the forwards since the previous ``report()`` (which resets it).
        """
        if activations is None:
            activations = self.tracks_activations
        if activations and not self.tracks_activations:
            raise ValueError("report(activations=True) needs constrain(..., track_activations=True)")
        out: dict[str, dict[str, float]] = {}
        for t in self._targets:
            if is_dtensor(t.param):  # collective: every rank must call report()
                out.update(_distributed().report_dtensors(self, [t], exact=exact))
                continue
            for key, matrix, _ in matrices(t, self._split):
                m = matrix.detach().to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
                if exact:
                    raw = float(torch.linalg.matrix_norm(m, ord=2))
                else:
                    # the stored vectors if they fit, else a fresh start seeded by the name (a private
                    # generator: reporting never moves the global RNG) and its warm-up: the one rule,
                    # power.start_vectors, as the sharded report (distributed_projection.report_dtensors)
                    seed = zlib.crc32(t.name(key).encode())
                    prev = self.vectors.get(t, key)
                    u, v, warm = P.start_vectors(prev, *m.shape, seed, dtype=m.dtype, device=m.device)
                    raw = float(C.power_iterate(m, P.N_REPORT + warm, u=u, v=v)[1])
                scale = _scale(m, t.module)
                out[t.name(key)] = {"sigma": raw / scale, "sigma_raw": raw, "w_max": t.w_max[key], "scale": scale}
        if activations:
            for name, value in self._act.items():
                out[name] = {"max_activation": float(value)}
            self._act.clear()
        return out

    def __repr__(self) -> str:
        return f"Constraint({self.method!r}, {len(self._targets)} weights)"


# --------------------------------------------------------------------------------------------
# constrain()
# --------------------------------------------------------------------------------------------


def constrain(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: str | Method,
    *,
    w_max: float | Mapping[str, float] = 1.0,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    split: Callable[[str, Tensor], Mapping[str, Tensor] | None] | None = None,
    track_activations: bool | str | Iterable[str] = False,
    initial_projection: bool = True,
    **options: Any,
) -> Constraint:
    r"""Project ``model``'s weights after every ``optimizer.step()`` to keep spectral norms ≤ ``w_max``.

    .. math:: W \leftarrow s\,\mathrm{project}(W/s),\qquad s=\sqrt{\mathrm{fan\_out}/\mathrm{fan\_in}}

    Registers ``optimizer.register_step_post_hook``; under no_grad, in place, each selected weight
    the optimizer updated in that step is projected in RMS→RMS units. Conv weights are matrices
    ``(out, in/groups·k…)``, ConvTranspose ``(out/groups, in·k…)`` (as :mod:`fx_spectral.nn`).

    Args:
        model: the model whose parameters ``optimizer`` updates.
        optimizer: only its parameters are touched (e.g. a torch.optim.Muon over the 2-D hidden
            weights, with AdamW for the rest).
        method: ``"spectral_normalize"``, ``"hard_cap"``, ``"soft_cap"``, ``"spectral_hammer"``,
            ``"spectral_weight_decay"``, ``"pure_svd"``, ``"orthogonalize"`` or a config object
            (:class:`SoftCap`, :class:`HardCap`, …); ``**options`` set its fields
            (``alpha``, ``wd``, ``n_iter``, ``exact``, ``sensitive_to_wmax``, ``max_update_norm``,
            ``dtype``, …).
        w_max: the cap in RMS→RMS units: a float, or a dict ``{glob pattern: float}`` matched
            against each weight's name: an exact name first, then the first matching pattern in
            dict order (put specific patterns before ``"*"``).
        include / exclude: glob patterns over parameter names as ``model.named_parameters()``
            spells them (``*`` also crosses dots). Default selection (``include=None``): the
            ``weight`` of every Linear / Conv / ConvTranspose (incl. eager spectral-normalized
            ones), except modules named ``lm_head``, ``head`` or ``output`` (and tied weights
            shared with an embedding). ``include`` replaces the default selection.
        filter_fn: ``filter_fn(module, module_fqn) -> bool`` on the module owning a weight, applied
            last (the same meaning as in :func:`~fx_spectral.nn.apply_spectral_norm`, ``transform``
            and the backend). It used to get the parameter's fqn; for one release it is asked with
            both, and where the answers differ the parameter-fqn answer is kept and a
            DeprecationWarning names the parameters (nothing changes silently).
        split: ``split(fqn, param) -> {key: view} | None``: sub-views projected separately, each as
            ``view.reshape(-1, view.shape[-1])``, named ``f"{fqn}[{key}]"`` (fused QKV).
        track_activations: record the largest ``|output|`` of blocks for :meth:`Constraint.report`:
            True (each element of every ``nn.ModuleList``, else the owners of the selected
            weights) or glob patterns over module names.
        initial_projection: project every selected weight into the ball once, now, with the
            exact :func:`initial_projection_method` (the exact cap :math:`\min(\sigma_i, w_{max})`,
            or for spectral normalize / hammer a rescale by the exact :math:`\sigma_1`; weights
            already inside are left as they are), so the cap holds from step 0 whatever the
            initialization (default True; ignored for ``spectral_weight_decay``, which has no cap). The soft cap's
            guarantee is an invariant that needs it. ``False``: the weights stay as they are
            until the first step (e.g. when resuming a run whose weights are already inside).

    Zero-size weights (e.g. ``nn.Linear(0, 5)``) are skipped: an empty matrix has no singular
    value, so there is nothing to cap (they do not appear in ``names`` or ``report()``).

    Returns:
        a :class:`Constraint` handle (``remove()``, ``report()``, ``project()``).

    Raises:
        ValueError / TypeError before anything is registered: unknown method or option,
        ``w_max <= 0``, a pattern that matches nothing, a selected weight that is not a matrix,
        a soft cap without a way to get the max update norm, nothing selected, a weight that a
        live handle already constrains for the same optimizer (``handle.remove()`` it first: two
        projections after each step would compose silently).
        :class:`ProjectionError` from the initial projection (a non-finite weight); after a
        step, from the projection (nothing is written then: all or nothing).

    Example::

        >>> muon = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
        >>> handle = fx_spectral.constrain(model, muon, "soft_cap", w_max=1.0)  # projects into the ball
        >>> ...; muon.step()             # weights are projected after every step
        >>> handle.report()["layers.0.mlp.up_proj.weight"]["sigma"]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"constrain: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"constrain: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    cfg = method_config(method, options)
    targets = select_targets(
        model,
        optimizer,
        cfg,
        w_max=w_max,
        include=include,
        exclude=exclude,
        filter_fn=filter_fn,
        split=split,
        active=_ACTIVE,
    )
    if any(is_dtensor(t.param) for t in targets):
        _distributed()  # NotImplementedError before anything is registered, if unavailable

    if not isinstance(initial_projection, bool):
        raise TypeError(f"constrain: initial_projection must be True or False, got {initial_projection!r}")
    act_modules = activation_modules(model, targets, track_activations)
    handle = Constraint(model, optimizer, cfg, targets, split, act_modules)
    first = initial_projection_method(cfg) if initial_projection else None
    if first is not None:
        try:  # NB: modifies the weights in place (all or nothing)
            # (stored vectors, e.g. loaded with the optimizer state, are left as they are)
            handle._project_all(first, only_stepped=False, when="in the initial projection", store_vectors=False)
        except BaseException:
            handle.remove()  # nothing stays registered when constrain() raises
            raise
    return handle
