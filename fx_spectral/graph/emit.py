r"""The emitter: insert the nodes that turn a weight node into ``W / sigma`` (or give sigma alone).

Shared by :func:`fx_spectral.transform` (weights as ``get_attr``) and the torch.compile backend
(weights as placeholders). The emitted nodes are plain torch ops that follow
:func:`fx_spectral.nn.normalize_weight` step by step, so the numbers equal the eager API and
torch's ``spectral_norm`` given the same u/v:

.. math::
    W_{mat} = \mathrm{flatten}_1(\mathrm{movedim}(W_{32}, dim, 0)), \quad
    u' = \frac{W_{mat} v}{\lVert W_{mat} v \rVert}, \quad
    v' = \frac{W_{mat}^\top u'}{\lVert W_{mat}^\top u' \rVert}, \quad
    \sigma = \max(u'^\top W_{mat} v', \epsilon), \quad \bar W = W / \sigma

(each normalization keeps the old vector where the norm is ``<= eps``: a zero weight gives a zero
``\bar W``, never NaN). In training ``u'^T W_mat v' = ||W_mat^T u'||``, the last norm of the power
iteration: torch-level graphs take that value (the eager API's) and its gradient ``u' v'^T``
from :func:`sigma_of`, without a third matrix-vector product; ATen graphs emit ``dot(u', mv(W, v'))``.
The power iteration runs on ``W_mat.detach()`` (the graph form of ``torch.no_grad``), so the
gradient flows through ``W`` in ``sigma`` only.

Dividing an op's output instead of the weight: :mod:`fx_spectral.graph.output_scaling`.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor, nn
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast
from torch.fx import Graph, Node

from fx_spectral import power as P
from fx_spectral.kinds import is_aten_op
from fx_spectral.matrices import add_outer, outer_in_layout

__all__ = [
    "NORMALIZED_META", "Emitter", "insert_normalization", "insert_sigma", "insert_nodes", "autocast_guard",
    "resolve_attr", "sigma_of", "weight_and_sigma",
]

aten = torch.ops.aten

#: ``node.meta`` key on the node of ``W / sigma``: the name of the raw weight node.
NORMALIZED_META = "fx_spectral_normalized"


# --------------------------------------------------------------------------------------------
# What is known about a weight node
# --------------------------------------------------------------------------------------------


def resolve_attr(graph: Graph, target: str) -> object:
    root = graph.owning_module
    if root is None:
        return None
    try:
        return functools.reduce(getattr, target.split("."), root)
    except AttributeError:
        return None


def _weight_info(node: Node) -> tuple[torch.dtype | None, int | None]:
    """(dtype, ndim) of a weight node from its meta (dynamo, export) or its get_attr target; None if unknown."""
    for key in ("val", "example_value"):
        val = node.meta.get(key)
        if isinstance(val, torch.Tensor):
            return val.dtype, val.dim()
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "dtype"):
        return tm.dtype, len(tm.shape)
    if node.op == "get_attr":
        val = resolve_attr(node.graph, node.target)
        if isinstance(val, torch.Tensor):
            if isinstance(val, nn.parameter.UninitializedTensorMixin):
                return val.dtype, None
            return val.dtype, val.dim()
    return None, None


# --------------------------------------------------------------------------------------------
# Node emission, torch-level or ATen
# --------------------------------------------------------------------------------------------


class Emitter:
    """Creates named nodes at the current insert point, as torch-level ops or as ATen overloads."""

    def __init__(self, graph: Graph, prefix: str, use_aten: bool):
        self.graph, self.prefix, self.aten = graph, prefix, use_aten

    def _fn(self, target, args, suffix, kwargs=None) -> Node:
        return self.graph.create_node("call_function", target, args, kwargs or {}, name=f"{self.prefix}_{suffix}")

    def _method(self, method, aten_op, args, suffix) -> Node:
        if self.aten:
            return self._fn(aten_op, args, suffix)
        return self.graph.create_node("call_method", method, args, {}, name=f"{self.prefix}_{suffix}")

    def to_float(self, w, suffix):
        if self.aten:
            return self._fn(aten.to.dtype, (w, torch.float32), suffix)
        return self._method("float", None, (w,), suffix)

    def to_dtype(self, x, dtype, suffix):
        return self._method("to", aten.to.dtype, (x, dtype), suffix)

    def type_as(self, x, other, suffix):
        return self._method("type_as", aten.type_as.default, (x, other), suffix)

    def movedim(self, w, dim, suffix):
        return self._method("movedim", aten.movedim.int, (w, dim, 0), suffix)

    def flatten(self, w, suffix):
        return self._method("flatten", aten.flatten.using_ints, (w, 1), suffix)

    def detach(self, w, suffix):
        return self._method("detach", aten.detach.default, (w,), suffix)

    def t(self, w, suffix):
        return self._method("t", aten.t.default, (w,), suffix)

    def clone(self, w, suffix):
        return self._method("clone", aten.clone.default, (w,), suffix)

    def eq(self, x, c, suffix):
        return self._fn(aten.eq.Scalar if self.aten else operator.eq, (x, c), suffix)

    def masked_fill(self, x, mask, value, suffix):
        return self._method("masked_fill", aten.masked_fill.Scalar, (x, mask, value), suffix)

    def clamp_min(self, x, eps, suffix):
        return self._method("clamp_min", aten.clamp_min.default, (x, eps), suffix)

    def mv(self, m, x, suffix):
        return self._fn(aten.mv.default if self.aten else torch.mv, (m, x), suffix)

    def dot(self, a, b, suffix):
        return self._fn(aten.dot.default if self.aten else torch.dot, (a, b), suffix)

    def norm(self, x, suffix):
        return self._fn(aten.linalg_vector_norm.default if self.aten else torch.linalg.vector_norm, (x,), suffix)

    def gt(self, x, c, suffix):
        return self._fn(aten.gt.Scalar if self.aten else operator.gt, (x, c), suffix)

    def div(self, a, b, suffix):
        return self._fn(aten.div.Tensor if self.aten else operator.truediv, (a, b), suffix)

    def add(self, a, b, suffix):
        return self._fn(aten.add.Tensor if self.aten else operator.add, (a, b), suffix)

    def view(self, x, shape, suffix):
        if self.aten:
            return self._fn(aten.view.default, (x, list(shape)), suffix)
        return self.graph.create_node("call_method", "view", (x, *shape), {}, name=f"{self.prefix}_{suffix}")

    def where(self, c, a, b, suffix):
        return self._fn(aten.where.self if self.aten else torch.where, (c, a, b), suffix)

    def copy_(self, dst, src, suffix):
        # NB: an ATen overload at both levels: aten.copy_ is impure for eliminate_dead_code, while a
        # call_method "copy_" would be removed as dead code (its result is unused).
        return self._fn(aten.copy_.default, (dst, src), suffix)

    def normalize_or_keep(self, t: Node, old: Node, eps: float, name: str) -> tuple[Node, Node]:
        # power.normalize_or_keep's plain rule: (where(||t|| > eps, t / max(||t||, eps), old), ||t||): a
        # zero weight keeps u/v, and the untaken branch holds no NaN/inf (t / 0) either.
        norm = self.norm(t, f"{name}_norm")
        ok = self.gt(norm, eps, f"{name}_nonzero")
        unit = self.div(t, self.clamp_min(norm, eps, f"{name}_safe"), f"{name}_unit")
        return self.where(ok, unit, old, name), norm


class _WeightAndSigma(torch.autograd.Function):
    r"""``(W, max(norm, eps))`` with the gradient of ``u^T W_mat v`` (``u``, ``v`` constants) added to W's.

    Forward returns a view of ``W`` (the op reads it) and sigma. Backward gets the op's gradient
    :math:`G_W` and :math:`g_\sigma` and returns :math:`G_W + g_\sigma u v^\top` (the outer
    product in the matrix view of ``W``: ``dim`` first, the rest flattened). ``W`` then has one
    use in the autograd graph, so its gradient is this one sum, a subtraction after the op's GEMM
    (:func:`fx_spectral.matrices.add_outer`: no W-sized ``addmm`` input for inductor to copy).
    """

    @staticmethod
    def forward(w: Tensor, u: Tensor, v: Tensor, norm: Tensor, eps: float, dim: int):
        return w.view_as(w), norm.clamp_min(eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, u, v, _, _, dim = inputs
        ctx.save_for_backward(u, v)
        ctx.shape, ctx.dim = w.shape, dim

    @staticmethod
    def backward(ctx, grad_w: Tensor | None, grad_sigma: Tensor | None):
        if grad_sigma is None:
            return grad_w, None, None, None, None, None
        u, v = ctx.saved_tensors
        if grad_w is None:  # the view unused (an op read the raw weight): the sigma term alone
            return outer_in_layout(u * grad_sigma, v, ctx.shape, ctx.dim), None, None, None, None, None
        # grad_w is the op's, not ours to modify in place: a new tensor (a subtraction when traced)
        return add_outer(grad_w, u * grad_sigma, v, ctx.dim, alpha=1.0, in_place=False), None, None, None, None, None


def weight_and_sigma(w: Tensor, u: Tensor, v: Tensor, norm: Tensor, eps: float, dim: int = 0) -> tuple[Tensor, Tensor]:
    r"""``(W, sigma)``: ``sigma = max(||W_mat^T u||, eps)`` from the power iteration's last norm, and W to use.

    After a power-iteration step :math:`v' = W_{mat}^\top u' / \lVert W_{mat}^\top u'\rVert`, so
    :math:`u'^\top W_{mat} v' = \lVert W_{mat}^\top u'\rVert`: the value needs no further pass
    over ``W`` (it is the value the eager API uses). Its gradient w.r.t. ``W`` with u'/v' held
    constant is :math:`u' v'^\top` in the matrix view ``W_mat`` (``dim`` moved first, the rest
    flattened). The returned ``W`` (a view) carries that term: an op that reads it instead of the
    raw weight gets ``W``'s whole gradient, op and sigma terms, in one pass (see
    :class:`_WeightAndSigma`); reading the raw weight is correct too (autograd adds the terms).

    Example::

        >>> w = torch.randn(4, 3, requires_grad=True)
        >>> u, v = torch.randn(4), torch.randn(3)
        >>> w_op, sigma = weight_and_sigma(w, u, v, torch.tensor(2.0), 1e-12)
        >>> (w_op.sum() + sigma).backward()
        >>> torch.allclose(w.grad, 1 + torch.outer(u, v))
        True
    """
    return _WeightAndSigma.apply(w, u, v, norm, eps, dim)


def sigma_of(w_mat: Tensor, u: Tensor, v: Tensor, norm: Tensor, eps: float) -> Tensor:
    r"""``sigma = max(||W^\top u||, eps)`` from the power iteration's last norm, differentiable in ``W``.

    The sigma of :func:`weight_and_sigma` for a matrix ``w_mat``: its gradient w.r.t. ``W`` with
    u'/v' held constant is :math:`u' v'^\top` (the rank-one term).

    Example::

        >>> w = torch.randn(4, 3, requires_grad=True)
        >>> u, v = torch.randn(4), torch.randn(3)
        >>> sigma_of(w, u, v, torch.tensor(2.0), 1e-12).backward()
        >>> torch.allclose(w.grad, torch.outer(u, v))
        True
    """
    return _WeightAndSigma.apply(w_mat, u, v, norm, eps, 0)[1]


def _insert_point(graph: Graph, nodes: list[Node], weight: Node) -> Node:
    """The node to insert before: right before the first user of ``weight`` that comes after all of ``nodes``.

    Close to the op, so that the power iteration reads ``W`` just before the op's GEMM reads it
    (a compiler fusing or scheduling in graph order keeps ``W`` in cache between the two); else
    right after the last of ``nodes`` (after all placeholders if one is).
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(nodes, key=order.__getitem__)
    if last.op == "placeholder":
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    later = [user for user in weight.users if order.get(user, -1) > order[last]]
    if later:
        return min(later, key=order.__getitem__)
    return last.next


