r"""``constrain()``: project weights after every optimizer step (Lipschitz-transformer style).

.. math::
    W \leftarrow s\cdot\mathrm{project}(W / s), \qquad s = \sqrt{\mathrm{fan\_out}/\mathrm{fan\_in}}

so every cap is on the RMS→RMS operator norm :math:`\sigma_1(W)/s` (arXiv 2507.13338). The ops live in
:mod:`fx_spectral.projections`; what one projection of one matrix does (the method configs,
:func:`~fx_spectral.methods.project_matrix`, the soft cap's coupling to torch.optim.Muon) in
:mod:`fx_spectral.methods`; this file is the machinery that selects weights, keeps persistent
power-iteration vectors, hooks the optimizer and reports.

Structure (so other pieces can hook in):

* every per-weight projection goes through :func:`fx_spectral.methods.project_matrix`; the method
  configs are re-exported here (``from fx_spectral.constrain import SoftCap`` works);
* :meth:`Constraint._project_all` holds the ONE DTensor dispatch point, which hands all sharded
  parameters together to ``fx_spectral.distributed.prepare_dtensors(handle, targets, method)``;
* a projection step is all or nothing (validate and compute everything, then write), and
  ``constrain()`` projects into the ball once at registration (``initial_projection``).
"""

from __future__ import annotations

