"""The ``spectral`` section of a TorchTitan training config (``--spectral.*`` on the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fx_spectral.methods import METHODS, registration
from fx_spectral.projections import HARD_CAP_MODES

__all__ = ["SpectralConfig", "METHOD_NAMES"]

#: The projection methods (the names fx_spectral.constrain takes), derived from the method
#: registry (fx_spectral.methods.register): one Literal, so that tyro turns it into a choice flag.
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]  (built at import: every registered name)

#: How hard_cap computes the cap (fx_spectral.methods.HardCap's ``mode``), from the one list of modes:
#: a choice flag.
CAP_MODES: tuple[str, ...] = tuple(m for m in HARD_CAP_MODES if m is not None)
CapMode = Literal[CAP_MODES]  # type: ignore[valid-type]


@dataclass(kw_only=True, slots=True, frozen=True)
class SpectralConfig:
    r"""Spectral weight regulation after every optimizer step (:func:`fx_spectral.constrain`).

    Every cap is on the RMS→RMS operator norm :math:`\sigma_1(W)/\sqrt{fan_{out}/fan_{in}}`.
    Roles (TorchTitan Qwen3 / Llama names): ``qk`` = the Q and K blocks of the fused
    ``attention.qkv_linear.wqkv`` (or ``wq``/``wk``), ``vo`` = its V block (or ``wv``) and
    ``attention.wo``, ``mlp`` = ``feed_forward.w1/w2/w3``. A role's ``w_max_*`` of ``None`` uses
    ``w_max``. Embeddings and the output head are left alone unless ``w_max_lm_head`` is set.

    Which methods keep the promise: ``hard_cap`` with ``exact=True`` (the default) or ``cap_mode="msign"``,
    ``pure_svd`` and ``orthogonalize`` with ``exact=True`` leave every singular value ≤ the cap
    after every step, whatever the step size (to float32 rounding). ``hard_cap`` without ``exact``
    peaks at 1.0109 × the cap (its polynomial); ``spectral_normalize`` / ``spectral_hammer`` /
    ``spectral_weight_decay`` divide by a power-iteration estimate, which can under-read the true
    norm after a large step (the matrix then stays above the cap); ``soft_cap`` is a soft cap. With
    those, log the exact figure: ``--spectral.log-exact``.

    Example (command line, as tyro spells the fields; TorchTitan 0.3.0 reads no TOML)::

        --spectral.method soft_cap --spectral.w_max 1.0 --spectral.max_update_norm 0.05
        --spectral.no-enable          # off
        --spectral.log-exact          # exact sigma in the spectral/* metrics
        --spectral.cap_mode msign     # the exact hard cap from matrix products (GPUs)
    """

    enable: bool = True
    """Project weights after every optimizer step."""

    method: MethodName = "hard_cap"
    """Projection applied after every optimizer step (see fx_spectral.constrain)."""

    w_max: float = 1.0
    """Cap on every selected weight's RMS→RMS norm (unless a role overrides it)."""

    w_max_qk: float | None = None
    """Cap for the Q and K projections (None: w_max)."""

    w_max_vo: float | None = None
    """Cap for the V and output projections (None: w_max)."""

    w_max_mlp: float | None = None
    """Cap for the MLP projections w1/w2/w3 (None: w_max)."""

    w_max_lm_head: float | None = None
    """Also cap the output head at this value. With tied embeddings (Qwen3 up to 4B) the one
    shared weight is projected as the head matrix (vocab × dim), which rescales embedding rows too."""

    spectral_wd: float = 0.1
    """Strength of spectral_weight_decay: the top singular value shrinks by (1 - spectral_wd) per step."""

    alpha: float | None = None
    """Soft cap strength; None: coupled to the optimizer through max_update_norm (or Muon's lr)."""

    max_update_norm: float | None = None
    """Largest RMS→RMS norm of one optimizer update (soft cap coupling with alpha=None, non-Muon optimizers)."""

    sensitive_to_wmax: bool = True
    """Soft cap / orthogonalize act in units of w_max (the paper's 'sensitive to w_max')."""

    n_iter: int = 1
    """Power iterations per step for the rank-one methods (vectors persist between steps)."""

    exact: bool = True
    """hard_cap / orthogonalize: exact (an eigendecomposition of the smaller Gram matrix) instead of the
    polynomial iteration (``--spectral.no-exact``: matrix products only, hard cap peak 1.0109 × w_max)."""

    cap_mode: CapMode | None = None
    """hard_cap only, overrides ``exact``: ``eigh`` (exact, an eigendecomposition), ``polynomial`` (the
    paper's, peak 1.0109 × w_max) or ``msign`` (exact to float32 rounding from matrix products only,
    no eigendecomposition: the accelerator choice). None: ``eigh`` if ``exact``, else ``polynomial``."""

    split_fused_qkv: bool = True
    """Constrain the Q, K and V blocks of a fused wqkv separately (per KV group), not as one matrix."""

    include: list[str] = field(default_factory=list)
    """Glob patterns over parameter names replacing the default selection (hidden Linear weights)."""

    exclude: list[str] = field(default_factory=list)
    """Glob patterns over parameter names to leave alone."""

    log_interval: int = 1
    """Log per-layer spectral norms every this many metric-logging steps (0: never)."""

    log_exact: bool = False
    """Logged norms from an SVD (exact, slower) instead of two power iterations from the stored vectors."""

    log_per_layer: bool = True
    """Log one metric per weight (spectral/sigma/<name>); False: only max / mean / timing."""

    timing_interval: int = 10
    """Time the projection against the optimizer step every this many steps (0: never). On CUDA
    a timed step synchronizes the device three times."""

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ValueError(f"spectral.method: expected one of {list(METHOD_NAMES)}, got {self.method!r}")
        for name in ("w_max", "w_max_qk", "w_max_vo", "w_max_mlp", "w_max_lm_head"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"spectral.{name}: expected a number > 0, got {value!r}")
        if not 0.0 <= self.spectral_wd <= 1.0:
            raise ValueError(f"spectral.spectral_wd: expected a value in [0, 1], got {self.spectral_wd!r}")
        for name in ("alpha", "max_update_norm"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"spectral.{name}: expected a number >= 0 or None, got {value!r}")
        if self.cap_mode is not None:
            if self.cap_mode not in CAP_MODES:
                raise ValueError(f"spectral.cap_mode: expected eigh, polynomial or msign, got {self.cap_mode!r}")
            if self.method != "hard_cap":
                raise ValueError(f"spectral.cap_mode: only for method hard_cap, got method {self.method!r}")
        if not isinstance(self.n_iter, int) or self.n_iter < 1:
            raise ValueError(f"spectral.n_iter: expected an int >= 1, got {self.n_iter!r}")
        for name in ("log_interval", "timing_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"spectral.{name}: expected an int >= 0, got {value!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"spectral.{name}: expected a list of glob patterns, got {value!r}")

    def method_options(self) -> dict:
        """The keyword options :func:`fx_spectral.constrain` takes for ``method``: the section fields
        its registration lists (``options=`` of :func:`fx_spectral.methods.register`; e.g. the
        rank-one methods take ``n_iter`` but not ``exact``, which is for the caps). Spelt
        differently here: ``wd`` is ``spectral_wd``, hard_cap's ``mode`` is ``cap_mode`` (which then
        decides ``exact`` too)."""
        renamed = {
            "wd": self.spectral_wd,
            "mode": self.cap_mode,
            "exact": self.exact if self.cap_mode is None else self.cap_mode == "eigh",
        }
        return {o: renamed[o] if o in renamed else getattr(self, o) for o in registration(METHODS[self.method]).options}