def insert_normalization(
    graph: Graph,
    weight: Node,
    u: Node,
    v: Node,
    *,
    dim: int,
    n_power_iterations: int,
    eps: float,
    training: bool,
    use_aten: bool | None = None,
    weight_dtype: torch.dtype | None = None,
    weight_ndim: int | None = None,
    autocast_off: str | None = None,
) -> Node:
    r"""Insert the nodes computing ``weight / sigma`` and return the node of the normalized weight.

    The nodes go right after the last of ``weight``/``u``/``v`` (after the last placeholder if one
    of them is a placeholder), so any op that uses ``weight`` can take the returned node instead.
    Nothing else in the graph changes: redirect the ops yourself (``op.replace_input_with(weight,
    new)``) or use :func:`rewrite_weight`.

    Training (``training=True``): ``n_power_iterations`` steps of power iteration in float32 on
    ``W_mat.detach()``, then ``aten.copy_`` of the new u/v into ``u``/``v`` (NB: the buffers are
    updated in place each time the graph runs), then ``sigma = max(u'^T W_mat v', eps)`` with
    gradient through ``W`` only (torch-level: :func:`sigma_of` of the last norm; ATen: ``dot`` /
    ``mv``). Eval (``training=False``): no update; sigma from clones of u/v (so a backward
    through an eval graph survives a later training step), ``eps`` only where sigma is exactly 0
    (stale u/v may give a negative sigma; its sign is kept, as in the eager API).
    The weight is cast to float32 first and the result back to its dtype when it is fp16/bf16
    (the casts are visible nodes); float64 weights compute in float64 (u/v cast up). When the dtype
    is unknown (no meta, no resolvable ``get_attr``) ``.float()``/``.type_as(weight)`` are emitted,
    which are no-ops for float32 weights.

    Args:
        graph: the graph to edit (NB: mutated in place; call ``recompile()`` on its module after).
        weight: the node of the raw weight (``get_attr``, placeholder, or any tensor node).
        u, v: nodes of the float32 power-iteration vectors, of length ``W_mat.shape[0]`` and
            ``W_mat.shape[1]``; in training they must be mutable buffers / inputs.
        dim: the output dimension of the weight (0 for linear / conv, 1 for conv_transpose).
        n_power_iterations: power-iteration steps per run in training (>= 1).
        eps: guard for the vector norms and for sigma.
        training: emit the u/v update (True) or not (False).
        use_aten: emit ATen overloads (``aten.mv.default`` ...) instead of torch-level ops. Default:
            ATen if any user of ``weight`` is an ATen op (an exported graph), else torch-level.
        weight_dtype, weight_ndim: the weight's dtype and number of dims, when known to the caller;
            default: from ``weight.meta`` (``val`` / ``example_value`` / ``tensor_meta``) or the
            ``get_attr`` target in ``graph.owning_module``. They only choose which casts and views
            are emitted (a 2-D weight with ``dim=0`` needs no flatten, a float32 one no cast).
        autocast_off: a device type (``"cuda"``): wrap the emitted nodes in
            ``torch.amp.autocast_mode._enter_autocast(device, None, False, None)`` /
            ``_exit_autocast`` (the form dynamo uses for ``with torch.autocast(...)``), so autocast
            cannot downcast the power iteration (on CUDA ``mv`` is autocast to fp16). Default
            None: nothing emitted (on CPU ``mv``/``dot`` are not autocast).

    Returns:
        the node of ``W / sigma`` in the weight's dtype.

    Example::

        >>> gm = torch.fx.symbolic_trace(lambda x, w, u, v: F.linear(x, w))  # doctest: +SKIP
        >>> for w, uses in find_weight_uses(gm.graph).items():  # doctest: +SKIP
        ...     new = insert_normalization(gm.graph, w, u_node, v_node, dim=0, n_power_iterations=1,
        ...                                eps=1e-12, training=True)
    """
    return insert_nodes(
        graph, weight, u, v, "insert_normalization", True, dim=dim, n_power_iterations=n_power_iterations, eps=eps,
        training=training, use_aten=use_aten, weight_dtype=weight_dtype, weight_ndim=weight_ndim,
        autocast_off=autocast_off,
    )[1]


