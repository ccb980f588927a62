"""The graph side of fx_spectral: the FX pass, :func:`transform`, :func:`bake` and the rewrite primitive.

- :mod:`fx_spectral.graph.ops`: op tables (which ops take a weight, at which argument, its ``dim``),
  re-exported from :mod:`fx_spectral.kinds`.
- :mod:`fx_spectral.graph.rewrite`: :func:`find_weight_uses` / :func:`rewrite_weight`, the
  primitive shared by the transform and the torch.compile backend.
- :mod:`fx_spectral.graph.emit`: :func:`insert_normalization` and the other nodes it emits
  (re-exported by :mod:`fx_spectral.graph.rewrite`).
- :mod:`fx_spectral.graph.tracing`: :func:`transform` (symbolic_trace + pass, train/eval graphs),
  its :class:`TransformConfig`, and :func:`spectral_pass` (the in-place, one-graph pass for
  exported graphs).
- :mod:`fx_spectral.graph.baking`: :func:`bake` (fold 1/sigma into the weights for deployment).
- :mod:`fx_spectral.graph.backend`: the torch.compile backend ``"spectral"`` and its
  :class:`BackendConfig` (``fx_spectral.graph.BackendConfig`` loads the backend module on first use).

``SpectralConfig`` and ``SpectralBackendConfig`` are the old names of :class:`TransformConfig` and
:class:`BackendConfig`: they still work for one release and warn (DeprecationWarning). The
TorchTitan integration's ``SpectralConfig`` (its ``--spectral.*`` section) is another class and
keeps its name.
"""

import importlib as _importlib
import sys as _sys
import types as _types

from fx_spectral.deprecation import renamed
from fx_spectral.graph.baking import bake
from fx_spectral.graph.rewrite import find_weight_uses, insert_normalization, lower_module_call, rewrite_weight
from fx_spectral.graph.tracing import SpectralGraphModule, TransformConfig, spectral_pass, transform

__all__ = [
    "BackendConfig",
    "SpectralGraphModule",
    "TransformConfig",
    "bake",
    "find_weight_uses",
    "insert_normalization",
    "lower_module_call",
    "rewrite_weight",
    "spectral_pass",
    "transform",
]


def _resolve(name: str):
    if name == "BackendConfig":  # lazily: the backend module imports dynamo's machinery
        return _importlib.import_module("fx_spectral.graph.backend").BackendConfig
    return globals()[name]


#: the old names (they warn), then BackendConfig (loaded on first use, no warning).
_renamed = renamed(__name__, {"SpectralConfig": "TransformConfig", "SpectralBackendConfig": "BackendConfig"}, _resolve)


def __getattr__(name: str):
    return _resolve(name) if name == "BackendConfig" else _renamed(name)


class _Package(_types.ModuleType):
    """The graph package's module type: the import system's binding of a submodule on its package
    (``import fx_spectral.graph.bake`` or ``fx_spectral.graph.transform``, the deprecated shims) does
    not hide the public function of the same name."""

    def __setattr__(self, name: str, value) -> None:
        if name in __all__ and isinstance(value, _types.ModuleType):
            return  # NB: the submodule stays reachable as sys.modules["fx_spectral.graph.<name>"]
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
