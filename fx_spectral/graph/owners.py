"""Which module owns a Parameter (found from the Parameter object itself), and its u/v buffers.

Dynamo reuses one compiled graph for every instance of a class: parameters are graph *inputs*, so
the graph compiled for ``block_0`` also runs ``block_1``, another instance of the model, or the
same block after a graph break. Whatever a backend binds at compile time (the owning module, its
u/v buffers) would therefore belong to the first instance. The ``"spectral"`` backend instead
resolves the owner of every weight it normalizes from the ``nn.Parameter`` objects it is called
with, matched by identity against the modules it can reach:

1. at compile time, the root modules dynamo's sources lead to (``L['self']`` in
   ``L['self']._modules['fc']._parameters['weight']``) and the modules among the frame's locals;
2. the modules among the locals of the Python frames on the call stack, innermost first (at run
   time the first of them is the compiled frame itself: ``self`` of the block being called),
   skipping torch's compiler internals;
3. the root modules seen at compile time (held weakly).

Each root's ``named_modules()`` maps ``id(parameter) -> (module, fqn, name)``; a parameter held by
several modules (tied embedding and LM head) goes to the owner of highest ``owner_priority`` in
the kinds table (:mod:`fx_spectral.kinds`): the Linear / Conv / ConvTranspose among them.
The search runs only when a graph meets Parameter objects it has not seen; the result is cached by
the caller (:mod:`fx_spectral.graph.compiled`) and validated at every call with one dict lookup per
weight (``module._parameters[name] is param``).
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Iterable, Iterator
from types import FrameType

import torch
from torch import nn

from fx_spectral import power as P

__all__ = ["ensure_uv", "find_owners", "remember_roots", "wanted"]

_MAX_FRAMES = 200

_KNOWN_ROOTS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _internal_dirs() -> tuple[str, ...]:
    base = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    return tuple(
        os.path.join(base, d) + os.sep for d in ("_dynamo", "_functorch", "_inductor", "_higher_order_ops", "fx")
    ) + (here + os.sep,)


_INTERNAL = _internal_dirs()


def remember_roots(roots: Iterable[nn.Module]) -> None:
    """Keep (weakly) the root modules of a compiled frame: the last place searched for an owner."""
    for r in roots:
        _KNOWN_ROOTS.add(r)


def _frame_modules(frame: FrameType | None) -> Iterator[nn.Module]:
    """Modules among the locals of ``frame`` and of its callers, innermost first (compiler frames skipped)."""
    depth = 0
    while frame is not None and depth < _MAX_FRAMES:
        if not frame.f_code.co_filename.startswith(_INTERNAL):
            for value in list(frame.f_locals.values()):
                if isinstance(value, nn.Module):
                    yield value
        frame, depth = frame.f_back, depth + 1


def _table(root: nn.Module) -> dict[int, tuple[nn.Module, str, str]]:
    """``id(parameter) -> (module, fqn, name)`` over ``root``; a tied parameter goes to a Linear / Conv."""
    from fx_spectral.nn import SUPPORTED_MODULES

    table: dict[int, tuple[nn.Module, str, str]] = {}
    for fqn, module in root.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            if p is None:
                continue
            have = table.get(id(p))
            if have is None or (isinstance(module, SUPPORTED_MODULES) and not isinstance(have[0], SUPPORTED_MODULES)):
                table[id(p)] = (module, fqn, name)
    return table


def find_owners(
    params: list[torch.Tensor], first: Iterable[nn.Module] = (), frame: FrameType | None = None
) -> list[tuple[nn.Module, str, str] | None]:
    """``(module, fqn, name)`` holding each of ``params`` (by identity), None where none is in reach.

    Args:
        params: the Parameter objects (as passed to the compiled graph).
        first: root modules to search first (the compiled frame's roots, at compile time).
        frame: the innermost Python frame whose locals (and callers' locals) are searched next;
            default: the caller of this function.

    ``fqn`` is relative to the first root (in the order above) that holds the parameter.
    """
    if frame is None:
        frame = sys._getframe(1)
    found: list[tuple[nn.Module, str, str] | None] = [None] * len(params)
    missing = {id(p): i for i, p in enumerate(params)}
    seen: set[int] = set()

    def roots() -> Iterator[nn.Module]:
        yield from first
        yield from _frame_modules(frame)
        yield from list(_KNOWN_ROOTS)

    for root in roots():
        if id(root) in seen:
            continue
        seen.add(id(root))
        table = _table(root)
        for pid in [pid for pid in missing if pid in table]:
            owner = table[pid]
            i = missing.pop(pid)
            if owner[0]._parameters.get(owner[2]) is params[i]:
                found[i] = owner
        if not missing:
            break
    # NB: several entries of `params` may be the same tensor; all get its owner.
    by_id = {id(p): o for p, o in zip(params, found) if o is not None}
    return [by_id.get(id(p)) for p in params]


# --------------------------------------------------------------------------------------------
# State: u/v on the owning modules
# --------------------------------------------------------------------------------------------


def ensure_uv(todo: list[tuple[nn.Module, str, str, int, torch.Tensor]], eps: float) -> None:
    """Create the float32 u/v buffers of ``(module, fqn, name, dim, weight)`` (16 warm-up iterations, as the
    eager API); reuse existing ones. Validates everything before registering anything.

    Existing u/v of another floating dtype (after ``model.double()``) are converted back to float32.
    The rule is :func:`fx_spectral.power.ensure_uv`, shared with the eager API and the transform.
    """
    def where(fqn: str, name: str) -> str:
        return f"spectral backend: {fqn}.{name}" if fqn else f"spectral backend: {name}"

    for module, fqn, name, dim, weight in todo:  # all checked before any is changed
        P.check_uv(module, name, weight, dim, where(fqn, name))
    for module, fqn, name, dim, weight in todo:
        # NB: registers (or casts back to float32) {name}_u / {name}_v on the owning module: part of
        # model.state_dict() from now on. model.to(dtype) / .half() also converts them on plain modules.
        P.ensure_uv(module, name, weight, dim, eps, where(fqn, name))


def wanted(config, module: nn.Module, fqn: str, name: str) -> bool:
    """Whether the backend configured by ``config`` normalizes parameter ``name`` of ``module`` (at ``fqn``).

    Its ``name`` must be one of ``config.name``, the eager API must not normalize it already, and
    ``config.filter_fn(module, fqn)`` (if any) must say yes.
    """
    from fx_spectral.nn import is_spectral_normalized

    if name not in config.name or is_spectral_normalized(module, name):
        return False
    return config.filter_fn is None or bool(config.filter_fn(module, fqn))