def insert_sigma(
    graph: Graph,
    weight: Node,
    u: Node,
    v: Node,
    *,
    dim: int,
    n_power_iterations: int,
    eps: float,
    training: bool,
    use_aten: bool | None = None,
    weight_dtype: torch.dtype | None = None,
    weight_ndim: int | None = None,
    autocast_off: str | None = None,
) -> Node:
    r"""Insert the nodes of :func:`insert_normalization` up to ``sigma`` and return the node of ``sigma``.

    The same power iteration, u/v update and ``sigma = max(u'^\top W_{mat} v', \epsilon)`` (gradient
    through ``W``), without the division: divide the op's output by it with :func:`scale_output`,
    or the weight yourself. ``sigma`` is a 0-d tensor in the compute dtype (float32, float64 for
    float64 weights). Arguments as :func:`insert_normalization`.

    Example::

        >>> sigma = insert_sigma(gm.graph, w, u_node, v_node, dim=0, n_power_iterations=1, eps=1e-12,
        ...                      training=True)  # doctest: +SKIP
        >>> scale_output(gm.graph, linear_node, sigma)  # doctest: +SKIP
    """
    return insert_nodes(
        graph, weight, u, v, "insert_sigma", False, dim=dim, n_power_iterations=n_power_iterations, eps=eps,
        training=training, use_aten=use_aten, weight_dtype=weight_dtype, weight_ndim=weight_ndim,
        autocast_off=autocast_off,
    )[0]


