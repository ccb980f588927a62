r"""The coupling math in one place: how large one optimizer step can make a weight, and the soft cap it calls for.

A soft cap :math:`f(\sigma) = \sigma - 3\alpha^2\sigma^5 + 3\alpha^3\sigma^7 - \alpha^4\sigma^9` keeps a
weight in the ball :math:`\sigma_1 \le w_{max}` after every step when :math:`\alpha` is coupled to the
optimizer: a step from inside the ball gives singular values at most

.. math::
    k = w_{max}(1 - wd) + \eta

(:func:`post_step_bound`; ``wd``: the per-step decoupled decay fraction, :math:`\eta`: the update's
spectral norm), and :func:`soft_cap_coupling` returns the smallest :math:`\alpha` with
:math:`\max_{[0, k]} f = w_{max}`. For torch.optim.Muon both terms are read off the param group:
:func:`muon_update_norm` bounds :math:`\eta` (Muon's Newton–Schulz peak, its learning-rate
adjustment, a small safety factor :data:`MUON_SAFETY`) and :func:`decay` gives ``lr *
weight_decay``. Any other optimizer has no known update bound (the caller passes one) and decay 0
(the safe choice: a larger ``k`` only makes the cap stronger).

Torch only (layer 0): the method handlers (:mod:`fx_spectral.methods`) and the ``constrain()``
handle read it; :mod:`fx_spectral.projections` and :mod:`fx_spectral.methods` re-export the old names.

Example::

    >>> group = {"lr": 0.02, "weight_decay": 0.1, "ns_coefficients": (3.4445, -4.7750, 2.0315),
    ...          "ns_steps": 5, "adjust_lr_fn": None}
    >>> eta = muon_update_norm(group, torch.Size([64, 64]))     # ≈ 0.02 * 1.2024 * 1.02
    >>> alpha = soft_cap_coupling(1.0, decay(group), eta)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

__all__ = [
    "MUON_SAFETY",
    "post_step_bound",
    "soft_cap_coupling",
    "cached_soft_cap_coupling",
    "is_muon_group",
    "muon_update_norm",
    "ns_peak",
    "muon_lr_ratio",
    "decay",
]

MUON_SAFETY = 1.02  # on top of the exact Newton–Schulz peak: covers Muon's bf16 rounding (measured 1.0003)
MUON_KEYS = ("ns_coefficients", "ns_steps", "adjust_lr_fn")  # a param group with all three is torch.optim.Muon's


# --------------------------------------------------------------------------------------------
# The soft cap's strength from the step bound
# --------------------------------------------------------------------------------------------

# t = α σ²: f(σ) = σ g(t) with g(t) = 1 - 3t² + 3t³ - t⁴, strictly decreasing on t > 0 (g(1) = 0).
# f'(σ) = 1 - 15t² + 21t³ - 9t⁴ vanishes at t* = 1/3 (_t_peak): there f has its maximum σ* g(t*).


def _g(t: float) -> float:
    return 1 - 3 * t**2 + 3 * t**3 - t**4


def _bisect(fn, lo: float, hi: float) -> float:
    # fn(lo) > 0 > fn(hi); 200 halvings reach float64 resolution.
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if fn(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@functools.cache
def _t_peak() -> float:
    return _bisect(lambda t: 1 - 15 * t**2 + 21 * t**3 - 9 * t**4, 0.0, 1.0)


def post_step_bound(w_max: float, wd: float, max_update_norm: float) -> float:
    r"""The largest singular value one step can reach from inside the ball: :math:`k = w_{max}(1 - wd) + \eta`.

    Decoupled decay scales every singular value by :math:`1 - wd`, and adding an update of spectral
    norm :math:`\eta` moves each by at most :math:`\eta` (Weyl). All three in the same units.

    Example::

        >>> post_step_bound(1.0, wd=0.002, max_update_norm=0.0245)
        1.0225
    """
    return w_max * (1 - wd) + max_update_norm


def soft_cap_coupling(w_max: float, wd: float, max_update_norm: float) -> float:
    r"""The soft-cap strength that keeps every singular value at most ``w_max`` after each step.

    After one optimizer step from a weight with :math:`\sigma_1 \le w_{max}`, no singular value
    exceeds :math:`k = w_{max}(1 - wd) + \eta` (``wd``: the per-step decoupled decay fraction, e.g.
    ``lr * weight_decay``; :math:`\eta`: ``max_update_norm``, the update's spectral norm in the same
    units). Returns the smallest :math:`\alpha \ge 0` with :math:`f(k) = w_{max}`, i.e. the smallest
    non-negative real root of :math:`-k^9\alpha^4 + 3k^7\alpha^3 - 3k^5\alpha^2 + (k - w_{max}) = 0`;
    then :math:`\max_{[0,k]} f = w_{max}`. (If :math:`k > w_{max}/g(t^*) \approx 1.31\,w_{max}`,
    f would peak inside :math:`[0, k]` above ``w_max``; the α returned then puts that peak at
    exactly ``w_max``, which keeps the guarantee.) Returns 0.0 when ``k <= w_max``.

    Example::

        >>> alpha = soft_cap_coupling(1.0, wd=0.0, max_update_norm=0.02 * 1.2)
    """
    for name, value in (("w_max", w_max), ("wd", wd), ("max_update_norm", max_update_norm)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"soft_cap_coupling: {name} must be a finite float, got {value!r}")
    if w_max <= 0:
        raise ValueError(f"soft_cap_coupling: w_max must be > 0, got {w_max}")
    if not 0 <= wd < 1:
        raise ValueError(f"soft_cap_coupling: wd (decay fraction per step) must be in [0, 1), got {wd}")
    if max_update_norm < 0:
        raise ValueError(f"soft_cap_coupling: max_update_norm must be >= 0, got {max_update_norm}")
    k = post_step_bound(w_max, wd, max_update_norm)
    if k <= w_max:
        return 0.0
    r = w_max / k
    t_star = _t_peak()
    g_star = _g(t_star)
    if r >= g_star:  # the root lies before the peak: f increasing on [0, k], f(k) = w_max
        t = _bisect(lambda s: _g(s) - r, 0.0, t_star)
        return t / (k * k)
    # Peak inside [0, k]: put the peak value sigma* g(t*) at w_max (sigma* = sqrt(t*/alpha)).
    return t_star * g_star**2 / (w_max * w_max)


@functools.lru_cache(maxsize=4096)
def cached_soft_cap_coupling(w_max: float, wd: float, max_update_norm: float) -> float:
    """:func:`soft_cap_coupling`, memoized: the soft-cap handler asks it once per weight and step
    (200 bisection halvings each), mostly with the same few arguments."""
    return soft_cap_coupling(w_max, wd, max_update_norm)


# --------------------------------------------------------------------------------------------
# torch.optim.Muon: the update bound and the decay, read off a param group
# --------------------------------------------------------------------------------------------


def is_muon_group(group: Mapping) -> bool:
    """Whether an optimizer param group is torch.optim.Muon's (it has Muon's Newton–Schulz keys)."""
    return all(k in group for k in MUON_KEYS)


@functools.cache
def ns_peak(coefficients: tuple[float, float, float], steps: int) -> float:
    """The largest value of Muon's quintic ``x ↦ x(a + b x² + c x⁴)``, iterated ``steps`` times, on [0, 1].

    Muon divides by the Frobenius norm first, so every singular value starts in [0, 1]: the
    update's largest singular value is this peak (1.2024 for the default coefficients). Evaluated on
    a grid of 400 001 points in float64.
    """
    a, b, c = coefficients
    x = torch.linspace(0.0, 1.0, 400_001, dtype=torch.float64)
    for _ in range(steps):
        x2 = x * x
        x = x * (a + b * x2 + c * x2 * x2)
    return float(x.abs().max())


def muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's learning-rate adjustment for a parameter of ``shape``: ``adjusted_lr / lr``."""
    try:
        from torch.optim._muon import _adjust_lr

        return float(_adjust_lr(1.0, adjust_lr_fn, shape))
    except ImportError:  # pragma: no cover - same rule, in case torch moves the helper
        A, B = shape[:2]
        if adjust_lr_fn in (None, "original"):
            return max(1.0, A / B) ** 0.5
        return 0.2 * max(A, B) ** 0.5 if adjust_lr_fn == "match_rms_adamw" else 1.0


