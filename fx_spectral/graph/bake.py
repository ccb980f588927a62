"""Deprecated module path: use :mod:`fx_spectral.graph.baking`.

The module was renamed so that :func:`fx_spectral.graph.bake` (and :func:`fx_spectral.bake`) is
only ever the function. Importing this path warns (``DeprecationWarning``) and gives the same
objects.
"""

import warnings

from fx_spectral.graph.baking import *  # noqa: F403
from fx_spectral.graph.baking import bake

__all__ = ["bake"]

warnings.warn(
    "fx_spectral.graph.bake (the module) is deprecated: import fx_spectral.graph.baking "
    "(fx_spectral.graph.bake is the function)",
    DeprecationWarning,
    stacklevel=2,
)
