"""Import shim so that TorchTitan 0.3.0 imports on CPU-only machines without ``triton``.

TorchTitan's model package (``torchtitan.models.common`` → MoE token dispatcher →
``torchtitan.distributed.minimal_async_ep.kernels``) does ``import triton`` at module
level: those are GPU kernels for expert-parallel MoE dispatch.  On a CPU-only machine
``triton`` is usually absent, so even the dense Qwen3 models fail to import, although
none of those kernels ever runs for a dense model or on CPU.

:func:`install` registers a stand-in for that single kernels module (not for
``triton`` itself, so torch's own triton detection is untouched): its public kernel
launchers exist and raise a ``RuntimeError`` that names the fix when called.  When a
real ``triton`` is importable, :func:`install` does nothing and TorchTitan imports
its real kernels.
"""

from __future__ import annotations

import importlib.util
import sys
import types

__all__ = ["install", "triton_available", "KERNELS_MODULE"]

KERNELS_MODULE = "torchtitan.distributed.minimal_async_ep.kernels"


def triton_available() -> bool:
    """True when a real ``triton`` package can be imported."""
    if "triton" in sys.modules:
        return True
    return importlib.util.find_spec("triton") is not None


class _KernelsStandIn(types.ModuleType):
    _fx_spectral_shim = True

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def _unavailable(*args, **kwargs):
            raise RuntimeError(
                f"{KERNELS_MODULE}.{name} needs triton, which is not installed: "
                "fx_spectral imported TorchTitan with its CPU import shim "
                "(fx_spectral/integrations/torchtitan/_triton_shim.py). "
                "Expert-parallel MoE kernels need a GPU and `pip install triton`."
            )

        _unavailable.__name__ = name
        return _unavailable


def install() -> bool:
    """Make TorchTitan importable without triton; return True if the shim was installed.

    Idempotent, and a no-op when triton is importable or the kernels module is
    already loaded.

    Example::

        from fx_spectral.integrations.torchtitan import _triton_shim
        _triton_shim.install()
        import torchtitan.models.qwen3  # works on a CPU-only machine
    """
    if triton_available() or KERNELS_MODULE in sys.modules:
        return False
    # NB: mutates sys.modules for the rest of the process (only this one module name).
    sys.modules[KERNELS_MODULE] = _KernelsStandIn(
        KERNELS_MODULE, "fx_spectral stand-in: TorchTitan MoE triton kernels (absent triton)"
    )
    return True