def muon_update_norm(group: Mapping, param_shape: torch.Size) -> float:
    """Upper bound on the spectral norm (raw units) of one torch.optim.Muon update of a parameter.

    Muon adds ``-adjusted_lr * NS(G)``, where ``adjusted_lr = lr * ratio(shape)`` (its
    ``adjust_lr_fn``) and ``NS`` maps each singular value of ``G/‖G‖_F`` through its quintic
    ``ns_steps`` times (peak 1.2024 for the default coefficients). Divide by the matrix's scale
    ``sqrt(fan_out/fan_in)`` for RMS→RMS units.
    """
    lr = float(group["lr"])
    peak = ns_peak(tuple(float(c) for c in group["ns_coefficients"]), int(group["ns_steps"]))
    return lr * muon_lr_ratio(group["adjust_lr_fn"], param_shape) * peak * MUON_SAFETY


def decay(group: Mapping) -> float:
    """The per-step decoupled weight-decay fraction of a param group: ``lr * weight_decay`` for Muon, else 0.

    Muon decays decoupled (``param.mul_(1 - lr * wd)``); for any other optimizer 0 is the safe
    choice (a larger ``k`` in :func:`post_step_bound` only makes the cap stronger).
    """
    return float(group["lr"]) * float(group.get("weight_decay", 0.0)) if is_muon_group(group) else 0.0