def insert_nodes(graph, weight, u, v, fn, divide, *, dim, n_power_iterations, eps, training, use_aten, weight_dtype,
                 weight_ndim, autocast_off) -> tuple[Node, Node | None]:
    """``(sigma, W / sigma or None)``: the nodes of :func:`insert_normalization`, the division if ``divide``.

    The one emitting path behind :func:`insert_normalization`, :func:`insert_sigma` and
    :func:`fx_spectral.graph.rewrite.rewrite_weight`; ``fn`` names the caller in error messages.
    """
    use_aten, dtype, ndim, compute = _prologue(
        graph, weight, dim, n_power_iterations, use_aten, weight_dtype, weight_ndim, fn
    )
    if dim < 0 and ndim is not None:
        dim %= ndim
    e = Emitter(graph, weight.name, use_aten)
    with graph.inserting_before(_insert_point(graph, [weight, u, v], weight)):
        with _autocast_region(e, autocast_off):
            w32, sigma = _emit_sigma(e, weight, u, v, dim, n_power_iterations, eps, training, dtype, ndim, compute)
            out = _emit_division(e, weight, w32, sigma, dtype, compute) if divide else None
    return sigma, out


def _prologue(graph, weight, dim, n_power_iterations, use_aten, weight_dtype, weight_ndim, fn):
    """Checks the arguments; returns ``(use_aten, dtype, ndim, compute dtype)``."""
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
        raise ValueError(f"{fn}: expected n_power_iterations to be an int >= 1, got {n_power_iterations!r}")
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{fn}: expected dim to be an int, got {dim!r}")
    if use_aten is None:
        use_aten = any(is_aten_op(user.target) for user in weight.users if user.op == "call_function")
    dtype, ndim = _weight_info(weight)
    dtype = dtype if weight_dtype is None else weight_dtype
    ndim = ndim if weight_ndim is None else weight_ndim
    compute = P.compute_dtype(dtype)  # float32 for fp16/bf16/fp32 (and unknown) weights, float64 for float64
    return use_aten, dtype, ndim, compute


