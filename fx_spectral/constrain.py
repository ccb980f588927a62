"""Deprecated module path: use :mod:`fx_spectral.constraint` (the :class:`Constraint` handle and
:func:`constrain`) and :mod:`fx_spectral.selection` (which weights it selects).

The module was renamed so that the function :func:`fx_spectral.constrain` no longer shares its
name with the module that defines it (``import fx_spectral.constraint as m`` gives the module).
Importing this path warns (``DeprecationWarning``) and gives the same objects.
"""

import warnings

from fx_spectral import constraint as _constraint
from fx_spectral import selection as _selection
from fx_spectral.constraint import *  # noqa: F403
from fx_spectral.constraint import (  # noqa: F401
    _ACTIVE,
    HEAD_NAMES,
    Constraint,
    Piece,
    ProjectionError,
    Target,
    VectorStore,
    __all__,
    _Target,
    constrain,
    default_names,
    initial_projection_method,
)
from fx_spectral.selection import _match, _owners  # noqa: F401

warnings.warn(
    "fx_spectral.constrain (the module) is deprecated: import fx_spectral.constraint "
    "(fx_spectral.constrain is the function)",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str):
    # NB: the former module's private helpers too, from wherever they live now, without a second warning
    for module in (_constraint, _selection):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
