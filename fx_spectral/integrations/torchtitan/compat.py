"""What TorchTitan 0.3.0 lacks on torch 2.13 / CPU / gloo, applied only by the training entry point.

Importing :mod:`fx_spectral` or :mod:`fx_spectral.integrations.torchtitan` changes nothing in
torch or TorchTitan. :func:`apply` (called by ``python -m fx_spectral.integrations.torchtitan.train``
before TorchTitan is imported) applies each workaround below **only when its condition holds**
and returns the names of those it applied; on a CUDA machine with triton and a torch that has
``torch.distributed.set_timeout`` it applies nothing.

Checked on torch 2.13.0 (CPU build) and torchtitan 0.3.0 (tyro 1.0.17):

``triton_shim`` (no ``triton`` importable)
    ``torchtitan/train.py`` imports ``torchtitan.trainer``, which (through the MoE token
    dispatcher) imports ``torchtitan.distributed.minimal_async_ep.kernels``, which does
    ``import triton`` at module level. A stand-in for that one kernels module is registered
    (see ``_triton_shim``); its launchers raise a RuntimeError naming the fix if ever called.

``cpu_device`` (no accelerator: ``torch._utils._get_available_device_type()`` is None)
    ``torchtitan.tools.utils`` sets ``device_type = _get_available_device_type() or "cuda"`` at
    import, and the Trainer calls ``device_module.set_device``, the memory monitor calls
    ``get_device_name`` / ``get_device_properties(...).total_memory`` / ``memory_stats`` /
    ``reset_peak_memory_stats`` / ``empty_cache``, and ``set_pg_timeouts`` calls
    ``barrier(device_ids=[device_module.current_device()])`` then ``device_module.synchronize()``.
    ``device_type`` becomes ``"cpu"`` (so the process group is gloo and the mesh is a CPU mesh) and
    ``device_module`` a :class:`CpuDeviceModule`: ``torch.cpu`` plus those calls, with the host's
    RAM as capacity and the process's peak resident memory (``getrusage``) as the memory figure.

``set_timeout`` (``torch.distributed`` has no ``set_timeout``)
    TorchTitan's ``set_pg_timeouts`` (called after the first step of every run) calls
    ``torch.distributed.set_timeout(timeout, group)``; torch 2.13.0 only has the private
    ``torch.distributed.distributed_c10d._set_pg_timeout(timeout, group)`` with the same meaning.
    Not CPU-specific: a GPU run on torch 2.13.0 needs it too.

``fsdp_sum_reduction`` (no CUDA, so the process group is gloo)
    TorchTitan sets FSDP2's gradient divide factor to 1.0, so FSDP2 reduce-scatters with
    ``ReduceOp.PREMUL_SUM(1.0)``, which gloo rejects. After the Trainer is built, every
    ``FSDPModule`` of its model parts gets ``set_force_sum_reduction_for_comms(True)``: a SUM
    reduce-scatter followed by a multiply by 1.0, the same gradients.

``spmd_backend`` (no CUDA, and no ``--parallelism.spmd_backend`` given)
    On 2 gloo ranks the default ``--parallelism.spmd_backend spmd_types`` refuses plain-tensor
    parameters (embedding, final norm, head); TorchTitan's own ``--module qwen3`` fails the same
    way, ``partial_dtensor`` works. Not checked on GPUs, so only added without CUDA: the entry
    point appends ``--parallelism.spmd_backend partial_dtensor`` (see :func:`extra_args`).
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Workaround", "WORKAROUNDS", "CpuDeviceModule", "apply", "needed", "extra_args"]


def _has_accelerator() -> bool:
    from torch._utils import _get_available_device_type

    return _get_available_device_type() is not None


def _cuda() -> bool:
    return torch.cuda.is_available()


class CpuDeviceModule:
    """``torch.cpu`` plus the ``torch.cuda``-style calls TorchTitan's Trainer makes.

    Memory figures: capacity is the host's physical RAM; ``memory_stats`` reports this process's
    peak resident set size (``getrusage``) as the ``active`` / ``reserved`` peaks; the peak cannot be
    reset on CPU (``reset_peak_memory_stats`` is a no-op).
    """

    def __getattr__(self, name: str):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        # NB: torch.cpu.current_device() returns the string "cpu"; barrier(device_ids=[...]) needs an int.
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def get_device_name(device=None) -> str:
        return f"CPU ({os.cpu_count()} cores)"

    @staticmethod
    def get_device_properties(device=None):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return type("CpuProperties", (), {"total_memory": total, "name": CpuDeviceModule.get_device_name()})()

    @staticmethod
    def memory_stats(device=None) -> dict:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak, "num_alloc_retries": 0, "num_ooms": 0}

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass


def _apply_triton_shim() -> None:
    from fx_spectral.integrations.torchtitan import _triton_shim

    _triton_shim.install()


def _apply_cpu_device() -> None:
    import torchtitan.tools.utils as tt_utils

    loaded = [m for m in _COPIES_DEVICE if m in sys.modules]
    if loaded:
        raise RuntimeError(
            f"fx_spectral: the cpu_device workaround must run before TorchTitan's modules are imported; {loaded[:3]} "
            "are already loaded (they copied torchtitan.tools.utils.device_type)"
        )
    # NB: module globals that TorchTitan's modules copy at import (from ... import device_type, device_module).
    tt_utils.device_type = "cpu"
    tt_utils.device_module = CpuDeviceModule()


# TorchTitan 0.3.0's modules that do ``from torchtitan.tools.utils import device_type/device_module``.
_COPIES_DEVICE = (
    "torchtitan.components.metrics",
    "torchtitan.models.common.token_dispatcher",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.distributed.utils",
    "torchtitan.tools.profiler",
)


def _apply_set_timeout() -> None:
    from torch.distributed.distributed_c10d import _set_pg_timeout

    def set_timeout(timeout, group=None) -> None:
        """Stand-in for ``torch.distributed.set_timeout`` (absent in this torch): ``_set_pg_timeout``."""
        _set_pg_timeout(timeout, group)

    # NB: adds the missing public name to torch.distributed, in the entry point's process only.
    torch.distributed.set_timeout = set_timeout


def _apply_fsdp_sum_reduction() -> None:
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.trainer import Trainer

    init = Trainer.__init__
    if getattr(init, "_fx_spectral_sum_reduction", False):
        return

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for part in getattr(self, "model_parts", []):
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.set_force_sum_reduction_for_comms(True)

    __init__._fx_spectral_sum_reduction = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    # NB: wraps Trainer.__init__ (and so every subclass's super().__init__) in this process.
    Trainer.__init__ = __init__


@dataclass(frozen=True)
class Workaround:
    """One workaround: its name, when it is needed, and how it is applied."""

    name: str
    needed: Callable[[], bool]
    apply: Callable[[], None]


WORKAROUNDS: tuple[Workaround, ...] = (
    Workaround("triton_shim", lambda: not _triton_available(), _apply_triton_shim),
    Workaround("cpu_device", lambda: not _has_accelerator(), _apply_cpu_device),
    Workaround("set_timeout", lambda: not hasattr(torch.distributed, "set_timeout"), _apply_set_timeout),
    Workaround("fsdp_sum_reduction", lambda: not _cuda(), _apply_fsdp_sum_reduction),
)


def _triton_available() -> bool:
    from fx_spectral.integrations.torchtitan import _triton_shim

    return _triton_shim.triton_available()


def needed() -> list[str]:
    """Names of the workarounds this machine needs (nothing is applied)."""
    return [w.name for w in WORKAROUNDS if w.needed()]


def apply() -> list[str]:
    """Apply every needed workaround, in order (once per process); return the names applied.

    Must run before TorchTitan's trainer is imported (``cpu_device`` checks it and raises otherwise).
    """
    for w in WORKAROUNDS:
        if w.name not in _APPLIED and w.needed():
            w.apply()
            _APPLIED.append(w.name)
    return list(_APPLIED)


_APPLIED: list[str] = []


def extra_args(argv: list[str]) -> list[str]:
    """Command-line flags to add for TorchTitan on this machine (``spmd_backend`` on CPU), given ``argv``."""
    if _cuda() or any(a == "--parallelism.spmd_backend" or a.startswith("--parallelism.spmd_backend=") for a in argv):
        return []
    return ["--parallelism.spmd_backend", "partial_dtensor"]