import functools
import re
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from fx_spectral import methods as _methods
from fx_spectral import projections as C
from fx_spectral.coupling import decay, is_muon_group, muon_update_norm
from fx_spectral.errors import ProjectionError, projection_error
from fx_spectral.kinds import default_dim, default_selected, module_rms_scale, weight_matrix
from fx_spectral.methods import *  # noqa: F403  (the method configs and METHODS: re-exported, see __all__)
from fx_spectral.methods import (
    HardCap,
    Method,
    ProjectionContext,
    SoftCap,
    SpectralNormalize,
    method_config,
    project_matrix,
    registration,
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

HEAD_NAMES = frozenset({"lm_head", "head", "output"})


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


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One projected parameter of a :class:`Constraint` handle (``handle.targets``).

    ``fqn``: the parameter's name; ``module``: the module owning it; ``dim``: its output dim;
    ``w_max``: its cap per projected piece (key None: the whole weight as one matrix; a string
    key: a sub-view of a split weight); ``group``: its optimizer param group (looked up live);
    ``name(key)``: ``fqn`` or ``fqn[key]``. Read-only by convention: the handle owns it.
    """

    fqn: str
    module: nn.Module
    param: nn.Parameter
    dim: int
    optimizer: torch.optim.Optimizer  # the optimizer that owns the param's state
    group_index: int
    w_max: dict  # sub-view key (None: the whole weight) -> w_max

    @property
    def group(self) -> dict:
        # Looked up at every use: load_state_dict() replaces the param-group dicts, and
        # schedulers change their lr in place.
        return self.optimizer.param_groups[self.group_index]

    def name(self, key: str | None) -> str:
        return self.fqn if key is None else f"{self.fqn}[{key}]"


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern:
    # Only * (any run of characters, dots included) and ? are wildcards; everything else, brackets
    # too, is literal, so "layers.*.wqkv.weight[q]" names a split sub-view.
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))


def _match(name: str, pattern: str) -> bool:
    return _glob(pattern).fullmatch(name) is not None


def _owners(model: nn.Module) -> dict[int, tuple[str, list[tuple[str, nn.Module]]]]:
    # id(param) -> (fqn as named_parameters spells it, [(module fqn, module) for every owner])
    owners: dict[int, tuple[str, list]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            fqn = f"{mod_name}.{pname}" if mod_name else pname
            entry = owners.setdefault(id(p), (fqn, []))
            entry[1].append((mod_name, mod, pname))
    return owners


def _default_selected(owners_of_p: list) -> bool:
    return default_selected(owners_of_p, HEAD_NAMES)


def default_names(model: nn.Module) -> list[str]:
    """The parameter FQNs ``constrain(model, optimizer)`` selects when ``include`` is not given.

    A parameter is selected if every module holding it is of a default-selected kind
    (:mod:`fx_spectral.kinds`: Linear, Conv1-3d, ConvTranspose1-3d and their Lazy variants), holds it
    as ``weight`` and is not named like an output head (:data:`HEAD_NAMES`). In ``named_parameters`` order.

    Example::

        >>> default_names(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))
        ['0.weight', '2.weight']
    """
    owners = _owners(model)
    return [fqn for fqn, p in model.named_parameters() if _default_selected(owners[id(p)][1])]


def _patterns(value: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"constrain: {what} must be a glob pattern or a list of them, got {value!r}")
    return patterns


def _param_owner(optimizer: torch.optim.Optimizer) -> dict[int, tuple[torch.optim.Optimizer, int]]:
    # id(param) -> (optimizer owning its state, index of its param group). A container with an
    # ``optimizers`` list (TorchTitan's OptimizersContainer) keeps state in its members.
    members = getattr(optimizer, "optimizers", None)
    members = [o for o in members if isinstance(o, torch.optim.Optimizer)] if isinstance(members, (list, tuple)) else []
    out = {}
    for opt in members or [optimizer]:
        for index, group in enumerate(opt.param_groups):
            for p in group["params"]:
                out[id(p)] = (opt, index)
    return out


def _resolve_w_max(w_max, name: str, parent: str) -> float:
    if not isinstance(w_max, Mapping):
        return float(w_max)
    if name in w_max:
        return float(w_max[name])
    for pattern, value in w_max.items():
        if _match(name, pattern) or (name != parent and _match(parent, pattern)):
            return float(value)
    raise ValueError(f"constrain: no w_max pattern matches {name!r}; patterns: {list(w_max)} (add a '*' entry)")


def _check_w_max(w_max) -> None:
    values = w_max.values() if isinstance(w_max, Mapping) else [w_max]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(
                f"constrain: w_max must be > 0 (a float or a dict of glob pattern -> float), got {w_max!r}"
            )
    if isinstance(w_max, Mapping) and not all(isinstance(k, str) for k in w_max):
        raise TypeError(f"constrain: w_max dict keys must be glob patterns (str), got {list(w_max)}")


def _matrices(t: Target, split) -> Iterable[tuple[str | None, Tensor, Callable[[Tensor], None]]]:
    """(key, 2-D matrix, write-back) for each projected piece of a target's parameter."""
    p = t.param
    views = split(t.fqn, p) if split is not None else None
    if views is None:
        if t.dim == 0:
            yield None, weight_matrix(p, 0), lambda Y: p.copy_(Y.view(p.shape))  # NB: in place
        else:
            moved = p.movedim(t.dim, 0).shape
            yield None, weight_matrix(p, t.dim), lambda Y: p.copy_(Y.reshape(moved).movedim(0, t.dim))  # NB: in place
        return
    for key, view in views.items():
        yield (
            key,
            view.reshape(-1, view.shape[-1]),
            (lambda Y, view=view: view.copy_(Y.reshape(view.shape))),
        )  # NB: in place


def _scale(matrix: Tensor, module: nn.Module | None = None) -> float:
    # s = sqrt(fan_out / fan_in) of the matrix view: the kind's RMS -> RMS scale (fx_spectral.kinds).
    return module_rms_scale(module, matrix.shape[0], matrix.shape[1])


