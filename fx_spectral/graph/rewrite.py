r"""The rewrite: find the ops that use a weight, redirect them to ``W / sigma``, lower module calls.

Shared by :func:`fx_spectral.transform` (weights as ``get_attr``) and the torch.compile backend
(weights as placeholders). :func:`find_weight_uses` / :func:`find_weight_uses_nested` find each
weight's consumers (inside activation-checkpoint bodies too), :func:`rewrite_weight` feeds them the
normalized weight or divides their outputs, and :func:`lower_module_call` turns a ``call_module``
leaf into the functional op it runs. The nodes themselves (power iteration, sigma, ``W / sigma``,
``op(x, W) / sigma + b``) are emitted by :mod:`fx_spectral.graph.emit`, whose public names are
re-exported here.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.fx import Graph, Node

from fx_spectral.graph.emit import NORMALIZED_META, insert_nodes, insert_normalization, insert_sigma, sigma_of
from fx_spectral.graph.output_scaling import SCALED_OUTPUT_META, divides_output, scale_output
from fx_spectral.kinds import WEIGHT_OPS, is_aten_op, stock_kind, weight_arg, weight_dim, weight_op

__all__ = [
    "NORMALIZED_META", "SCALED_OUTPUT_META", "SUBGRAPH_HOPS", "insert_normalization", "insert_sigma",
    "divides_output", "scale_output", "sigma_of", "find_weight_uses", "find_weight_uses_nested", "rewrite_weight",
    "lower_module_call", "lowering_blocker",
]


# --------------------------------------------------------------------------------------------
# Finding weights and redirecting their ops
# --------------------------------------------------------------------------------------------


def find_weight_uses(graph: Graph) -> dict[Node, list[tuple[Node, int]]]:
    """Map every weight node to the weight-consuming ops that use it, each with the weight's ``dim``.

    Looks at ``call_function`` nodes in :data:`fx_spectral.graph.ops.WEIGHT_OPS` (torch-level and
    ATen linear / conv / conv_transpose / convolution); ``call_module`` leaves are not included
    (lower them first with :func:`lower_module_call`). The weight node can be of any kind
    (``get_attr``, placeholder, computed): filter as you need. A weight used by several ops appears
    once, with all of its uses, in graph order.
    """
    uses: dict[Node, list[tuple[Node, int]]] = {}
    for node in graph.nodes:
        if weight_op(node) is None:
            continue
        w = weight_arg(node)
        if isinstance(w, Node):
            uses.setdefault(w, []).append((node, weight_dim(node)))
    return uses


#: Higher-order ops called as ``hop(body, *operands, **kwargs)`` that run the GraphModule ``body`` on
#: ``operands`` (one body placeholder per operand): the ones dynamo emits for
#: ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (selective or not) and for ``wrap``.
SUBGRAPH_HOPS: tuple[object, ...] = (torch.ops.higher_order.tag_activation_checkpoint, torch.ops.higher_order.wrap)


def _subgraphs(module: nn.Module, node: Node) -> list[torch.fx.GraphModule]:
    """The GraphModules ``node`` takes as ``get_attr`` arguments (the bodies of a higher-order op)."""
    out = []
    for a in node.args:
        if isinstance(a, Node) and a.op == "get_attr":
            body = _get_path(module, a.target)
            if isinstance(body, torch.fx.GraphModule):
                out.append(body)
    return out


def _get_path(module: nn.Module, target: str) -> object:
    try:
        return functools.reduce(getattr, target.split("."), module)
    except AttributeError:
        return None


def find_weight_uses_nested(
    gm: torch.fx.GraphModule, graph: Graph | None = None
) -> tuple[dict[Node, list[tuple[Node, int]]], list[Node], list[tuple[Node, Node]]]:
    """:func:`find_weight_uses` that also looks inside the subgraphs of activation-checkpoint ops.

    A dynamo graph of a block under ``torch.utils.checkpoint`` holds
    ``tag_activation_checkpoint(body, x, w1, b1, ...)``: the weights enter ``body`` as placeholders and
    its linear / conv ops use them there. For every node ``w`` of ``gm.graph`` this returns the
    consumers through which ``w`` reaches a weight op: the op itself, or the higher-order op node
    (in :data:`SUBGRAPH_HOPS`) that passes ``w`` into a body that uses it as a weight (at any depth),
    each with the weight's ``dim``. Feeding ``W / sigma`` to that higher-order op instead of ``W``
    normalizes the weight *outside* the checkpointed region (computed once, never recomputed).
    ``graph`` (default ``gm.graph``, e.g. a copy of it) is the graph searched; its ``get_attr``
    targets resolve in ``gm``.

    Returns:
        ``(uses, opaque, mixed)``: ``uses`` as in :func:`find_weight_uses` (a higher-order op appears
        once per use inside its body); ``opaque``: the other higher-order op nodes whose subgraphs use
        a placeholder as a weight (e.g. ``invoke_subgraph``): weights reaching those are not in
        ``uses``; ``mixed``: ``(higher-order op, body placeholder)`` pairs where the body also reads
        a weight placeholder for something other than a weight op (fed ``W / sigma``, it sees that).
    """
    opaque: list[Node] = []
    mixed: list[tuple[Node, Node]] = []

    def visit(module: nn.Module, graph: Graph) -> dict[Node, list[tuple[Node, int]]]:
        uses = find_weight_uses(graph)
        for node in graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
                continue
            bodies = _subgraphs(module, node)
            if not bodies:
                continue
            first = node.args[0] if node.args else None
            if node.target in SUBGRAPH_HOPS and len(bodies) == 1 and isinstance(first, Node) and first.op == "get_attr":
                body = bodies[0]
                placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
                operands = node.args[1:]
                if len(placeholders) == len(operands):
                    inner = visit(body, body.graph)
                    for ph, operand in zip(placeholders, operands):
                        if ph in inner and isinstance(operand, Node):
                            uses.setdefault(operand, []).extend((node, d) for _, d in inner[ph])
                            if set(ph.users) - {op for op, _ in inner[ph]}:
                                mixed.append((node, ph))
                    continue
            if any(_uses_placeholder_weights(b, visit) for b in bodies):
                opaque.append(node)
        return uses

    return visit(gm, gm.graph if graph is None else graph), opaque, mixed


def _uses_placeholder_weights(body: torch.fx.GraphModule, visit) -> bool:
    return any(n.op == "placeholder" for n in visit(body, body.graph))


def rewrite_weight(
    graph: Graph,
    weight: Node,
    ops: list[Node],
    u: Node,
    v: Node,
    *,
    dim: int,
    n_power_iterations: int,
    eps: float,
    training: bool,
    autocast_off: str | None = None,
    output_scaling: bool = True,
    weight_dtype: torch.dtype | None = None,
    weight_ndim: int | None = None,
) -> Node:
    r"""Normalize ``weight`` for each op in ``ops``: one sigma, then per op ``W / sigma`` or ``output / sigma``.

    .. math:: op(x, W, b) \ \to\ op(x, W/\sigma, b) \quad\text{or}\quad op(x, W)/\sigma + b

    :func:`insert_sigma` once (one power iteration however many ops use the weight), then for each
    op either :func:`scale_output` (when :func:`divides_output` says the output is the smaller
    tensor) or the op takes one shared ``W / sigma`` node (tagged :data:`NORMALIZED_META`). An op in
    ``ops`` may also be a higher-order op that passes the weight into a subgraph (activation
    checkpointing): it gets ``W / sigma``. Other users of ``weight`` (a ``.shape`` read, a
    non-weight use) keep the raw weight.

    Args:
        graph, weight, u, v, dim, n_power_iterations, eps, training, autocast_off, weight_dtype,
            weight_ndim: as :func:`insert_normalization`.
        ops: the nodes to feed the normalized weight (NB: edited in place, as ``graph``).
        output_scaling: True (default): per op, :func:`divides_output` chooses; False: always
            divide the weight (the nodes of :func:`insert_normalization`, bitwise the eager API's
            ``normalize_weight``).

    Returns:
        the node of ``sigma``.
    """
    for op in ops:
        hop = op.op == "call_function" and op.target in SUBGRAPH_HOPS and weight in op.args
        if not hop and (WEIGHT_OPS.get(op.target) is None or weight_arg(op) is not weight):
            raise ValueError(f"rewrite_weight: {op.format_node()} does not take {weight.name} as its weight")
    ops = list(dict.fromkeys(ops))
    scaled = [op for op in ops if output_scaling and divides_output(op, weight)]
    use_aten = any(is_aten_op(user.target) for user in weight.users if user.op == "call_function")
    rest = [op for op in ops if op not in scaled]
    sigma, new = insert_nodes(
        graph, weight, u, v, "rewrite_weight", bool(rest), dim=dim, n_power_iterations=n_power_iterations, eps=eps,
        training=training, use_aten=use_aten, weight_dtype=weight_dtype, weight_ndim=weight_ndim,
        autocast_off=autocast_off,
    )
    for op in rest:
        op.replace_input_with(weight, new)
    for op in scaled:
        scale_output(graph, op, sigma, use_aten=use_aten)
    return sigma


# --------------------------------------------------------------------------------------------
# call_module leaves -> functional calls with get_attr weights
# --------------------------------------------------------------------------------------------

def lowering_blocker(module: nn.Module, node: Node) -> str | None:
    """Why the ``call_module`` ``node`` of ``module`` cannot become a functional call (None if it can)."""
    kind = stock_kind(module)
    if kind is None:
        return f"{type(module).__name__} overrides forward"
    if kind.lower is None:
        return f"the graph pass does not lower {type(module).__name__} ({kind.name} kind)"
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False)):
        return "it is a Lazy module that has not run yet"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "it is parametrized (torch.nn.utils.parametrize)"
    reason = kind.lowering_blocker(module)
    if reason is not None:
        return reason
    n_inputs = len(node.args) + len(node.kwargs)
    if n_inputs != 1:
        return "it is called with more than its input (e.g. ConvTranspose's output_size)"
    return None


def _get_attr_before(graph: Graph, target: str, anchor: Node) -> Node:
    """A get_attr node of ``target`` placed before ``anchor``: an existing one (moved if needed) or a new one."""
    for n in graph.find_nodes(op="get_attr", target=target):
        # NB: moves n right before anchor if it came later (it has no inputs, its users come after it).
        order = {x: i for i, x in enumerate(graph.nodes)}
        if order[n] > order[anchor]:
            anchor.prepend(n)
        return n
    return graph.get_attr(target)


def lower_module_call(gm: nn.Module, node: Node, graph: Graph | None = None) -> Node:
    """Replace the ``call_module`` ``node`` of a Linear / Conv / ConvTranspose by the functional op it runs.

    The op takes ``get_attr`` nodes of the module's weight and bias and keeps the node's name, e.g.
    ``fc = torch._C._nn.linear(x, fc_weight, fc_bias)``. NB: ``graph`` (default ``gm.graph``) is
    edited in place; ``gm`` is the module its targets resolve in. Check :func:`lowering_blocker` first.
    """
    module = gm.get_submodule(node.target)
    reason = lowering_blocker(module, node)
    if reason is not None:
        raise ValueError(f"lower_module_call: cannot lower {node.target!r} ({type(module).__name__}): {reason}")
    graph = gm.graph if graph is None else graph
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    lowered = stock_kind(module).lower(module)
    with graph.inserting_before(node):
        w = _get_attr_before(graph, f"{node.target}.weight", node)
        b = _get_attr_before(graph, f"{node.target}.bias", node) if module.bias is not None else None
        if lowered.pre is not None:
            fn, pre_args, pre_kwargs = lowered.pre
            x = graph.call_function(fn, (x, *pre_args), dict(pre_kwargs))
        target, args = lowered.op, (x, w, b, *lowered.args)
    # NB: the node itself becomes the call_function (keeps its name, users and meta).
    node.op, node.target = "call_function", target
    node.args, node.kwargs = args, {}
    return node
