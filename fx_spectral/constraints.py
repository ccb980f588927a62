"""Deprecated module path: use :mod:`fx_spectral.projections` (the pure projection ops).

The module was renamed so that its name says what it holds and no longer reads like the
``constrain()`` handle's module. Importing this path warns (``DeprecationWarning``) and gives the
same objects: ``from fx_spectral import constraints as C`` keeps working for one release, with
``C.soft_cap is fx_spectral.projections.soft_cap``.
"""

import warnings

from fx_spectral import projections as _projections
from fx_spectral.coupling import _g, _t_peak  # noqa: F401  (the old module's private scalar map)
from fx_spectral.projections import *  # noqa: F403
from fx_spectral.projections import __all__  # noqa: F401

warnings.warn(
    "fx_spectral.constraints is deprecated: import fx_spectral.projections (the same ops)",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str):
    # NB: the module's private helpers too (``constraints._DEFAULT_FRESH_ITERATIONS``), without a second warning
    try:
        return getattr(_projections, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