def autocast_guard(device_type: str) -> str | None:
    """The ``autocast_off`` for a weight on ``device_type``: the device type, or None where no guard is needed.

    CPU autocast leaves ``mv`` / ``dot`` / ``vector_norm`` in float32, so CPU graphs carry no guard;
    on CUDA (and other autocast devices) ``mv`` would run in fp16 / bf16, so the estimate's nodes
    get an autocast-off region.

    Example::

        >>> autocast_guard("cpu") is None, autocast_guard("cuda")
        (True, 'cuda')
    """
    if device_type == "cpu" or not torch.amp.is_autocast_available(device_type):
        return None
    return device_type


class _autocast_region:
    """A ``with`` block emitting ``_enter_autocast(device, None, False, None)`` / ``_exit_autocast`` (or nothing)."""

    def __init__(self, e: Emitter, device: str | None):
        self.e, self.device = e, device

    def __enter__(self):
        if self.device is not None:
            # NB: enters a no-autocast region (left in __exit__): the estimate must not be downcast.
            self.ctx = self.e._fn(_enter_autocast, (self.device, None, False, None), "autocast_off")

    def __exit__(self, *exc):
        if self.device is not None and exc[0] is None:
            self.e._fn(_exit_autocast, (self.ctx,), "autocast_restore")
        return False


