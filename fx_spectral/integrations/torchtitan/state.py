"""Checkpoint state of the TorchTitan integration: the persistent power-iteration vectors.

``constrain()`` keeps each weight's ``(u, v)`` in the optimizer's per-parameter state. TorchTitan's
optimizer checkpoint only restores state entries that already exist when it loads, which these do
not until the first projection, so a resumed run would restart the vectors from scratch. The
``Stateful`` here saves them under the checkpoint key ``"spectral"`` (register it as
``checkpointer.states["spectral"]``) and puts them back on load: a resumed run continues with the
same vectors, hence the same weights, as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

__all__ = ["SpectralState", "canonical_name"]

_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """``name`` without activation-checkpoint / compile / FSDP1 wrapper prefixes (stable across configs)."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def _entries(handle):
    for t in handle.targets:
        shapes = dict(handle.pieces(t))  # key -> (rows, cols) of each matrix the weight is projected as
        device = t.param.to_local().device if hasattr(t.param, "to_local") else t.param.device
        dtype = torch.float64 if t.param.dtype == torch.float64 else torch.float32
        for key in t.w_max:
            yield canonical_name(t.name(key)), t, key, shapes[key], device, dtype


class SpectralState(Stateful):
    """The ``(u, v)`` vectors of every constrained weight, as a DCP-friendly flat dict.

    Keys: ``"<name>/u"``, ``"<name>/v"``, ``"<name>/valid"`` (0 while a weight has no vectors yet).
    Vectors are plain tensors, identical on every rank (replicated), also for DTensor weights.

    Example::

        state = SpectralState(handles)
        trainer.checkpointer.states["spectral"] = state
    """

    def __init__(self, handles):
        self.handles = list(handles)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for handle in self.handles:
            for name, t, key, (m, n), device, dtype in _entries(handle):
                prev = handle.vectors.get(t, key)
                ok = prev is not None and prev[0].shape[-1] == m and prev[1].shape[-1] == n
                u = prev[0].detach().to(device, dtype).clone() if ok else torch.zeros(m, device=device, dtype=dtype)
                v = prev[1].detach().to(device, dtype).clone() if ok else torch.zeros(n, device=device, dtype=dtype)
                out[f"{name}/u"], out[f"{name}/v"] = u, v
                out[f"{name}/valid"] = torch.tensor(int(ok), dtype=torch.int64, device=device)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for handle in self.handles:
            for name, t, key, _, _, _ in _entries(handle):
                valid = state_dict.get(f"{name}/valid")
                if valid is None or not int(valid):
                    continue
                # NB: replaces the handle's stored vectors (in the optimizer state).
                handle.vectors.put(t, key, state_dict[f"{name}/u"].clone(), state_dict[f"{name}/v"].clone())
