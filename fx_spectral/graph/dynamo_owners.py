r"""Which modules a dynamo graph's weights belong to: the frame dynamo is compiling, read through its private API.

The ``"spectral"`` backend matches each weight to its owning module by the identity of the
Parameter (:mod:`fx_spectral.graph.owners`); the search starts from *root modules*. This file finds
them while dynamo compiles: :func:`compile_roots` takes the frame's instruction translator
(``InstructionTranslator.current_tx()``, a private torch API), follows each weight input's
``Source`` (``L['self']._modules['fc']._parameters['weight']``) back to the outermost
``nn.Module`` on its path, then adds the ``nn.Module`` locals of the frame. Everything that touches
dynamo's private API is here, and each use degrades to "no roots" (the owner search then falls back
to the roots it remembers and the caller's frames) when the API is absent or moved.

Example::

    >>> roots = compile_roots([placeholder_of_fc_weight])  # doctest: +SKIP
    >>> roots[0] is model  # L['self'] of the compiled forward
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["compile_roots", "describe", "dynamo_frame", "node_source", "resolve_source", "root_module"]


def dynamo_frame():
    """The instruction translator of the frame dynamo is compiling, None outside dynamo (private API)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # not under dynamo, or the private API moved
        return None


def node_source(node: torch.fx.Node):
    """The dynamo ``Source`` a graph input came from (``L['self']._modules['fc']._parameters['weight']``), or None."""
    src = getattr(node, "_dynamo_source", None)
    if src is None:
        src = getattr(node.meta.get("grapharg"), "source", None)
    return src


def describe(node: torch.fx.Node) -> str:
    """A graph input for messages: its source's name when dynamo recorded one, else the node's name."""
    src = node_source(node)
    return src.name if src is not None else node.name


def resolve_source(tx, source) -> Any:
    """The value ``source`` names in the frame ``tx`` is compiling (raises if it cannot be evaluated)."""
    output = getattr(tx, "output", None)
    if hasattr(output, "resolve_source_value"):
        return output.resolve_source_value(source)
    return source.get_value({"G": tx.f_globals, "L": tx.f_locals}, {}, {})


def root_module(source, tx, cache: dict) -> nn.Module | None:
    """The outermost nn.Module on the path of ``source`` (``L['self']`` in ``L['self']._modules['fc']...``)."""
    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    for s in reversed(chain):  # from the frame's local / global inwards
        if s not in cache:
            try:
                cache[s] = resolve_source(tx, s)
            except Exception:  # a source dynamo can guard on but we cannot evaluate: try the next one
                cache[s] = None
        if isinstance(cache[s], nn.Module):
            return cache[s]
    return None


def compile_roots(nodes: list[torch.fx.Node]) -> list[nn.Module]:
    """The root modules of the frame dynamo is compiling: where the weights' sources start, then its locals."""
    tx = dynamo_frame()
    if tx is None:
        return []
    roots: list[nn.Module] = []
    cache: dict = {}
    for node in nodes:
        root = root_module(node_source(node), tx, cache)
        if root is not None and all(root is not r for r in roots):
            roots.append(root)
    local_modules = [m for m in getattr(tx, "f_locals", {}).values() if isinstance(m, nn.Module)]
    return roots + [m for m in local_modules if all(m is not r for r in roots)]
