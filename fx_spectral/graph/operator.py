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

__all__ = [
    "operator_weight", "insert_operator_normalization", "conv_module_input", "check_operator_uv", "conv_consumers",
    "ensure_operator_uv", "transposed_output_padding",
]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # Lazy variants subclass these
CONV_T_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PAD = (F.pad, torch._C._nn.pad)  # symbolic_trace records F.pad, dynamo the builtin

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
        isinstance(module, CONV_TYPES) and module.padding_mode != "zeros" and isinstance(x, Node)
        and x.op == "call_function" and x.target in _PAD
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


def transposed_output_padding(module: nn.Module, in_shape: tuple, out_shape: tuple) -> tuple[int, ...]:
    """ConvTranspose: the output_padding mapping one input example's shape onto the output's (as the eager API)."""
    pads = []
    for i, k in enumerate(module.kernel_size):
        s, p, d = module.stride[i], module.padding[i], module.dilation[i]
        pads.append(out_shape[1 + i] - ((in_shape[1 + i] - 1) * s - 2 * p + d * (k - 1) + 1))
    return tuple(pads)


def conv_consumers(gm: nn.Module, node: Node) -> list[Node]:
    """The weight ops using ``node`` as their weight, in ``gm.graph`` or (any depth) inside the subgraphs of
    activation-checkpoint ops it is passed to (the body's op node, whose meta has the example shapes)."""
    from fx_spectral.graph.ops import weight_arg, weight_op
    from fx_spectral.graph.rewrite import SUBGRAPH_HOPS

    out = []
    for user in node.users:
        if weight_op(user) is not None and weight_arg(user) is node:
            out.append(user)
        elif user.op == "call_function" and user.target in SUBGRAPH_HOPS and user.args:
            body_attr = user.args[0]
            body = getattr(gm, body_attr.target, None) if isinstance(body_attr, Node) else None
            if not isinstance(body, torch.fx.GraphModule):
                continue
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            for i, a in enumerate(user.args[1:]):
                if a is node and i < len(placeholders):
                    out.extend(conv_consumers(body, placeholders[i]))
    return out


def ensure_operator_uv(todo: list[tuple], eps: float) -> None:
    """Create (or check) operator-mode u/v for ``(module, fqn, name, spec, in_shape, out_shape, weight)``.

    Existing u/v must have the shapes of one input / output example (ValueError naming the module
    otherwise: the input shape changed, or matrix-mode u/v are there). Validates everything before
    registering anything. NB: registers float32 buffers ``{name}_u`` / ``{name}_v`` on the modules.
    """
    create = []
    for module, fqn, name, spec, in_shape, out_shape, weight in todo:
        where = f"{fqn}.{name}" if fqn else name
        if check_operator_uv(module, name, in_shape, out_shape, where, "spectral backend") is not None:
            continue
        for k in ("_u", "_v"):
            if hasattr(module, name + k):
                raise ValueError(f"spectral backend: {where}: cannot add buffer {name + k!r}: the module already "
                                 "has an attribute of that name")
        create.append((module, name, spec, in_shape, weight))
    with torch.inference_mode(False):
        for module, name, spec, in_shape, weight in create:
            u, v = sn.operator_init_uv(weight, spec, in_shape, eps)
            module.register_buffer(name + "_u", u)
            module.register_buffer(name + "_v", v)
