"""Deprecated module path: use :mod:`fx_spectral.graph.tracing`.

The module was renamed so that ``fx_spectral.graph.transform`` (and ``fx_spectral.transform``) is
only ever the function. Importing this path warns (``DeprecationWarning``) and gives the same
objects, the private ones that pickles and older code reference included.
"""

import warnings

from fx_spectral.graph.spectral_module import _rebuild, _unpickle  # noqa: F401  (what older pickles name)
from fx_spectral.graph.tracing import *  # noqa: F403
from fx_spectral.graph.tracing import (  # noqa: F401
    SpectralGraphModule,
    TransformConfig,
    __getattr__,  # SpectralConfig, the old class name: warns
    _install_owners,
    _Weight,
    spectral_pass,
    transform,
)

__all__ = ["TransformConfig", "SpectralGraphModule", "transform", "spectral_pass"]

warnings.warn(
    "fx_spectral.graph.transform (the module) is deprecated: use fx_spectral.graph.tracing; "
    "fx_spectral.graph.transform and fx_spectral.transform are the function",
    DeprecationWarning,
    stacklevel=2,
)
