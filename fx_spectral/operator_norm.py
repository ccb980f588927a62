"""Deprecated module path: use :mod:`fx_spectral.operator_norms` (the convolution machinery is in
:mod:`fx_spectral.conv_bounds`).

The module was renamed so that the function :func:`fx_spectral.operator_norm` no longer shares
its name with the module that defines it. Importing this path warns (``DeprecationWarning``) and
gives the same objects.
"""

import warnings

from fx_spectral import operator_norms as _new
from fx_spectral.conv_bounds import GRID_TRIES, SVD_MARGIN
from fx_spectral.operator_norms import *  # noqa: F403

__all__ = [*_new.__all__, "GRID_TRIES", "SVD_MARGIN"]

warnings.warn(
    "fx_spectral.operator_norm (the module) is deprecated: import fx_spectral.operator_norms "
    "(fx_spectral.operator_norm is the function)",
    DeprecationWarning,
    stacklevel=2,
)
