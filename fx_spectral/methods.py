r"""What one projection of one matrix does: the method configs and :func:`project_matrix`.

* method configs: frozen keyword-only dataclasses (:class:`SoftCap`, :class:`HardCap`, …), each
  registered once with :func:`register` (its name, its kind — ``"rank_one"`` or
  ``"full_spectrum"`` —, its rank-one op, its TorchTitan options) and given one handler with
  :func:`handles`. ``METHODS`` (name -> config), ``_HANDLERS`` (config -> handler), this module's
  ``__all__``, :mod:`fx_spectral.constraint`'s re-exports, :mod:`fx_spectral.distributed_projection`'s rank-one
  path and the TorchTitan method names and options are all derived from the registry;
* :func:`project_matrix` is the ONE function every per-weight projection goes through:
  ``scale * project(matrix / scale)`` in RMS→RMS units, a pure function on one 2-D matrix (so a
  distributed implementation can call it on a gathered matrix and scatter the result);
* the soft cap's coupling to the optimizer is read from :mod:`fx_spectral.coupling` (the bound
  on one torch.optim.Muon update, :func:`~fx_spectral.coupling.soft_cap_coupling`); its names
  ``muon_update_norm`` and ``MUON_SAFETY`` stay importable from here.

The ops themselves live in :mod:`fx_spectral.projections`; selecting the weights, keeping the
persistent vectors and hooking the optimizer is :mod:`fx_spectral.constraint`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fx_spectral import coupling
from fx_spectral import power as P
from fx_spectral import projections as C
from fx_spectral.coupling import MUON_SAFETY, muon_update_norm  # noqa: F401  (re-exported: the old home)

N_WARMUP_ITERATIONS = P.N_WARMUP  # a fresh u/v gets these before the per-step iterations (as spectral_norm)


# --------------------------------------------------------------------------------------------
# The registry: every method is registered here once, and everything that lists methods reads it
# --------------------------------------------------------------------------------------------

MethodKind = Literal["rank_one", "full_spectrum"]
#: ``rank_one_op(X, cfg, w_max, estimate) -> Tensor``: a rank-one update of ``X`` from the top
#: singular triple ``estimate = (u, sigma, v)`` (in the units of ``X``).
RankOneOp = Callable[[Tensor, Any, float, tuple[Tensor, Tensor, Tensor]], Tensor]
Handler = Callable[[Tensor, Any, "ProjectionContext"], Tensor]


@dataclass(frozen=True)
class Registration:
    """What the library knows about one method (built by :func:`register`).

    Attributes:
        name: the string name ``constrain()`` and ``--spectral.method`` take.
        config: the config class.
        kind: ``"rank_one"`` (a rank-one update from the top singular triple; a sharded weight
            is updated in place from a distributed power iteration) or ``"full_spectrum"`` (the
            whole spectrum changes; a sharded weight is gathered on one rank and projected there).
        rank_one_op: for ``"rank_one"``, the update ``(X, cfg, w_max, (u, sigma, v)) -> X'``.
        caps: whether the method caps at ``w_max`` (spectral weight decay does not: ``constrain``'s
            initial projection is then skipped).
        options: the config fields the TorchTitan ``spectral`` section sets for this method.
    """

    name: str
    config: type
    kind: MethodKind
    rank_one_op: RankOneOp | None
    caps: bool
    options: tuple[str, ...]


_REGISTRY: dict[type, Registration] = {}  # config class -> registration, in registration order
METHODS: dict[str, type] = {}  # name -> config class (derived)
_HANDLERS: dict[type, Handler] = {}  # config class -> handler (derived; the dict project_matrix reads)


def register(
    name: str,
    *,
    kind: MethodKind,
    rank_one_op: RankOneOp | None = None,
    caps: bool = True,
    options: tuple[str, ...] = (),
) -> Callable[[type], type]:
    """Class decorator: register a method config under ``name`` (sets ``cls.name``).

    A ``"rank_one"`` method must give its ``rank_one_op`` (its handler is then derived: the
    persistent power iteration's estimate, or the exact triple with ``exact=True``, fed to the op)
    and have an ``n_iter`` field; a ``"full_spectrum"`` method gets its handler from
    :func:`handles`. ``options`` must be fields of the config. Example::

        @register("spectral_normalize", kind="rank_one", options=("n_iter",),
                  rank_one_op=lambda X, cfg, w_max, est: C.spectral_normalize(X, w_max, estimate=est))
        @dataclass(frozen=True, kw_only=True)
        class SpectralNormalize(Method): ...
    """

    def decorate(cls: type) -> type:
        where = f"register({name!r})"
        if not (isinstance(cls, type) and issubclass(cls, Method) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"{where}: expected a dataclass subclass of the method base, got {cls!r}")
        if name in METHODS or cls in _REGISTRY:
            raise ValueError(f"{where}: {name!r} / {cls.__name__} is already registered")
        if kind not in ("rank_one", "full_spectrum"):
            raise ValueError(f"{where}: kind must be 'rank_one' or 'full_spectrum', got {kind!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        if kind == "rank_one":
            if not callable(rank_one_op):
                raise TypeError(f"{where}: a rank_one method must give rank_one_op(X, cfg, w_max, estimate)")
            if "n_iter" not in fields:
                raise TypeError(f"{where}: a rank_one method needs an n_iter field (its power iterations per step)")
        elif rank_one_op is not None:
            raise TypeError(f"{where}: rank_one_op is only for kind='rank_one'")
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"{where}: options {unknown} are not fields of {cls.__name__}")
        cls.name = name
        _REGISTRY[cls] = Registration(name, cls, kind, rank_one_op, caps, tuple(options))
        METHODS[name] = cls
        if kind == "rank_one":
            _HANDLERS[cls] = functools.partial(_rank_one_handler, rank_one_op)
        return cls

    return decorate


def handles(cls: type) -> Callable[[Handler], Handler]:
    """Function decorator: the handler ``(X, cfg, ctx) -> Tensor`` of a registered full-spectrum method.

    ``X`` is a fresh 2-D tensor in the compute dtype and RMS→RMS units (the handler may reuse it);
    ``ctx`` a :class:`ProjectionContext`.
    """

    def decorate(fn: Handler) -> Handler:
        reg = _REGISTRY.get(cls)
        if reg is None:
            raise ValueError(f"handles({cls!r}): register the config first")
        if reg.kind == "rank_one" or cls in _HANDLERS:
            raise ValueError(f"handles({cls.__name__}): it already has a handler")
        _HANDLERS[cls] = fn
        return fn

    return decorate


def registration(method: Any) -> Registration:
    """The registration of a config (instance or class), found along its MRO (a subclass without
    its own registration is its parent's method)."""
    cls = method if isinstance(method, type) else type(method)
    for klass in cls.__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    raise TypeError(f"{cls.__name__} is not a registered method (see fx_spectral.methods.register)")


def _handler(cls: type) -> Handler:
    for klass in cls.__mro__:  # _HANDLERS is read at every call (tests patch it)
        if klass in _HANDLERS:
            return _HANDLERS[klass]
    raise TypeError(f"{cls.__name__} has no projection handler (see fx_spectral.methods.handles)")


def _rank_one_handler(op: RankOneOp, X: Tensor, cfg: Any, ctx: ProjectionContext) -> Tensor:
    return op(X, cfg, ctx.w_max, _estimate(X, cfg.n_iter, ctx, getattr(cfg, "exact", False)))


# --------------------------------------------------------------------------------------------
# Method configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Method:
    """The base of every method config: the fields every method has.

    ``dtype``: compute dtype (None: float32, float64 for float64 weights). Subclass it (a frozen,
    keyword-only dataclass) and :func:`register` the subclass to add a method.
    """

    name: ClassVar[str] = ""
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and (not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point):
            raise TypeError(f"{type(self).__name__}: dtype must be a floating torch.dtype or None, got {self.dtype!r}")

    @staticmethod
    def _check_int(owner: str, field: str, value: Any, low: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{owner}: {field} must be an int >= {low}, got {value!r}")


@register(
    "spectral_normalize",
    kind="rank_one",
    rank_one_op=lambda X, cfg, w_max, est: C.spectral_normalize(X, w_max, estimate=est),
    options=("n_iter",),  # not the section's exact: that one is for the caps
)
@dataclass(frozen=True, kw_only=True)
class SpectralNormalize(Method):
    r""":math:`W \leftarrow W/\max(1, \hat\sigma/w_{max})` with ``n_iter`` persistent power iterations per step.

    The estimate :math:`\hat\sigma \le \sigma_1` can under-read (then the result exceeds w_max
    by :math:`\sigma_1/\hat\sigma`). ``exact=True``: the top singular triple from an
    eigendecomposition of the smaller Gram matrix instead (the cap holds exactly, float32
    rounding aside; costs one ``eigh`` per weight and step).
    """

    n_iter: int = 1
    exact: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_int(type(self).__name__, "n_iter", self.n_iter, 1)


@register(
    "spectral_hammer",
    kind="rank_one",
    rank_one_op=lambda X, cfg, w_max, est: C.spectral_hammer(X, w_max, estimate=est),
    options=("n_iter",),
)
@dataclass(frozen=True, kw_only=True)
class SpectralHammer(SpectralNormalize):
    r""":math:`W \leftarrow W + (w_{max} - \hat\sigma) u v^\top` (top singular value set to w_max)."""



@register(
    "spectral_weight_decay",
    kind="rank_one",
    rank_one_op=lambda X, cfg, w_max, est: C.spectral_weight_decay(X, cfg.wd, estimate=est),
    caps=False,
    options=("n_iter", "wd"),
)
@dataclass(frozen=True, kw_only=True)
class SpectralWeightDecay(SpectralNormalize):
    r""":math:`W \leftarrow W - wd\,\hat\sigma u v^\top` every step (w_max is not used; reports only)."""

    wd: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.wd, (int, float)) or not 0.0 <= self.wd <= 1.0:
            raise ValueError(f"SpectralWeightDecay: wd must be a float in [0, 1], got {self.wd!r}")


@dataclass(frozen=True, kw_only=True)
class _Polynomial(Method):
    """Methods made of matrix products (hard cap, soft cap, orthogonalize).

    ``matmul_dtype``: dtype of the products. ``"auto"`` (default): bf16 for weights that
    torch.optim.Muon updates (Muon computes its own update in bf16), else the compute dtype;
    ``None``: the compute dtype. With bf16 products only the polynomial's correction term is
    rounded; the weight keeps its precision.
    """

    matmul_dtype: torch.dtype | str | None = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.matmul_dtype
        if not (m is None or m == "auto" or (isinstance(m, torch.dtype) and m.is_floating_point)):
            raise TypeError(
                f"{type(self).__name__}: matmul_dtype must be 'auto', None or a floating torch.dtype, got {m!r}"
            )

    def products_dtype(self, ctx: ProjectionContext) -> torch.dtype | None:
        if self.matmul_dtype == "auto":
            return torch.bfloat16 if ctx.muon else None
        return self.matmul_dtype


@register("hard_cap", kind="full_spectrum", options=("exact", "mode"))
@dataclass(frozen=True, kw_only=True)
class HardCap(_Polynomial):
    """Every singular value capped at w_max: the paper's polynomial (peak 1.0109·w_max) or exact.

    ``exact=True`` or ``mode="eigh"``: exact, by an eigendecomposition (the CPU choice);
    ``mode="msign"``: exact to float rounding by float32 matrix products only
    (:func:`fx_spectral.msign.msign_clip`, the accelerator choice; ``matmul_dtype="auto"`` means
    float32 there, a 16-bit ``matmul_dtype`` is refused).
    """

    exact: bool = False
    mode: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in C.HARD_CAP_MODES:
            raise ValueError(f"HardCap: mode must be one of {C.HARD_CAP_MODES}, got {self.mode!r}")
        if self.exact and self.mode not in (None, "eigh"):
            raise ValueError(f"HardCap: exact=True means mode='eigh'; it conflicts with mode={self.mode!r}")
        m = self.matmul_dtype
        if self.mode == "msign" and isinstance(m, torch.dtype) and m.itemsize < 4:
            raise ValueError(f"HardCap: mode='msign' runs its products in float32 at least, got matmul_dtype={m}")


@register("soft_cap", kind="full_spectrum", options=("alpha", "max_update_norm", "sensitive_to_wmax"))
@dataclass(frozen=True, kw_only=True)
class SoftCap(_Polynomial):
    r"""Soft cap :math:`f(\sigma)=\sigma-3\alpha^2\sigma^5+3\alpha^3\sigma^7-\alpha^4\sigma^9`.

    ``alpha=None``: coupled to the optimizer (:func:`fx_spectral.coupling.soft_cap_coupling`)
    with the maximum update norm from torch.optim.Muon's param group, or ``max_update_norm`` (in
    RMS→RMS units) for any other optimizer. ``sensitive_to_wmax=True``: the soft cap runs on
    ``W/(s·w_max)`` and the result is multiplied by ``s·w_max`` (an explicit ``alpha`` is then in
    units of w_max); ``False``: on ``W/s``. With the coupling both give the same result.
    With the coupling, a spectrum beyond the coupling's ``k`` (a start outside the ball, an update
    larger than its bound) is scaled to ``k`` first, where ``f(k) = w_max``; with an explicit
    ``alpha`` the polynomial's own range guard applies (:func:`fx_spectral.projections.soft_cap`).
    """

    alpha: float | None = None
    max_update_norm: float | None = None
    sensitive_to_wmax: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("alpha", "max_update_norm"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
                raise ValueError(f"SoftCap: {field} must be a float >= 0 or None, got {value!r}")


@register("pure_svd", kind="full_spectrum")
@dataclass(frozen=True, kw_only=True)
class PureSVD(Method):
    """Exact cap by SVD: U min(S, w_max) Vᵀ (slow; a reference)."""



@register("orthogonalize", kind="full_spectrum", options=("exact", "sensitive_to_wmax"))
@dataclass(frozen=True, kw_only=True)
class Orthogonalize(_Polynomial):
    """Every singular value → w_max (``sensitive_to_wmax``) or 1: Newton–Schulz (``steps``) or ``exact`` SVD."""

    steps: int = C.DEFAULT_NS_STEPS
    exact: bool = False
    sensitive_to_wmax: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_int("Orthogonalize", "steps", self.steps, 1)


def method_config(method: str | Method, options: Mapping[str, Any]) -> Method:
    """The config a method name or config plus keyword options give (``constrain(model, "soft_cap", alpha=0.1)``).

    A name builds its registered config from ``options``; a config object is copied with
    ``options`` replaced. Unknown names raise ValueError, options the config lacks TypeError.

    Example::

        >>> method_config("hard_cap", {"exact": True}).exact
        True
    """
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(
                f"constrain: unknown method {method!r}; expected one of {sorted(METHODS)} or a config object"
            )
        cls, base = METHODS[method], None
    elif isinstance(method, Method):
        cls, base = type(method), method
    else:
        raise TypeError(
            f"constrain: method must be a name {sorted(METHODS)} or a config such as SoftCap(), got {method!r}"
        )
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(
            f"constrain: option(s) {unknown} not valid for method {cls.name!r}; valid options: {sorted(valid)}"
        )
    return dataclasses.replace(base, **options) if base is not None else cls(**options)


# --------------------------------------------------------------------------------------------
# Per-matrix projection: the one function every weight goes through
# --------------------------------------------------------------------------------------------


_Method = Method  # the old private names (tests subclass _Method)
_method_config = method_config


@dataclass
class ProjectionContext:
    """What a handler needs besides the matrix: the cap, coupling terms, persistent vectors.

    ``update_norm``: the optimizer's max update norm in this matrix's RMS→RMS units (None if
    unknown); ``decay``: the per-step decoupled weight-decay fraction; ``vectors``: a
    ``get() -> (u, v) | None`` / ``put(u, v)`` pair for the persistent power-iteration state;
    ``seed``: seeds the random start of fresh vectors (never touches the global RNG).
    """

    w_max: float
    decay: float = 0.0
    update_norm: float | None = None
    get_vectors: Callable[[], tuple[Tensor, Tensor] | None] = lambda: None
    put_vectors: Callable[[Tensor, Tensor], None] = lambda u, v: None
    seed: int = 0
    muon: bool = False


def _compute_dtype(cfg: Method, dtype: torch.dtype) -> torch.dtype:
    return P.compute_dtype(dtype, cfg.dtype)


def project_matrix(matrix: Tensor, cfg: Method, ctx: ProjectionContext, *, scale: float) -> Tensor:
    """Project one 2-D weight matrix in RMS→RMS units: ``scale * project(matrix / scale)``.

    Pure (returns a new tensor in ``matrix.dtype``) except for ``ctx.put_vectors``. This is the
    single seam every per-weight projection goes through (sub-views of a fused weight, shards
    gathered by a distributed implementation).
    """
    X = matrix.to(_compute_dtype(cfg, matrix.dtype)) / scale  # a fresh tensor: handlers may reuse it
    Y = _handler(type(cfg))(X, cfg, ctx)  # along the MRO: a subclass gets its parent's handler
    return Y.mul_(scale).to(matrix.dtype)  # NB: in place on the handler's fresh result


def _top_triple(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # The exact top singular triple (u, sigma, v) of one matrix, from eigh of the smaller Gram
    # matrix of X / max|X| (no overflow), in float32 at least.
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    Xe = X.to(dtype)
    peak = Xe.abs().amax().clamp_min(torch.finfo(dtype).tiny)
    Z = Xe / peak
    wide = Z.shape[0] <= Z.shape[1]
    lam, Q = torch.linalg.eigh(Z @ Z.mT if wide else Z.mT @ Z)
    top = Q[:, -1]
    s = lam[-1].clamp_min(0).sqrt()
    other = (Z.mT @ top if wide else Z @ top) / s.clamp_min(1e-30)
    if not bool(s > 0):  # a zero matrix: any unit vectors, sigma 0
        other = torch.zeros_like(other)
        other[0] = 1.0
    u, v = (top, other) if wide else (other, top)
    return u.to(X.dtype), (s * peak).to(X.dtype), v.to(X.dtype)


def _estimate(X: Tensor, n_iter: int, ctx: ProjectionContext, exact: bool = False):
    if exact:
        u, sigma, v = _top_triple(X)
        ctx.put_vectors(u, v)
        return u, sigma, v
    # The stored vectors if they fit, else a fresh start seeded by the weight's name (+ N_WARMUP steps).
    m, n = X.shape
    u0, v0, extra = P.start_vectors(ctx.get_vectors(), m, n, ctx.seed, dtype=P.compute_dtype(X.dtype), device=X.device)
    u, sigma, v = C.power_iterate(X, extra + n_iter, u=u0, v=v0)
    ctx.put_vectors(u, v)
    return u, sigma, v


@handles(SoftCap)
def _soft_cap(X: Tensor, cfg: SoftCap, ctx: ProjectionContext) -> Tensor:
    unit = ctx.w_max if cfg.sensitive_to_wmax else 1.0
    cap = ctx.w_max / unit
    alpha, limit = cfg.alpha, None
    if alpha is None:
        eta = cfg.max_update_norm if cfg.max_update_norm is not None else ctx.update_norm
        if eta is None:
            raise RuntimeError("soft cap coupling needs the max update norm (pass max_update_norm=)")
        alpha = coupling.cached_soft_cap_coupling(cap, ctx.decay, eta / unit)
        # k: no singular value exceeds it after a step from inside the ball, and f(k) <= cap; a
        # spectrum beyond k (a start outside the ball, an update larger than promised) is scaled
        # to k first, so the result stays under the cap (up to the power estimate's accuracy).
        limit = coupling.post_step_bound(cap, ctx.decay, eta / unit)
    if unit == 1.0:
        return C.soft_cap(X, alpha, limit=limit, matmul_dtype=cfg.products_dtype(ctx))
    return C.soft_cap(X / unit, alpha, limit=limit, matmul_dtype=cfg.products_dtype(ctx)).mul_(unit)


_coupling = coupling.cached_soft_cap_coupling  # the old private name


@handles(Orthogonalize)
def _orthogonalize(X: Tensor, cfg: Orthogonalize, ctx: ProjectionContext) -> Tensor:
    Y = C.orthogonalize(X, steps=cfg.steps, exact=cfg.exact, matmul_dtype=cfg.products_dtype(ctx))
    return Y * ctx.w_max if cfg.sensitive_to_wmax else Y


@handles(HardCap)
def _hard_cap(X: Tensor, cfg: HardCap, ctx: ProjectionContext) -> Tensor:
    matmul_dtype = None if cfg.mode == "msign" else cfg.products_dtype(ctx)  # msign: float32 products
    return C.hard_cap(X, ctx.w_max, exact=cfg.exact, mode=cfg.mode, matmul_dtype=matmul_dtype)


@handles(PureSVD)
def _pure_svd(X: Tensor, cfg: PureSVD, ctx: ProjectionContext) -> Tensor:
    return C.pure_svd(X, ctx.w_max)


_missing = [r.name for cls, r in _REGISTRY.items() if cls not in _HANDLERS]
if _missing:  # pragma: no cover - a method registered here without a handler is a bug in this file
    raise RuntimeError(f"fx_spectral.methods: no handler for {_missing}")

__all__ = [  # derived: every registered config, then the rest of the public surface
    *(r.config.__name__ for r in _REGISTRY.values()),
    "METHODS",
    "Method",
    "method_config",
    "Registration",
    "register",
    "handles",
    "registration",
    "ProjectionContext",
    "project_matrix",
    "muon_update_norm",
]


# --------------------------------------------------------------------------------------------
# Coupling with torch.optim.Muon: the math lives in fx_spectral.coupling (the old names stay here)
# --------------------------------------------------------------------------------------------

_decay = coupling.decay
_is_muon_group = coupling.is_muon_group
_ns_peak = coupling.ns_peak
_muon_lr_ratio = coupling.muon_lr_ratio
_MUON_KEYS = coupling.MUON_KEYS
