"""fx_spectral: control the spectral norm of PyTorch weights."""

from fx_spectral.nn import (
    apply_spectral_norm,
    is_spectral_normalized,
    remove_spectral_norm,
    spectral_norm,
    spectral_sigma,
)

__version__ = "0.1.0"

__all__ = [
    "apply_spectral_norm",
    "is_spectral_normalized",
    "remove_spectral_norm",
    "spectral_norm",
    "spectral_sigma",
]
