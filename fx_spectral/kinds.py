r"""The table of weight kinds: one entry per kind of weight-bearing layer, read by every other part.

A *kind* (Linear, ConvNd, ConvTransposeNd, Embedding) declares once what the rest of the library
needs to know about its weight:

- ``module_types``: the ``nn.Module`` classes of the kind (``isinstance``: Lazy variants, subclasses
  and the eager API's generated subclasses match);
- ``ops``: the functional ops that take such a weight, torch-level (``symbolic_trace``, dynamo) and
  ATen (``torch.export``), each with the weight's :class:`WeightArg` (positional index, keyword);
- ``dim``: the output axis of the weight, and its matrix view
  :math:`W_{mat} = \mathrm{flatten}_1(\mathrm{movedim}(W, dim, 0))` (:func:`weight_matrix`);
- ``rms_scale(rows, cols)``: the factor ``s`` ``constrain()`` divides the matrix view by, so that a cap
  ``w_max`` on :math:`\sigma(W)/s` is a cap on the RMS -> RMS norm;
- ``lower``: how a stock module call becomes its functional op in the graph pass (None: the graph
  pass and the backend leave the kind alone, its modules and its functional ops);
  ``lowering_blocker``: a per-module reason it cannot be lowered (e.g. ConvTranspose's padding_mode);
- ``default_selected``: picked by ``apply_spectral_norm()``, ``constrain()`` and the TorchTitan
  integration when the user names nothing; ``lazy_deferrable``: its Lazy variant may create u/v at
  its first forward; ``owner_priority``: which module owns a weight shared by several (tied
  embedding / LM head: the Linear);
- ``operator_norm``: how its operator norm is computed: ``"matrix"`` (the exact :math:`\lVert W\rVert_2`
  of the matrix view is the layer's l2 -> l2 norm), ``"conv"`` (a convolution operator: the reshaped
  kernel's norm is not the operator's, see :mod:`fx_spectral.operator_norms`), or None (no l2 -> l2
  norm: bounds refuse the kind).

Adding a kind is one :class:`WeightKind` entry in :data:`KINDS` plus its tests; every lookup below
(:func:`kind_of`, :func:`stock_kind`, :func:`kind_of_op`, :data:`MODULE_TYPES`, :data:`WEIGHT_OPS`,
:func:`default_dim`, :func:`default_selected`) is derived from it.

This module imports torch only (the ground floor of the house).

Example::

    >>> kind_of(nn.Conv2d(3, 8, 3)).name, kind_of(nn.ConvTranspose2d(3, 8, 3)).dim
    ('conv', 1)
    >>> kind_of_op(torch.ops.aten.embedding.default).ops[torch.ops.aten.embedding.default].index
    0
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node

__all__ = [
    "WeightArg", "Lowered", "WeightKind", "LINEAR", "CONV", "CONV_TRANSPOSE", "EMBEDDING", "KINDS",
    "CONV_FN", "CONV_T_FN", "CONVOLUTION_OP", "MODULE_TYPES", "WeightOp", "WEIGHT_OPS",
    "kind_of", "stock_kind", "kind_of_op", "default_dim", "weight_matrix", "rms_scale", "module_rms_scale",
    "default_selected", "owner_priority", "weight_op", "weight_arg", "weight_dim", "is_aten_op", "module_dim",
]

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------
# Shared math
# --------------------------------------------------------------------------------------------


def weight_matrix(weight: Tensor, dim: int = 0) -> Tensor:
    """View ``weight`` as a matrix: move ``dim`` to the front and flatten the rest (a view when possible)."""
    if dim != 0:
        weight = weight.movedim(dim, 0)
    return weight.flatten(1)


def rms_scale(rows: int, cols: int) -> float:
    r"""``s = sqrt(rows / cols)`` = ``sqrt(fan_out / fan_in)`` of a matrix view whose rows are the outputs.

    A layer ``y = W x`` with ``W`` of shape ``(rows, cols)`` has
    :math:`\lVert W\rVert_{RMS\to RMS} = \sqrt{cols/rows}\,\sigma(W) = \sigma(W)/s`.
    """
    return (rows / cols) ** 0.5


# --------------------------------------------------------------------------------------------
# The entry type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightArg:
    """Where a functional op takes its weight: positional ``index`` or keyword ``kwarg``."""

    index: int
    kwarg: str = "weight"


@dataclass(frozen=True)
class Lowered:
    """A stock module call as a functional call: ``op(pre(x), weight, bias, *args)``.

    ``pre`` is ``(fn, args, kwargs)`` for an input transform ``x = fn(x, *args, **kwargs)`` run first
    (a Conv's non-zeros ``padding_mode``: ``F.pad``), or None.
    """

    op: Callable
    args: tuple
    pre: tuple[Callable, tuple, dict] | None = None


def _no_blocker(module: nn.Module) -> str | None:
    return None


@dataclass(frozen=True, kw_only=True, eq=False)
class WeightKind:
    """One kind of weight-bearing layer (see the module docstring for what each field is for).

    Compared and hashed by identity: the entries of :data:`KINDS` are the kinds.
    """

    name: str
    module_types: tuple[type[nn.Module], ...]
    ops: Mapping[object, WeightArg]
    dim: int
    default_selected: bool
    lazy_deferrable: bool
    owner_priority: int
    operator_norm: Literal["matrix", "conv"] | None
    lower: Callable[[nn.Module], Lowered] | None = None
    lowering_blocker: Callable[[nn.Module], str | None] = _no_blocker
    matrix: Callable[[Tensor, int], Tensor] = weight_matrix
    rms_scale: Callable[[int, int], float] = rms_scale
    doc: str = field(default="", repr=False)

    @property
    def in_graph(self) -> bool:
        """True if the graph pass and the backend normalize this kind (its modules and functional ops)."""
        return self.lower is not None


# --------------------------------------------------------------------------------------------
# Functional ops, one table per dimensionality (F.conv2d is torch.conv2d, the same object)
# --------------------------------------------------------------------------------------------

#: spatial dims -> functional convolution (``torch.conv{d}d``, ``F.conv{d}d``).
CONV_FN: dict[int, Callable] = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}
#: spatial dims -> functional transposed convolution (``torch.conv_transpose{d}d``).
CONV_T_FN: dict[int, Callable] = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}
#: ``aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)``:
#: a conv or a conv_transpose depending on ``transposed`` (so it belongs to no single kind).
CONVOLUTION_OP = aten.convolution.default
_CONVOLUTION_TRANSPOSED_INDEX = 6

_W1 = WeightArg(1)


def _lower_linear(module: nn.Module) -> Lowered:
    return Lowered(F.linear, ())


def _lower_conv(module: nn.Module) -> Lowered:
    n = len(module.kernel_size)
    if module.padding_mode != "zeros":
        pad = (F.pad, (module._reversed_padding_repeated_twice,), {"mode": module.padding_mode})
        return Lowered(CONV_FN[n], (module.stride, (0,) * n, module.dilation, module.groups), pad)
    return Lowered(CONV_FN[n], (module.stride, module.padding, module.dilation, module.groups))


def _lower_conv_transpose(module: nn.Module) -> Lowered:
    n = len(module.kernel_size)
    args = (module.stride, module.padding, module.output_padding, module.groups, module.dilation)
    return Lowered(CONV_T_FN[n], args)


def _conv_transpose_blocker(module: nn.Module) -> str | None:
    if module.padding_mode != "zeros":
        return f"{type(module).__name__} only supports padding_mode='zeros'"
    return None


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

LINEAR = WeightKind(
    name="linear",
    module_types=(nn.Linear,),
    ops={F.linear: _W1, aten.linear.default: _W1},  # F.linear is torch._C._nn.linear
    dim=0,
    default_selected=True,
    lazy_deferrable=True,
    owner_priority=1,
    operator_norm="matrix",
    lower=_lower_linear,
)

CONV = WeightKind(
    name="conv",
    module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d),
    ops={
        **{fn: _W1 for fn in CONV_FN.values()},
        **{op: _W1 for op in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                              aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)},
    },
    dim=0,
    default_selected=True,
    lazy_deferrable=True,
    owner_priority=1,
    operator_norm="conv",
    lower=_lower_conv,
)

CONV_TRANSPOSE = WeightKind(
    name="conv_transpose",
    module_types=(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    ops={
        **{fn: _W1 for fn in CONV_T_FN.values()},
        **{op: _W1 for op in (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                              aten.conv_transpose3d.input)},
    },
    dim=1,  # the weight is (in, out / groups, *k)
    default_selected=True,
    lazy_deferrable=True,
    owner_priority=1,
    operator_norm="conv",
    lower=_lower_conv_transpose,
    lowering_blocker=_conv_transpose_blocker,
)

EMBEDDING = WeightKind(
    name="embedding",
    module_types=(nn.Embedding,),
    ops={F.embedding: _W1, aten.embedding.default: WeightArg(0)},  # aten.embedding(weight, indices, ...)
    dim=0,
    default_selected=False,
    lazy_deferrable=False,
    owner_priority=0,
    operator_norm=None,
    lower=None,
    doc=(
        "nn.Embedding (num_embeddings, embedding_dim). Eager spectral_norm normalizes it as torch does "
        "(dim 0: sigma estimates ||W||_2 from below), and ||W||_2 bounds every looked-up row: "
        "||W[i]||_2 <= ||W||_2. Its input is an "
        "index, not a vector, so it has no l2 -> l2 operator norm (operator_norm None: bounds refuse it); "
        "rms_scale keeps the matrix-view rule sqrt(rows / cols) (torch's fan convention for this layout), "
        "which is what an explicit constrain(include=...) of an embedding uses. Not selected by default and "
        "left alone by the graph pass and the backend (lower None), as before the kind existed."
    ),
)

#: Every kind, in lookup order (a module matches the first kind whose module_types it is an instance of).
KINDS: tuple[WeightKind, ...] = (LINEAR, CONV, CONV_TRANSPOSE, EMBEDDING)


# --------------------------------------------------------------------------------------------
# Derived lookups
# --------------------------------------------------------------------------------------------

#: Module types selected by default (``apply_spectral_norm``'s targets; ``nn.SUPPORTED_MODULES``).
MODULE_TYPES: tuple[type[nn.Module], ...] = tuple(t for k in KINDS if k.default_selected for t in k.module_types)


def kind_of(module: nn.Module) -> WeightKind | None:
    """The kind of ``module`` (isinstance, first match in :data:`KINDS`), or None."""
    for kind in KINDS:
        if isinstance(module, kind.module_types):
            return kind
    return None


def stock_kind(module: nn.Module | type) -> WeightKind | None:
    """The kind whose torch class ``module`` (an instance or a class) runs the unmodified ``forward`` of.

    A subclass that overrides ``forward`` is not stock (None): the graph pass cannot lower its calls
    and the eager API feeds it the normalized weight through a property instead of a fused forward.
    """
    cls = module if isinstance(module, type) else type(module)
    for kind in KINDS:
        for base in kind.module_types:
            if issubclass(cls, base) and cls.forward is base.forward:
                return kind
    return None


def kind_of_op(target: object) -> WeightKind | None:
    """The kind whose functional ops include ``target`` (torch-level or ATen), or None.

    None for :data:`CONVOLUTION_OP` too (its kind depends on its ``transposed`` argument).
    """
    try:
        for kind in KINDS:
            if target in kind.ops:
                return kind
    except TypeError:  # unhashable target
        return None
    return None


def default_dim(module: nn.Module) -> int:
    """The output dimension of ``module``'s weight: 1 for ConvTranspose (``(in, out/groups, *k)``), else 0."""
    kind = kind_of(module)
    return 0 if kind is None else kind.dim


def module_rms_scale(module: nn.Module | None, rows: int, cols: int) -> float:
    """The RMS -> RMS scale ``s`` of a ``(rows, cols)`` matrix view of ``module``'s weight (any module:
    :func:`rms_scale` unless its kind declares another rule)."""
    kind = kind_of(module) if module is not None else None
    return (rms_scale if kind is None else kind.rms_scale)(rows, cols)


def owner_priority(module: nn.Module) -> int:
    """Priority of ``module`` as the owner of a weight shared by several modules (higher wins; 0: no kind)."""
    kind = kind_of(module)
    return 0 if kind is None else kind.owner_priority


def default_selected(owners: Iterable[tuple[str, nn.Module, str]], head_names: Iterable[str] = ()) -> bool:
    """True if a parameter held by ``owners`` (``(module fqn, module, parameter name)`` for each module
    holding it) is selected when the user names nothing: every owner is a default-selected kind, holds
    it as ``weight``, and is not named like an output head (its last fqn component in ``head_names``).

    The one default-selection rule of ``constrain()`` and the TorchTitan integration.
    """
    heads = frozenset(head_names)
    for mod_name, mod, pname in owners:
        kind = kind_of(mod)
        if pname != "weight" or kind is None or not kind.default_selected or mod_name.rsplit(".", 1)[-1] in heads:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Graph op tables (the graph pass and the backend; formerly fx_spectral/graph/ops.py)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightOp:
    """How a graph op takes its weight: positional ``index`` or keyword ``kwarg``; ``dim`` of its output axis.

    ``kind`` is the :class:`WeightKind` name, or ``"convolution"`` for ``aten.convolution`` whose ``dim``
    (None here) depends on its ``transposed`` argument.
    """

    kind: str
    dim: int | None
    index: int = 1
    kwarg: str = "weight"


#: call_function targets whose weight the graph pass and the backend normalize (kinds with a lowering).
WEIGHT_OPS: dict[object, WeightOp] = {
    **{
        target: WeightOp(kind.name, kind.dim, arg.index, arg.kwarg)
        for kind in KINDS if kind.in_graph for target, arg in kind.ops.items()
    },
    CONVOLUTION_OP: WeightOp("convolution", None),
}


def weight_op(node: Node) -> WeightOp | None:
    """The :data:`WEIGHT_OPS` entry for ``node`` if it is a ``call_function`` that consumes a weight, else None."""
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
