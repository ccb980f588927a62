r"""The configurations of the graph side: :class:`TransformConfig` (the FX pass) and :class:`BackendConfig`
(the ``"spectral"`` torch.compile backend, registered under :data:`BACKEND_NAME`).

Plain frozen dataclasses validated at creation, with no dependency on dynamo: the compiled-graph
machinery (:mod:`fx_spectral.graph.compiled`) reads a :class:`BackendConfig` without importing the
backend module that registers the backend. Both are re-exported where they were first defined
(``fx_spectral.graph.tracing``, ``fx_spectral.graph.backend``).

Example::

    >>> BackendConfig(inner="aot_eager", n_power_iterations=2).n_power_iterations
    2
    >>> TransformConfig(mode="operator").mode
    'operator'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fx_spectral import nn as sn

__all__ = ["BACKEND_NAME", "BackendConfig", "TransformConfig"]

BACKEND_NAME = "spectral"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackendConfig:
    """Configuration of the ``"spectral"`` backend (frozen; validated at creation).

    Args:
        inner: the backend compiling the rewritten graph: ``"inductor"`` (default), any registered
            name (``"aot_eager"``, ``"eager"``...) or a backend callable ``(gm, example_inputs) -> fn``.
        n_power_iterations: power-iteration steps per training call. Default 1.
        eps: guard for the vector norms and for sigma. Default 1e-12.
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks which owning modules are normalized
            (``fqn`` relative to the root module of the compiled frame). Default: all.
        name: the parameter name(s) to normalize. Default ``"weight"``.
        mode: ``"matrix"`` / ``"operator"``: the normalization (default matrix: sigma of the reshaped
            weight, torch's; operator: Conv / ConvTranspose weights divided by the norm of the
            convolution operator for the input shape the graph sees, Linear as matrix). Any other
            string is the torch.compile ``mode`` for the inductor inner backend (e.g.
            ``"max-autotune"``; with operator mode, pass inductor settings as ``inner_options``).
        inner_options: inductor config options (``torch.compile(options=...)`` style) for the inner
            backend; only honoured with ``inner="inductor"``.
    """

    inner: str | Callable = "inductor"
    n_power_iterations: int = 1
    eps: float = 1e-12
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    name: str | tuple[str, ...] = "weight"
    mode: str | None = None
    inner_options: Mapping[str, Any] | None = None

    def __post_init__(self):
        from fx_spectral.nn import validate_names, validate_options

        validate_options(self.n_power_iterations, self.eps, "spectral backend")
        object.__setattr__(self, "name", validate_names(self.name, "spectral backend"))
        if not (isinstance(self.inner, str) or callable(self.inner)):
            raise TypeError(f"spectral backend: expected `inner` to be a backend name or callable, got {self.inner!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"spectral backend: expected `filter_fn(module, fqn) -> bool`, got {self.filter_fn!r}")
        if self.mode is not None and not isinstance(self.mode, str):
            raise TypeError(f"spectral backend: expected `mode` to be a str, got {self.mode!r}")
        if self.inner_options is not None and not isinstance(self.inner_options, Mapping):
            raise TypeError(f"spectral backend: expected `inner_options` to be a dict, got {self.inner_options!r}")
        if self.inner == BACKEND_NAME:
            raise ValueError("spectral backend: `inner` cannot be 'spectral' itself; use 'inductor' or 'aot_eager'")
        if not self._inductor and (self._inductor_mode is not None or self.inner_options):
            raise ValueError(
                f"spectral backend: `mode` and `inner_options` are inductor settings, but inner={self.inner!r}; "
                "drop them or use inner='inductor'"
            )
        object.__setattr__(self, "inner_options", dict(self.inner_options or {}))

    @property
    def _inductor(self) -> bool:
        return self.inner == "inductor"

    @property
    def _operator(self) -> bool:
        """Operator mode (``mode="operator"``)."""
        return self.mode == "operator"

    @property
    def _inductor_mode(self) -> str | None:
        """The torch.compile mode for inductor (``mode`` unless it names the normalization)."""
        return None if self.mode in _NORM_MODES else self.mode


_NORM_MODES = ("matrix", "operator")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformConfig:
    """What the pass normalizes and how.

    Args:
        filter_fn: ``filter_fn(module, fqn) -> bool`` on the module owning a weight; False skips it.
        name: the attribute name(s) of the weights to normalize (the last component of a
            ``get_attr`` target, ``"weight"`` for the module leaves); None normalizes every weight
            feeding a linear / conv / conv_transpose op. Default ``"weight"``.
        n_power_iterations: power-iteration steps per training call. Default 1.
        eps: guard for the vector norms and for sigma. Default 1e-12.
        mode: ``"matrix"`` (default: sigma of the reshaped weight, torch's) or ``"operator"`` (Conv /
            ConvTranspose weights divided by the norm of the convolution operator; Linear as matrix).
    """

    filter_fn: Callable[[nn.Module, str], bool] | None = None
    name: str | tuple[str, ...] | None = "weight"
    n_power_iterations: int = 1
    eps: float = 1e-12
    mode: str = "matrix"

    def __post_init__(self):
        if self.name is not None:
            object.__setattr__(self, "name", sn.validate_names(self.name, "transform"))
        sn.validate_options(self.n_power_iterations, self.eps, "transform")
        sn.validate_mode(self.mode, "transform")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(
                f"transform: expected filter_fn to be callable(module, fqn) -> bool, got {self.filter_fn!r}"
            )


# Old names (one release): they warn and give the same class.
from fx_spectral.deprecation import renamed  # noqa: E402

__getattr__ = renamed(
    __name__, {"SpectralConfig": "TransformConfig", "SpectralBackendConfig": "BackendConfig"}, globals()
)