def _is_dtensor(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(p, DTensor)


def _distributed():
    try:
        from fx_spectral import distributed
    except ImportError as e:
        raise NotImplementedError(
            "constrain: DTensor (FSDP2 / tensor-parallel) parameters need fx_spectral.distributed, "
            f"which is not available in this build ({e}); constrain the unsharded model instead"
        ) from e
    return distributed


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

    Building blocks for code that projects a handle's weights itself (``fx_spectral.distributed``,
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
        :func:`fx_spectral.distributed.prepare_dtensors` (collectively: every rank raises the same error).
        """
        local, sharded = [], []
        for t in self._targets:
            if only_stepped and t.param.grad is None:
                continue  # the optimizer did not update it this step
            (sharded if _is_dtensor(t.param) else local).append(t)
        pieces = [(t, key, matrix, write_back) for t in local for key, matrix, write_back in _matrices(t, self._split)]
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
            # ---- the single DTensor dispatch point (FSDP2 / TP shards): fx_spectral.distributed ----
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
        vectors, cheap). With activation tracking (``constrain(..., track_activations=True)``),
        also one entry per tracked module fqn: ``{"max_activation": max |output|}``, the running
        maximum over the forwards since the previous ``report()`` (which resets it).
        """
        if activations is None:
            activations = self.tracks_activations
        if activations and not self.tracks_activations:
            raise ValueError("report(activations=True) needs constrain(..., track_activations=True)")
        out: dict[str, dict[str, float]] = {}
        for t in self._targets:
            if _is_dtensor(t.param):  # collective: every rank must call report()
                out.update(_distributed().report_dtensors(self, [t], exact=exact))
                continue
            for key, matrix, _ in _matrices(t, self._split):
                m = matrix.detach().to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
                if exact:
                    raw = float(torch.linalg.matrix_norm(m, ord=2))
                else:
                    prev = self.vectors.get(t, key)
                    u, v = (None, None) if prev is None else prev
                    gen = torch.Generator(device=m.device).manual_seed(zlib.crc32(t.name(key).encode()))
                    # (a private generator: reporting never moves the global RNG)
                    raw = float(C.power_iterate(m, 2 if prev is not None else None, u=u, v=v, generator=gen)[1])
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


def _filter_keeps(filter_fn: Callable, module: nn.Module, module_fqn: str, param_fqn: str, changes: list) -> bool:
    """``filter_fn``'s answer for one parameter, during the move of its second argument to the module fqn.

    The answer for the parameter fqn (the old meaning) is the one used; the module-fqn answer is
    only compared with it. Where they differ, or the module spelling raises (a filter that parses
    parameter paths), ``param_fqn`` (with both answers) is appended to ``changes`` (NB: mutated in
    place) for :func:`_warn_filter_changes`.
    """
    keep = bool(filter_fn(module, param_fqn))
    try:
        new = repr(bool(filter_fn(module, module_fqn)))
    except Exception as e:  # only the old spelling's answer counts this release
        new = f"raises {type(e).__name__}"
    if new != repr(keep):
        changes.append(f"{param_fqn!r} (with {param_fqn!r}: {keep}, with module {module_fqn!r}: {new})")
    return keep


def _warn_filter_changes(changes: list[str]) -> None:
    shown = "; ".join(changes[:5]) + (f"; … ({len(changes)} in all)" if len(changes) > 5 else "")
    warnings.warn(
        "constrain: filter_fn's second argument becomes the owning module's fqn, as in apply_spectral_norm, "
        f"transform and the backend (it was the parameter's fqn); your filter_fn answers differently for: {shown}. "
        "The parameter-fqn answer is used in this release. Make filter_fn give the same answer for both "
        "spellings (test the module path), or select parameters by name with include= / exclude=",
        DeprecationWarning,
        stacklevel=3,
    )


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
    _check_w_max(w_max)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"constrain: filter_fn must be callable(module, fqn) -> bool, got {filter_fn!r}")
    if split is not None and not callable(split):
        raise TypeError(f"constrain: split must be callable(fqn, param) -> dict | None, got {split!r}")
    includes, excludes = _patterns(include, "include"), _patterns(exclude, "exclude")

    owners = _owners(model)
    all_fqns = [fqn for fqn, _ in owners.values()]
    for what, pats in (("include", includes), ("exclude", excludes)):
        for pat in pats:
            if not any(_match(f, pat) for f in all_fqns):
                raise ValueError(f"constrain: {what} pattern {pat!r} matches no parameter of the model")
    in_optimizer = _param_owner(optimizer)

    targets: list[Target] = []
    filter_changes: list[str] = []  # parameters whose filter_fn answer depends on the fqn's spelling
    for mod_name_params in model.named_parameters():
        fqn, p = mod_name_params
        _, owner_list = owners[id(p)]
        selected = any(_match(fqn, pat) for pat in includes) if includes else _default_selected(owner_list)
        if not selected or any(_match(fqn, pat) for pat in excludes):
            continue
        module_fqn, module = owner_list[0][0], owner_list[0][1]
        if filter_fn is not None and not _filter_keeps(filter_fn, module, module_fqn, fqn, filter_changes):
            continue
        if id(p) not in in_optimizer:
            continue  # not updated by this optimizer
        if is_lazy(p):
            raise ValueError(
                f"constrain: {fqn!r} is an uninitialized (Lazy module) parameter; run one forward pass first"
            )
        if p.ndim < 2:
            raise ValueError(
                f"constrain: selected parameter {fqn!r} has shape {tuple(p.shape)}, not a matrix; "
                "select weights only (e.g. include='*.weight' or exclude='*.bias')"
            )
        if p.numel() == 0:
            continue  # an empty matrix: nothing to cap (plain torch steps it as a no-op too)
        opt, group_index = in_optimizer[id(p)]
        other = _ACTIVE.get(opt, {}).get(id(p))
        if other is not None and other() is not None:
            raise ValueError(
                f"constrain: {fqn!r} is already constrained for this optimizer ({type(opt).__name__}) by "
                f"{other()!r}; a second constrain() would project it twice after every step. Call "
                "remove() on that handle first, or select disjoint weights (include=/exclude=)"
            )
        t = Target(fqn, module, p, default_dim(module), opt, group_index, {})
        group = t.group
        # A DTensor is split as a meta tensor of its global shape (views of shards are not needed here).
        probe = torch.empty(p.shape, dtype=p.dtype, device="meta") if _is_dtensor(p) else p
        views = split(fqn, probe) if split is not None else None
        if views is not None:
            if not isinstance(views, Mapping) or not views:
                raise TypeError(
                    f"constrain: split({fqn!r}, param) must return a non-empty dict of views or None, "
                    f"got {type(views).__name__}"
                )
            for key, view in views.items():
                if not isinstance(view, Tensor) or view.ndim < 2:
                    raise ValueError(f"constrain: split({fqn!r}) view {key!r} must be a tensor with >= 2 dims")
        for key in views if views is not None else [None]:
            t.w_max[key] = _resolve_w_max(w_max, t.name(key), fqn)
        if isinstance(cfg, SoftCap) and cfg.alpha is None and cfg.max_update_norm is None and not is_muon_group(group):
            raise ValueError(
                f"constrain: soft_cap with alpha=None couples alpha to the optimizer's max update norm, known "
                f"for torch.optim.Muon only; {type(opt).__name__} updates {fqn!r}: pass max_update_norm= "
                "(RMS→RMS units) or alpha="
            )
        targets.append(t)
    if filter_changes:
        _warn_filter_changes(filter_changes)
    if not targets:
        raise ValueError(
            "constrain: no weight selected (default: Linear/Conv weights the optimizer updates, no heads; "
            "zero-size weights are skipped); check include/exclude/filter_fn and that the optimizer holds the weights"
        )
    if isinstance(w_max, Mapping):
        names = [t.name(k) for t in targets for k in t.w_max]
        for pat in w_max:
            if not any(n == pat or _match(n, pat) for n in names + [t.fqn for t in targets]):
                raise ValueError(f"constrain: w_max pattern {pat!r} matches no selected weight; selected: {names[:8]}…")
    if any(_is_dtensor(t.param) for t in targets):
        _distributed()  # NotImplementedError before anything is registered, if unavailable

    if not isinstance(initial_projection, bool):
        raise TypeError(f"constrain: initial_projection must be True or False, got {initial_projection!r}")
    act_modules = _activation_modules(model, targets, track_activations)
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


def _activation_modules(model: nn.Module, targets: list[Target], track) -> list[tuple[str, nn.Module]]:
    if track is False or track is None:
        return []
    named = list(model.named_modules())
    if track is True:
        blocks = [
            (f"{name}.{i}" if name else str(i), child)
            for name, mod in named
            if isinstance(mod, nn.ModuleList)
            for i, child in enumerate(mod)
        ]
        if blocks:
            return blocks
        seen, out = set(), []
        for t in targets:
            for mod_name, mod in named:
                if mod is t.module and id(mod) not in seen:
                    seen.add(id(mod))
                    out.append((mod_name, mod))
        return out
    patterns = _patterns(track, "track_activations")
    out = [(n, m) for n, m in named if n and any(_match(n, p) for p in patterns)]
    if not out:
        raise ValueError(f"constrain: track_activations patterns {list(patterns)} match no module")
    return out