def _emit_sigma(e: Emitter, weight, u, v, dim, n_power_iterations, eps, training, dtype, ndim, compute):
    """Emit the power iteration and sigma at the current insert point; returns ``(W in compute dtype, sigma)``."""
    # W in the compute dtype, viewed as a matrix
    w32 = weight if dtype == compute else e.to_float(weight, "f32")
    mat = w32
    if dim != 0:
        mat = e.movedim(mat, dim, "moved")
    if ndim != 2:
        mat = e.flatten(mat, "mat")
    if compute == torch.float64:
        u_cur, v_cur = e.to_dtype(u, compute, "u_f64"), e.to_dtype(v, compute, "v_f64")
    else:
        u_cur, v_cur = u, v
    if training:
        # power iteration without gradient (nn._power_iteration), torch's order: u first, then v
        mat_ng = e.detach(mat, "nograd")
        mat_t = e.t(mat_ng, "nograd_t")
        for _ in range(n_power_iterations):
            u_cur, _ = e.normalize_or_keep(e.mv(mat_ng, v_cur, "Wv"), u_cur, eps, "u_new")
            v_cur, norm = e.normalize_or_keep(e.mv(mat_t, u_cur, "Wtu"), v_cur, eps, "v_new")
        # NB: in-place update of the u/v buffers; sigma below uses the fresh tensors, not the buffers
        e.copy_(u, u_cur, "u_update")
        e.copy_(v, v_cur, "v_update")
        if e.aten:
            # sigma = u^T W v (= ||W^T u||), gradient through W only; clamped so a zero weight gives zeros
            sigma = e.clamp_min(e.dot(u_cur, e.mv(mat, v_cur, "W_v"), "uWv"), eps, "sigma")
        else:
            # sigma = ||W^T u'|| (= u'^T W v', the eager API's value) is the last norm of the power
            # iteration: no third pass over W. Its gradient u' v'^T (rank one) is added to W's by
            # weight_and_sigma, whose W (a view) the op or the division reads in place of W.
            pair = e._fn(weight_and_sigma, (w32, u_cur, v_cur, norm, eps, dim), "and_sigma")
            w32 = e._fn(operator.getitem, (pair, 0), "for_op")
            sigma = e._fn(operator.getitem, (pair, 1), "sigma")
    else:
        # NB: clones, so a backward through this graph survives a later in-place u/v update
        if u_cur is u:
            u_cur, v_cur = e.clone(u, "u_const"), e.clone(v, "v_const")
        uwv = e.dot(u_cur, e.mv(mat, v_cur, "W_v"), "uWv")
        # stale u/v may give either sign; only an exact zero (a zero weight) needs the guard
        sigma = e.masked_fill(uwv, e.eq(uwv, 0, "uWv_zero"), eps, "sigma")
    return w32, sigma


def _emit_division(e: Emitter, weight, w32, sigma, dtype, compute) -> Node:
    """Emit ``W / sigma`` back in the weight's dtype, tagged with :data:`NORMALIZED_META`.

    ``w32`` is the weight in the compute dtype (``weight`` itself when that is its dtype), or the
    view of it from :func:`weight_and_sigma` that carries sigma's gradient.
    """
    if dtype == compute:
        out = e.div(w32, sigma, "normalized")
    elif dtype is not None:
        out = e.to_dtype(e.div(w32, sigma, "normalized_f32"), dtype, "normalized")
    else:
        out = e.type_as(e.div(w32, sigma, "normalized_f32"), weight, "normalized")
    # Tag the result with the raw weight's name (bake() folds the subgraph back into the weight).
    out.meta[NORMALIZED_META] = weight.name
    return out
