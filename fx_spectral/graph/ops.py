"""Op tables: which graph ops consume a weight, where the weight sits among their arguments, its ``dim``.

A weight reaches a linear / conv / conv_transpose op in one of three forms:

- a ``call_module`` leaf of one of the fourteen module types (``symbolic_trace``): the weight is the
  module's ``weight`` attribute and its ``dim`` is :func:`fx_spectral.nn.default_dim` (1 for
  ConvTranspose, whose weight is ``(in, out/groups, *k)``);
- a torch-level ``call_function`` (``symbolic_trace`` of functional code, dynamo graphs):
  ``F.linear`` (``torch._C._nn.linear``), ``torch.conv{1,2,3}d``, ``torch.conv_transpose{1,2,3}d``;
- an ATen ``call_function`` (``torch.export`` graphs): ``aten.linear``, ``aten.conv{1,2,3}d``,
  ``aten.conv_transpose{1,2,3}d.input`` and ``aten.convolution`` (``dim`` from its ``transposed`` flag).

In every functional form the weight is positional argument 1 or keyword ``weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from fx_spectral.nn import SUPPORTED_MODULES, default_dim

__all__ = [
    "WeightOp", "WEIGHT_OPS", "MODULE_TYPES", "weight_op", "weight_arg", "weight_dim", "is_aten_op", "module_dim",
]

aten = torch.ops.aten


@dataclass(frozen=True)
class WeightOp:
    """How an op takes its weight: positional ``index`` or keyword ``kwarg``; ``dim`` of its output axis.

    ``dim`` is None for ``aten.convolution``, whose ``dim`` depends on its ``transposed`` argument.
    """

    kind: str  # "linear" | "conv" | "conv_transpose" | "convolution"
    dim: int | None
    index: int = 1
    kwarg: str = "weight"


_LINEAR = WeightOp("linear", 0)
_CONV = WeightOp("conv", 0)
_CONV_T = WeightOp("conv_transpose", 1)

#: call_function targets that consume a weight, torch-level and ATen.
WEIGHT_OPS: dict[object, WeightOp] = {
    # torch level (symbolic_trace of functional code, dynamo graphs). F.linear is torch._C._nn.linear,
    # F.conv2d is torch.conv2d, F.conv_transpose2d is torch.conv_transpose2d.
    F.linear: _LINEAR,
    torch.conv1d: _CONV,
    torch.conv2d: _CONV,
    torch.conv3d: _CONV,
    torch.conv_transpose1d: _CONV_T,
    torch.conv_transpose2d: _CONV_T,
    torch.conv_transpose3d: _CONV_T,
    # ATen (torch.export graphs, before and after run_decompositions)
    aten.linear.default: _LINEAR,
    aten.conv1d.default: _CONV,
    aten.conv2d.default: _CONV,
    aten.conv3d.default: _CONV,
    aten.conv1d.padding: _CONV,
    aten.conv2d.padding: _CONV,
    aten.conv3d.padding: _CONV,
    aten.conv_transpose1d.default: _CONV_T,
    aten.conv_transpose2d.input: _CONV_T,
    aten.conv_transpose3d.input: _CONV_T,
    aten.convolution.default: WeightOp("convolution", None),
}

#: call_module leaf types (isinstance, so Lazy variants and subclasses match); ``dim`` from default_dim.
MODULE_TYPES: tuple[type[nn.Module], ...] = SUPPORTED_MODULES

_CONVOLUTION_TRANSPOSED_INDEX = 6  # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, ...)


def weight_op(node: Node) -> WeightOp | None:
    """The table entry for ``node`` if it is a ``call_function`` that consumes a weight, else None."""
    if node.op != "call_function":
        return None
    try:
        return WEIGHT_OPS.get(node.target)
    except TypeError:  # unhashable target
        return None


def weight_arg(node: Node) -> object:
    """The weight argument of a weight-consuming ``call_function`` node (a Node, or None if absent)."""
    op = WEIGHT_OPS[node.target]
    if len(node.args) > op.index:
        return node.args[op.index]
    return node.kwargs.get(op.kwarg)


def weight_dim(node: Node) -> int:
    """The output dimension of the weight of ``node``: 1 for conv_transpose (and transposed convolution), else 0."""
    op = WEIGHT_OPS[node.target]
    if op.dim is not None:
        return op.dim
    if len(node.args) > _CONVOLUTION_TRANSPOSED_INDEX:
        transposed = node.args[_CONVOLUTION_TRANSPOSED_INDEX]
    else:
        transposed = node.kwargs.get("transposed", False)
    if not isinstance(transposed, bool):
        raise ValueError(
            f"{node.format_node()}: expected a constant bool for the `transposed` argument of aten.convolution, "
            f"got {transposed!r}"
        )
    return 1 if transposed else 0


def is_aten_op(target: object) -> bool:
    """True for ATen OpOverloads (the ops of exported graphs)."""
    return isinstance(target, torch._ops.OpOverload)


def module_dim(module: nn.Module) -> int:
    """The output dimension of a leaf module's weight (1 for ConvTranspose, else 0)."""
    return default_dim(module)
