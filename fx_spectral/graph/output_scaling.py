r"""Output scaling: ``op(x, W) / sigma + b`` in place of ``op(x, W / sigma) + b``, and when to choose it.

``op(x, W/σ) + b`` and ``op(x, W)/σ + b`` are the same function (equal up to
rounding; autograd through ``z/σ`` with ``σ = uᵀ W v`` gives the same gradient, sigma term
included). Dividing the weight costs W-sized passes (``W/σ`` in forward; its gradient's reduction
and rescaling in backward), dividing the output costs output-sized ones (``z/σ + b``; ``⟨G, z⟩``
and ``G/σ`` in backward) plus one W-sized pass for the rank-one sigma term. :func:`rewrite_weight`
chooses per op from the shapes recorded in the graph (:func:`divides_output`: output in float32 /
float64, the weight's dtype, and ``5·numel(out) < 4·numel(W)``, the eager API's rule: an MLP at
small batch, the wide late layers of a conv net); where the shapes are unknown (a plain
``symbolic_trace``) or symbolic, the weight is divided, which equals the eager API bitwise.

The sigma node comes from :mod:`fx_spectral.graph.emit` (:func:`~fx_spectral.graph.emit.insert_sigma`);
:func:`fx_spectral.graph.rewrite.rewrite_weight` calls :func:`divides_output` per op and then
:func:`scale_output` or the op takes ``W / sigma``.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx import Graph, Node

from fx_spectral.graph.emit import Emitter, resolve_attr, weight_and_sigma
from fx_spectral.kinds import is_aten_op, weight_arg, weight_op

__all__ = ["SCALED_OUTPUT_META", "divides_output", "scale_output"]

#: ``node.meta`` key on the node of ``op(x, W) / sigma (+ b)``: the name of the raw weight node.
SCALED_OUTPUT_META = "fx_spectral_scaled_output"


def _meta_tensor(node: object) -> tuple[tuple, torch.dtype] | None:
    """``(shape, dtype)`` of a node's tensor value from its meta (dynamo, export, ShapeProp); None if unknown."""
    if not isinstance(node, Node):
        return None
    for key in ("val", "example_value"):
        val = node.meta.get(key)
        if isinstance(val, torch.Tensor):
            return tuple(val.shape), val.dtype
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "dtype") and hasattr(tm, "shape"):
        return tuple(tm.shape), tm.dtype
    if node.op == "get_attr":
        val = resolve_attr(node.graph, node.target)
        if isinstance(val, torch.Tensor) and not isinstance(val, nn.parameter.UninitializedTensorMixin):
            return tuple(val.shape), val.dtype
    return None


def _numel(shape: tuple) -> int | None:
    n = 1
    for d in shape:
        if not isinstance(d, int):  # a SymInt: sizes are dynamic, no static choice
            return None
        n *= d
    return n


def divides_output(op: Node, weight: Node) -> bool:
    r"""Whether :func:`rewrite_weight` divides the output of ``op`` by sigma rather than ``weight``.

    ``op(x, W)/\sigma + b`` instead of ``op(x, W/\sigma) + b`` (the same function; equal up to
    rounding) when it moves less memory: the output and the weight have static shapes recorded in
    the graph (``val`` / ``example_value`` / ``tensor_meta`` meta, or a resolvable ``get_attr``
    weight), the same dtype, float32 or float64 (so ``op(x, W)`` and sigma share the compute
    dtype: no casts, no autocast), and

    .. math:: 5 \cdot \mathrm{numel}(op(x, W)) < 4 \cdot \mathrm{numel}(W)

    the rule of the eager API (``fx_spectral.nn``): dividing the weight costs ~5 W-sized passes per
    training step (``W/\sigma``, the reduction and the rescaling of its gradient), dividing the
    output ~4 output-sized ones (``z/\sigma + b``, ``\langle G, z\rangle``, ``G/\sigma``) plus the
    W-sized rank-one sigma term. False when anything is unknown: the weight is then divided.

    Example::

        >>> # F.linear on x (8, 512) with W (512, 512): 5·4096 < 4·262144
        >>> divides_output(linear_node, weight_node)  # doctest: +SKIP
        True
    """
    if weight_op(op) is None or weight_arg(op) is not weight:
        return False
    out, w = _meta_tensor(op), _meta_tensor(weight)
    if out is None or w is None:
        return False
    (out_shape, out_dtype), (w_shape, w_dtype) = out, w
    out_numel, w_numel = _numel(out_shape), _numel(w_shape)
    if out_numel is None or w_numel is None:
        return False
    return out_dtype == w_dtype and w_dtype in (torch.float32, torch.float64) and 5 * out_numel < 4 * w_numel


