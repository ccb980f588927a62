r"""Operator mode in graphs: one node per convolution weight computing ``W / sigma_op``.

.. math:: \sigma_{op} = \langle u, A(W) v\rangle, \qquad \bar W = W / \sigma_{op}

where :math:`A(W)` is the convolution as a linear map of one example (padding map included), and
u/v are float32 buffers shaped like one output / input example, updated by power iteration on
:math:`A` and :math:`A^\top` (:func:`fx_spectral.nn.operator_normalized_weight`, the same function the
eager ``spectral_norm(..., mode="operator")`` runs, so the numbers are the eager API's bitwise).

The graph gets one ``call_function`` node per weight,
``operator_weight(w, u, v, x, spec, where, n_power_iterations, eps, training)``, placed before the
weight's first consumer: ``x`` is the conv's input (for the shape check: the operator norm depends
on the input's spatial shape, so a different one raises instead of giving a wrong sigma), ``spec``
the operator as a tuple of ints (:func:`fx_spectral.nn.conv_operator_spec`), ``where`` the module
path for messages. The torch.compile backend calls the same function with ``x=None`` (it checks the
shapes when it compiles and binds instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, Node

from fx_spectral import nn as sn

__all__ = ["operator_weight", "insert_operator_normalization", "conv_module_input", "check_operator_uv"]

#: ``node.meta`` key on the operator-mode node: the name of the raw weight node (as NORMALIZED_META).
OPERATOR_META = "fx_spectral_operator"


def operator_weight(
    weight: Tensor, u: Tensor, v: Tensor, x: Tensor | None, spec: tuple, where: str,
    n_power_iterations: int, eps: float, training: bool,
) -> Tensor:
    r"""``W / sigma_op`` for the graphs (see the module docstring); NB: training updates ``u``/``v`` in place.

    Raises:
        ValueError: ``x``'s spatial shape is not the one u/v were created for.
    """
    if x is not None:
        n = v.dim() - 1
        if tuple(x.shape[-n:]) != tuple(v.shape[1:]) or x.shape[-n - 1] != v.shape[0]:
            raise ValueError(
                f"{where}: operator-mode spectral norm was set up for inputs of one example's shape "
                f"{tuple(v.shape)} (its weight_v), got an input of shape {tuple(x.shape)}; the "
                "operator norm depends on the input shape. Transform again with example_inputs of the new shape "
                "(after removing the u/v buffers), or keep the input shape fixed"
            )
    device_type = weight.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return sn.operator_normalized_weight(
                weight, u, v, spec, n_power_iterations=n_power_iterations, eps=eps, training=training
            )
    return sn.operator_normalized_weight(
        weight, u, v, spec, n_power_iterations=n_power_iterations, eps=eps, training=training
    )


def conv_module_input(op: Node, module: nn.Module) -> Node | object:
    """The node of the module's input to the conv ``op`` (before the ``F.pad`` of a non-zeros padding_mode)."""
    x = op.args[0] if op.args else op.kwargs.get("input")
    if (
        isinstance(module, sn._CONV) and module.padding_mode != "zeros" and isinstance(x, Node)
        and x.op == "call_function" and x.target is F.pad
    ):
        return x.args[0]
    return x


def check_operator_uv(owner: nn.Module, attr: str, in_shape: tuple | None, out_shape: tuple | None,
                      where: str, who: str) -> tuple[tuple, tuple] | None:
    """Existing operator-mode u/v of ``owner``: ``(in_shape, out_shape)`` from them, checked against the
    given shapes (None: unknown); None when there are none. Raises ValueError on a mismatch."""
    u, v = owner._buffers.get(attr + "_u"), owner._buffers.get(attr + "_v")
    if u is None and v is None:
        return None
    ok = u is not None and v is not None and u.dtype == torch.float32 and v.dtype == torch.float32
    ok = ok and u.dim() == v.dim() >= 2
    if ok and in_shape is not None:
        ok = tuple(v.shape) == tuple(in_shape)
    if ok and out_shape is not None:
        ok = tuple(u.shape) == tuple(out_shape)
    if not ok:
        shapes = [None if t is None else (tuple(t.shape), t.dtype) for t in (u, v)]
        raise ValueError(
            f"{who}: {where}_u / {where}_v exist as {shapes}; operator mode expects float32 buffers shaped like "
            f"one output / input example, {out_shape} / {in_shape} for these inputs (remove them, or load a "
            "matching checkpoint after the first call)"
        )
    return tuple(v.shape), tuple(u.shape)


def insert_operator_normalization(
    graph: Graph, weight: Node, u: Node, v: Node, x: Node | None, anchor: Node, *, spec: tuple, where: str,
    n_power_iterations: int, eps: float, training: bool,
) -> Node:
    """Insert ``operator_weight(weight, u, v, x, ...)`` before ``anchor`` and return its node.

    ``u``/``v``/``weight``/``x`` must come before ``anchor``. NB: edits ``graph`` in place; redirect
    the consumers yourself.
    """
    with graph.inserting_before(anchor):
        node = graph.create_node(
            "call_function", operator_weight,
            (weight, u, v, x, tuple(spec), where, n_power_iterations, eps, training), {},
            name=f"{weight.name}_operator_normalized",
        )
    node.meta[OPERATOR_META] = weight.name
    return node
