"""Deprecated module path: use :mod:`fx_spectral.certificates`.

The module was renamed so that the function :func:`fx_spectral.certify` no longer shares its name
with the module that defines it. Importing this path warns (``DeprecationWarning``) and gives the
same objects.
"""

import warnings

from fx_spectral.certificates import *  # noqa: F403
from fx_spectral.certificates import Certificate, CertRow, attained_lower_bound, certify

__all__ = ["CertRow", "Certificate", "attained_lower_bound", "certify"]

warnings.warn(
    "fx_spectral.certify (the module) is deprecated: import fx_spectral.certificates "
    "(fx_spectral.certify is the function)",
    DeprecationWarning,
    stacklevel=2,
)