def _weight_for_op(sigma: Node, weight: object) -> Node | None:
    """The ``weight_and_sigma(...)[0]`` node paired with ``sigma = weight_and_sigma(weight, ...)[1]``, if any."""
    if not (isinstance(sigma, Node) and sigma.target is operator.getitem and sigma.args[1] == 1):
        return None
    pair = sigma.args[0]
    if not (isinstance(pair, Node) and pair.target is weight_and_sigma and pair.args[0] is weight):
        return None
    return next((n for n in pair.users if n.target is operator.getitem and n.args[1] == 0), None)


def scale_output(graph: Graph, op: Node, sigma: Node, *, use_aten: bool | None = None) -> Node:
    r"""Rewrite ``y = op(x, W, b)`` into ``y = op(x, W) / sigma + b``; return the node of the new ``y``.

    ``op`` is a linear / conv / conv_transpose node (:data:`fx_spectral.graph.ops.WEIGHT_OPS`); its
    bias argument becomes None and the bias is added after the division (viewed as
    ``(C, 1, ..., 1)`` for a convolution). Every other user of ``op`` reads the new node. Autograd
    through ``op(x, W)/\sigma`` with ``sigma`` computed with gradient through ``W`` gives the
    gradient of ``op(x, W/\sigma)``, sigma term included. The output must be in sigma's dtype
    (check with :func:`divides_output`). NB: edits ``graph`` in place; the nodes are tagged
    :data:`SCALED_OUTPUT_META` with the weight's name.

    Example::

        >>> sigma = insert_sigma(graph, w, u, v, dim=0, n_power_iterations=1, eps=1e-12, training=True)
        >>> y = scale_output(graph, linear_node, sigma)  # doctest: +SKIP
    """
    spec = weight_op(op)
    if spec is None:
        raise ValueError(f"scale_output: {op.format_node()} is not a linear / conv / conv_transpose op")
    weight = weight_arg(op)
    if use_aten is None:
        use_aten = is_aten_op(op.target)
    bias = None
    if len(op.args) > 2:
        bias = op.args[2]
        op.args = (*op.args[:2], None, *op.args[3:])
    elif "bias" in op.kwargs:
        bias = op.kwargs["bias"]
        op.kwargs = {**op.kwargs, "bias": None}
    e = Emitter(graph, op.name, use_aten)
    users = list(op.users)
    name = weight.name if isinstance(weight, Node) else str(weight)
    alias = _weight_for_op(sigma, weight)
    if alias is not None:
        # the op reads weight_and_sigma's view of W: W's gradient is then one sum (op + sigma term)
        op.replace_input_with(weight, alias)
    with graph.inserting_before(op.next):  # the new nodes in order, right after op
        out = e.div(op, sigma, "over_sigma")
        out.meta[SCALED_OUTPUT_META] = name
        if isinstance(bias, Node):
            if spec.kind != "linear":
                info = _meta_tensor(weight)
                if info is None:
                    raise ValueError(f"scale_output: the number of dims of the weight of {op.name} is unknown")
                bias = e.view(bias, (-1, *[1] * (len(info[0]) - 2)), "bias_view")
            out = e.add(out, bias, "biased")
            out.meta[SCALED_OUTPUT_META] = name
    for user in users:
        user.replace_input_with(op, out)
    return out
