r"""The FX pass behind ``fx_spectral.transform``: spectral normalization as a torch.fx graph rewrite.

.. math:: \text{op}(x, W) \ \to\ \text{op}(x, W / \sigma(W)) \quad
          \text{for every weight of a linear / conv / conv\_transpose op}

:func:`transform` traces a model with ``torch.fx.symbolic_trace`` (or takes a GraphModule as is,
e.g. ``ep.module()`` of an ExportedProgram) and returns a :class:`SpectralGraphModule`: one
graph for training (power iteration, u/v updated in place) and one for eval (no update), chosen
on ``self.training`` at each call. :func:`spectral_pass` is the single-graph, in-place pass for
pt2e-style pipelines. The u/v vectors are float32 buffers ``{name}_u`` / ``{name}_v`` on the
module owning the weight, so ``state_dict`` keys equal the eager API's.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Graph, GraphModule
from torch.fx.graph_module import _forward_from_src

from fx_spectral import nn as sn
from fx_spectral import power as P
from fx_spectral.graph.config import TransformConfig
from fx_spectral.graph.operator import (
    CONV_T_TYPES,
    CONV_TYPES,
    check_operator_uv,
    conv_module_input,
    insert_operator_normalization,
    transposed_output_padding,
)
from fx_spectral.graph.ops import MODULE_TYPES, WEIGHT_OPS
from fx_spectral.graph.rewrite import find_weight_uses, lower_module_call, lowering_blocker, rewrite_weight

__all__ = ["TransformConfig", "SpectralGraphModule", "transform", "spectral_pass"]

_BACKEND_HINT = 'torch.compile(model, backend="spectral")'


@dataclass(frozen=True)
class _Weight:
    """One normalized weight: its get_attr target, owner path, attribute, dim, eps; operator mode: the
    operator's spec (:func:`fx_spectral.nn.conv_operator_spec`) and one input / output example's shape."""

    target: str
    owner: str
    attr: str
    dim: int
    eps: float
    spec: tuple | None = None
    in_shape: tuple | None = None
    out_shape: tuple | None = None


# --------------------------------------------------------------------------------------------
# The module: a training graph and an eval graph
# --------------------------------------------------------------------------------------------


class SpectralGraphModule(GraphModule):
    """A GraphModule with a training graph and an eval graph; ``forward`` runs the one matching
    ``self.training``, and ``graph`` / ``code`` are those of the current mode (so tools that run
    ``gm.graph`` directly, like ``torch.export`` and ``torch.fx.Interpreter``, see the right one).

    ``train_graph`` / ``eval_graph`` (and ``train_code`` / ``eval_code``) name each explicitly; edit
    either in place and call ``recompile()``. Both are generated from the plain graph (the model
    with its module leaves lowered to functional ops) and regenerated when ``.to()`` changes a
    weight's dtype (the casts depend on it; u/v stay float32). ``spectral_weights`` lists the
    normalized weights as ``(target, dim)``. ``copy.deepcopy`` and pickling
    (``torch.save(gm)``) keep both modes; ``filter_fn`` is not pickled.
    """

    def __init__(self, root: nn.Module, plain_graph: Graph, weights: tuple[_Weight, ...], config: TransformConfig):
        # NB: set before GraphModule.__init__, whose graph assignment calls recompile().
        self.__dict__["_sn_plain_graph"] = plain_graph
        self.__dict__["_sn_weights"] = tuple(weights)
        self.__dict__["_sn_config"] = config
        train_graph, eval_graph = self._generate(root)
        self.__dict__["_eval_graph"] = eval_graph
        super().__init__(root, train_graph, "SpectralGraphModule")
        eval_graph.owning_module = self
        self.__dict__["_sn_signature"] = self._weight_signature(self)

    def _weight_signature(self, root: nn.Module) -> tuple[tuple[torch.dtype, str], ...]:
        # What the emitted nodes depend on: each weight's dtype (casts) and device type (autocast guard).
        return tuple((t.dtype, t.device.type) for t in (_resolve(root, w.target) for w in self._sn_weights))

    def _generate(self, root: nn.Module) -> tuple[Graph, Graph]:
        train_graph, eval_graph = copy.deepcopy(self._sn_plain_graph), copy.deepcopy(self._sn_plain_graph)
        _rewrite(root, train_graph, self._sn_weights, self._sn_config, training=True)
        _rewrite(root, eval_graph, self._sn_weights, self._sn_config, training=False)
        return train_graph, eval_graph

    def _regenerate_if_needed(self) -> None:
        signature = self._weight_signature(self)
        if signature == self._sn_signature:
            return
        train_graph, eval_graph = self._generate(self)
        self._graph = train_graph
        self.__dict__["_eval_graph"] = eval_graph
        train_graph.owning_module = eval_graph.owning_module = self
        self.__dict__["_sn_signature"] = signature
        self.recompile()

    @property
    def graph(self) -> Graph:
        return self._graph if self.training else self._eval_graph

    @graph.setter
    def graph(self, g: Graph) -> None:
        # GraphModule.__init__ assigns the training graph here, after copying root.training (False for
        # a model in eval mode): the first assignment is always the training graph.
        if "_graph" not in self.__dict__ or self.__dict__.get("training", True):
            self._graph = g
        else:
            self.__dict__["_eval_graph"] = g
        g.owning_module = self
        self.recompile()

    @property
    def code(self) -> str:
        return self._code if self.training else self._eval_code

    @property
    def train_graph(self) -> Graph:
        return self._graph

    @property
    def eval_graph(self) -> Graph:
        return self._eval_graph

    @property
    def train_code(self) -> str:
        return self._code

    @property
    def eval_code(self) -> str:
        return self._eval_code

    @property
    def spectral_weights(self) -> list[tuple[str, int]]:
        return [(w.target, w.dim) for w in self._sn_weights]

    def _apply(self, fn, recurse=True):
        # u/v stay float32 under .to(dtype) / .half() / .double(): moved by device only, never
        # through fn's dtype (as the eager API does). NB: mutates the owners' _buffers, order kept.
        owners = {id(o): o for o in (self.get_submodule(w.owner) for w in self._sn_weights)}
        keys = {w.attr + s for w in self._sn_weights for s in ("_u", "_v")}
        saved = {}
        for oid, owner in owners.items():
            order = list(owner._buffers)
            uv = {k: owner._buffers.pop(k) for k in order if k in keys}
            saved[oid] = (order, uv)
        try:
            super()._apply(fn, recurse)
        finally:
            for oid, owner in owners.items():
                order, uv = saved[oid]
                uv = {k: b.to(fn(b).device) for k, b in uv.items()}
                rest = owner._buffers
                owner._buffers = {k: uv[k] if k in uv else rest[k] for k in order if k in uv or k in rest}
                owner._buffers.update({k: b for k, b in rest.items() if k not in owner._buffers})
        self._regenerate_if_needed()
        return self

    def recompile(self):
        python_code = super().recompile()
        cls = type(self)
        train_forward = cls.forward
        eval_code = self._eval_graph.python_code(root_module="self")
        self.__dict__["_eval_code"] = eval_code.src
        eval_forward = _forward_from_src(eval_code.src, eval_code.globals, getattr(self._eval_graph, "_co_fields", {}))

        @functools.wraps(train_forward)  # keeps the signature (torch.export binds inputs by it)
        def forward(self, *args, **kwargs):
            # Train/eval dispatch at run time: the eval graph never updates u/v.
            return (train_forward if self.training else eval_forward)(self, *args, **kwargs)

        cls.forward = forward
        return python_code

    def _holder(self) -> nn.Module:
        # A plain module with this module's tree (real owners, u/v) and the attributes the graphs read.
        holder = nn.Module()
        holder._modules = dict(self._modules)
        holder._parameters = dict(self._parameters)
        holder._buffers = dict(self._buffers)
        graphs = (self._graph, self._eval_graph)
        for name in {n.target.split(".")[0] for g in graphs for n in g.nodes if n.op == "get_attr"}:
            if not hasattr(holder, name):
                setattr(holder, name, getattr(self, name))
        return holder

    def __reduce__(self):
        # Graphs do not pickle (builtin targets); GraphModule pickles as code and re-traces it, which
        # is safe for the plain graph (no buffer-only ops to constant-fold). filter_fn is not kept
        # (it only mattered when the weights were chosen).
        holder = self._holder()
        plain = GraphModule(holder, copy.deepcopy(self._sn_plain_graph))
        config = dataclasses.replace(self._sn_config, filter_fn=None)
        return (_unpickle, (holder, plain, self._sn_weights, config, self.training))

    def __deepcopy__(self, memo):
        parts = (self._holder(), self._sn_plain_graph, self._sn_weights, self._sn_config, self.training)
        res = _rebuild(*copy.deepcopy(parts, memo))
        memo[id(self)] = res
        return res


def _rebuild(root: nn.Module, plain_graph: Graph, weights, config, training: bool) -> SpectralGraphModule:
    gm = SpectralGraphModule(root, plain_graph, weights, config)
    _install_owners(gm, root, weights)
    gm.training = training
    return gm


def _unpickle(holder: nn.Module, plain: GraphModule, weights, config, training: bool) -> SpectralGraphModule:
    for node in plain.graph.nodes:  # constants the re-trace created live on `plain`
        if node.op == "get_attr" and "." not in node.target and not hasattr(holder, node.target):
            setattr(holder, node.target, getattr(plain, node.target))
    return _rebuild(holder, plain.graph, weights, config, training)


def _resolve(root: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), root)


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


def _is_eager_normalized(module: nn.Module) -> bool:
    return bool(module.__dict__.get("_sn_params"))


class _Tracer(torch.fx.Tracer):
    # Modules normalized by the eager API are leaves: their forward already normalizes (and its
    # Python control flow on the weight's dtype does not trace).
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_eager_normalized(m) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, concrete_args) -> Graph:
    try:
        graph = _Tracer().trace(model, concrete_args)
    except Exception as err:  # symbolic tracing fails with many exception types
        raise TypeError(
            f"transform: torch.fx.symbolic_trace cannot trace {type(model).__name__} "
            f"({type(err).__name__}: {err}). Models with data-dependent control flow (HF transformers, "
            f"for one) do not symbolic_trace: use {_BACKEND_HINT}, which rewrites the graphs dynamo "
            "captures, or fix the arguments that steer control flow with `concrete_args`."
        ) from err
    return graph


def _lower_leaves(gm: nn.Module, graph: Graph, cfg: TransformConfig) -> list[nn.Module]:
    """Turn the module leaves into functional ops on get_attr weights; returns those left to the eager API."""
    # NB: edits graph in place (the modules are not touched here).
    deferred = []
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, MODULE_TYPES) or _is_eager_normalized(module):
            continue
        if cfg.name is not None and "weight" not in cfg.name:
            continue
        if cfg.filter_fn is not None and not cfg.filter_fn(module, node.target):
            continue
        reason = lowering_blocker(module, node)
        if reason is None:
            lower_module_call(gm, node, graph)
        elif torch.nn.utils.parametrize.is_parametrized(module):
            warnings.warn(f"transform: {node.target!r} is left unchanged: {reason}", stacklevel=3)
        else:
            # Lazy modules (shapes unknown until their first forward), ConvTranspose called with
            # output_size: the eager API normalizes them inside their forward, with the same state.
            deferred.append(module)
    return deferred


def _merge_get_attrs(graph: Graph) -> None:
    """One get_attr node per target, so a weight read twice (tied, or traced + lowered) is normalized once."""
    # NB: edits graph in place. The first node of a target precedes every user of the later ones.
    first: dict[str, object] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        if node.target in first:
            node.replace_all_uses_with(first[node.target])
            graph.erase_node(node)
        else:
            first[node.target] = node


def _plan(root: nn.Module, graph: Graph, cfg: TransformConfig, shapes: dict | None = None) -> tuple[_Weight, ...]:
    """The get_attr weights of ``graph`` to normalize, validated (nothing is mutated).

    ``shapes``: operator mode, node name -> its output's shape (from ``example_inputs``), or None.
    """
    plan: list[_Weight] = []
    for w, uses in find_weight_uses(graph).items():
        if w.op != "get_attr":
            continue
        owner_path, _, attr = w.target.rpartition(".")
        owner = root.get_submodule(owner_path)
        where = w.target
        if cfg.name is not None and attr not in cfg.name:
            continue
        if sn.is_spectral_normalized(owner, attr):
            continue  # the eager API already normalizes it
        if cfg.filter_fn is not None and not cfg.filter_fn(owner, owner_path):
            continue
        dims = {d for _, d in uses}
        if len(dims) != 1:
            raise ValueError(f"transform: weight {where!r} is used with different output dims {sorted(dims)}")
        (dim,) = dims
        weight = getattr(owner, attr)
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.dim() < 2:
            raise ValueError(
                f"transform: weight {where!r} must be a floating-point tensor with >= 2 dims, got {type(weight)}"
            )
        if cfg.mode == "operator" and any(WEIGHT_OPS[op.target].kind != "linear" for op, _ in uses):
            plan.append(_operator_weight(root, owner, owner_path, attr, w, uses, shapes, cfg))
            continue
        _check_existing_uv(owner, attr, weight, dim, where)
        plan.append(_Weight(w.target, owner_path, attr, dim, cfg.eps))
    return tuple(plan)


def _operator_weight(root, owner, owner_path, attr, w, uses, shapes, cfg) -> _Weight:
    """The plan entry of a conv weight in operator mode: its operator and its input / output example shapes."""
    where = w.target
    if not isinstance(owner, CONV_TYPES + CONV_T_TYPES) or attr != "weight":
        raise ValueError(
            f"transform: mode='operator': {where!r} feeds a convolution but is not the weight of a Conv / "
            f"ConvTranspose module (owner {type(owner).__name__}); its operator is unknown. Exclude it with "
            "filter_fn, or use mode='matrix'"
        )
    if len(uses) != 1:
        raise ValueError(
            f"transform: mode='operator': {where!r} is used by {len(uses)} convolutions; operator-mode u/v "
            "describe one input shape, so each conv weight must be used once"
        )
    op = uses[0][0]
    x = conv_module_input(op, owner)
    in_shape = out_shape = None
    if shapes is not None and isinstance(x, torch.fx.Node) and x.name in shapes and op.name in shapes:
        in_shape, out_shape = tuple(shapes[x.name][1:]), tuple(shapes[op.name][1:])
    have = check_operator_uv(owner, attr, in_shape, out_shape, where, "transform")
    if have is not None:
        in_shape, out_shape = have
    if in_shape is None:
        raise ValueError(
            f"transform: mode='operator' needs the input shape of {owner_path!r} ({type(owner).__name__}): "
            "pass example_inputs=(x, ...) (one batch of real inputs; the model is run on fake tensors, "
            "nothing is updated), or load operator-mode u/v buffers onto the model first"
        )
    output_padding = None
    if isinstance(owner, CONV_T_TYPES):
        output_padding = transposed_output_padding(owner, in_shape, out_shape)
    spec = sn.conv_operator_spec(owner, output_padding)
    return _Weight(w.target, owner_path, attr, 1 if isinstance(owner, CONV_T_TYPES) else 0, cfg.eps, spec,
                   in_shape, out_shape)


def _example_shapes(model: nn.Module, graph: Graph, example_inputs) -> dict[str, tuple[int, ...]]:
    """node name -> shape of its (tensor) output, from running ``graph`` on fake copies of ``example_inputs``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"transform: expected example_inputs to be a tuple of inputs, got {type(example_inputs)}")
    gm = GraphModule(model, copy.deepcopy(graph))
    try:
        ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    except Exception as err:
        raise ValueError(f"transform: running the traced model on example_inputs failed ({err})") from err
    return {
        n.name: tuple(n.meta["tensor_meta"].shape)
        for n in gm.graph.nodes
        if hasattr(n.meta.get("tensor_meta"), "shape")
    }


def _check_existing_uv(owner: nn.Module, attr: str, weight: torch.Tensor, dim: int, where: str) -> None:
    # The u/v rule every way in shares (power.check_uv): none yet, or float32-able vectors of the
    # matrix view's lengths (another float dtype is cast back at _commit); anything else raises here,
    # while nothing has been changed yet.
    P.check_uv(owner, attr, weight, dim, f"transform: {where}")


def _commit(root: nn.Module, plan: tuple[_Weight, ...], deferred: list[nn.Module], cfg: TransformConfig) -> None:
    """Create the u/v buffers (reusing existing ones) and hand the deferred leaves to the eager API."""
    # NB: mutates the model's modules: float32 buffers {attr}_u / {attr}_v on each owner.
    for w in plan:
        owner = root.get_submodule(w.owner)
        if w.spec is None:
            # reuse (the same model transformed twice, or a loaded checkpoint), cast back to float32
            # (after model.double() / .half()), or create: power.ensure_uv, checked in _plan already.
            P.ensure_uv(owner, w.attr, getattr(owner, w.attr), w.dim, w.eps, f"transform: {w.target}")
            continue
        if w.attr + "_u" in owner._buffers:
            continue  # reuse: the same model transformed twice, or a loaded checkpoint
        u, v = sn.operator_init_uv(getattr(owner, w.attr), w.spec, w.in_shape, w.eps)
        owner.register_buffer(w.attr + "_u", u)
        owner.register_buffer(w.attr + "_v", v)
    for module in deferred:
        sn.spectral_norm(module, "weight", n_power_iterations=cfg.n_power_iterations, eps=cfg.eps, mode=cfg.mode)


def _rewrite(root: nn.Module, graph: Graph, plan: tuple[_Weight, ...], cfg: TransformConfig, training: bool) -> None:
    # NB: edits graph in place.
    targets = {w.target: w for w in plan}
    for w, uses in find_weight_uses(graph).items():
        if w.op != "get_attr" or w.target not in targets:
            continue
        info = targets[w.target]
        weight = _resolve(root, w.target)
        if info.spec is not None:
            _rewrite_operator(root, graph, w, uses, info, cfg, training)
            continue
        with graph.inserting_before(w.next):
            u = graph.get_attr(f"{w.target}_u")
            v = graph.get_attr(f"{w.target}_v")
        # one sigma for all uses; each op divides its output or the weight (rewrite.divides_output:
        # the output when the graph records the shapes and it is the smaller tensor)
        rewrite_weight(
            graph, w, [op for op, _ in uses], u, v, dim=info.dim, n_power_iterations=cfg.n_power_iterations,
            eps=cfg.eps, training=training, weight_dtype=weight.dtype, weight_ndim=weight.dim(),
            autocast_off=_autocast_guard(weight.device.type),
        )
    graph.lint()


def _rewrite_operator(root, graph: Graph, w, uses, info: _Weight, cfg: TransformConfig, training: bool) -> None:
    # NB: edits graph in place: one operator_weight node before the conv, fed to it.
    op = uses[0][0]
    x = conv_module_input(op, root.get_submodule(info.owner))
    with graph.inserting_before(op):
        u = graph.get_attr(f"{w.target}_u")
        v = graph.get_attr(f"{w.target}_v")
    new = insert_operator_normalization(
        graph, w, u, v, x if isinstance(x, torch.fx.Node) else None, op, spec=info.spec,
        where=info.owner or info.target, n_power_iterations=cfg.n_power_iterations, eps=cfg.eps, training=training,
    )
    op.replace_input_with(w, new)


def _autocast_guard(device_type: str) -> str | None:
    # CPU autocast leaves mv/dot alone; elsewhere (CUDA) the estimate runs with autocast off.
    if device_type == "cpu" or not torch.amp.is_autocast_available(device_type):
        return None
    return device_type


def spectral_pass(
    gm: GraphModule,
    *,
    training: bool = True,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    name: str | tuple[str, ...] | None = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
) -> GraphModule:
    """Rewrite ``gm`` in place (one graph, training or eval) and return it: the pt2e-style pass.

    Works on ``symbolic_trace`` output and on ``ep.module()`` of an ExportedProgram, whose weights
    are ``get_attr`` nodes feeding ATen ops (the emitted nodes are then ATen ops too). u/v buffers
    are created on the owning submodules of ``gm``. For a module that switches between training
    and eval, use :func:`transform`.

    Example::

        >>> ep = torch.export.export(model, (x,))
        >>> gm = spectral_pass(ep.module())  # training graph: updates gm's u/v buffers
        >>> ep2 = torch.export.export(gm, (x,))  # re-export with the normalization inside
    """
    cfg = TransformConfig(filter_fn=filter_fn, name=name, n_power_iterations=n_power_iterations, eps=eps)
    deferred = _lower_leaves(gm, gm.graph, cfg)
    _merge_get_attrs(gm.graph)
    plan = _plan(gm, gm.graph, cfg)
    _commit(gm, plan, deferred, cfg)
    _rewrite(gm, gm.graph, plan, cfg, training)
    gm.recompile()
    return gm


def transform(
    model: nn.Module,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    name: str | tuple[str, ...] | None = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    concrete_args: dict | None = None,
    mode: str = "matrix",
    example_inputs: tuple | None = None,
) -> SpectralGraphModule:
    r"""Trace ``model`` and spectral-normalize every weight feeding a linear / conv / conv_transpose op.

    .. math:: \bar W = W / \sigma(W), \quad \sigma \text{ by power iteration on float32 } u, v

    Each weight becomes one normalizing subgraph (see :func:`fx_spectral.graph.insert_normalization`)
    whose result feeds every op using it. The returned module runs a training graph (u/v updated in
    place, ``n_power_iterations`` per call) or an eval graph (no update) according to
    ``self.training``. Numbers equal the eager API (:func:`fx_spectral.spectral_norm`) and torch's
    ``spectral_norm`` given the same u/v.

    What is normalized: ``call_module`` leaves of the fourteen Linear / Conv / ConvTranspose types
    (lowered to the functional op on ``get_attr`` weights), and functional ops (``F.linear``,
    ``torch.conv*d``, ``torch.conv_transpose*d``, their ATen forms) on ``get_attr`` weights. Modules
    the eager API already normalizes are left alone (not normalized twice). Lazy modules that have
    not run yet, and ConvTranspose called with ``output_size``, are handed to the eager API, which
    normalizes them inside their forward with the same state layout. Modules parametrized by
    ``torch.nn.utils.parametrize`` are left unchanged with a warning.

    NB: the returned module shares its submodules and parameters with ``model`` (an optimizer built
    on ``model.parameters()`` keeps working); the u/v buffers are registered on those submodules,
    so ``model.state_dict()`` gains the same ``{name}_u`` / ``{name}_v`` keys as the eager API.

    Args:
        model: an ``nn.Module`` (traced with ``torch.fx``) or a ``GraphModule`` (taken as is, e.g.
            ``ep.module()`` of an ExportedProgram; not modified).
        filter_fn: ``filter_fn(module, fqn) -> bool`` on the module owning each weight.
        name: the weight attribute name(s) to normalize; None for every weight feeding an op.
        n_power_iterations: power-iteration steps per training call. Default 1.
        eps: guard for the vector norms and for sigma. Default 1e-12.
        concrete_args: passed to ``torch.fx.Tracer.trace`` to fix arguments that steer control flow.
        mode: ``"matrix"`` (default) or ``"operator"``: every Conv / ConvTranspose weight is divided
            by the norm of its convolution operator :math:`\sigma_{op} = \langle u, A(W) v\rangle`
            (one ``operator_weight`` node per weight, the eager operator mode's function), with u/v
            shaped like one input / output example (``weight_u`` ``(C_out, *spatial_out)``,
            ``weight_v`` ``(C_in, *spatial_in)``, as ``spectral_norm(..., mode="operator")``); Linear
            weights as in matrix mode. The shapes come from ``example_inputs`` (or from operator-mode
            u/v already on the model). A call with another input shape raises ValueError.
        example_inputs: operator mode: a tuple of example inputs of the shape the model will see;
            the traced graph runs once on fake copies of them (nothing is computed or updated).

    Returns:
        a :class:`SpectralGraphModule`.

    Raises:
        TypeError: the model does not symbolic_trace (use ``torch.compile(model, backend="spectral")``).

    Example::

        >>> gm = transform(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> sorted(k for k in gm.state_dict() if k.endswith(("_u", "_v")))
        ['0.weight_u', '0.weight_v', '2.weight_u', '2.weight_v']
    """
    cfg = TransformConfig(filter_fn=filter_fn, name=name, n_power_iterations=n_power_iterations, eps=eps, mode=mode)
    if example_inputs is not None and mode != "operator":
        raise ValueError(f"transform: example_inputs is only used with mode='operator', got mode={mode!r}")
    if isinstance(model, SpectralGraphModule):
        raise ValueError("transform: the model is already a SpectralGraphModule (transformed once)")
    if isinstance(model, GraphModule):
        if concrete_args is not None:
            raise ValueError("transform: concrete_args only applies to models that are traced, not to a GraphModule")
        graph = copy.deepcopy(model.graph)
    elif isinstance(model, nn.Module):
        graph = _trace(model, concrete_args)
    else:
        raise TypeError(f"transform: expected an nn.Module or a GraphModule, got {type(model).__name__}")
    graph.owning_module = model
    deferred = _lower_leaves(model, graph, cfg)
    _merge_get_attrs(graph)
    shapes = _example_shapes(model, graph, example_inputs) if example_inputs is not None else None
    plan = _plan(model, graph, cfg, shapes)
    _commit(model, plan, deferred, cfg)
    out = SpectralGraphModule(model, graph, plan, cfg)
    _install_owners(out, model, plan)
    out.meta.update(getattr(model, "meta", {}))
    out.train(model.training)
    return out


def _install_owners(out: GraphModule, root: nn.Module, plan: tuple[_Weight, ...]) -> None:
    # GraphModule copies get_attr targets onto fresh empty parents; put the real owning modules
    # back so u/v stay buffers of the module that owns the weight (and follow its .to()).
    # NB: mutates out's module tree.
    for path in sorted({w.owner for w in plan if w.owner}, key=lambda p: p.count(".")):
        parent_path, _, child = path.rpartition(".")
        setattr(out.get_submodule(parent_path), child, root.get_submodule(path))


# Old names (one release): they warn and give the same class (TorchTitan's SpectralConfig is another class).
from fx_spectral.deprecation import renamed  # noqa: E402

__getattr__ = renamed(__name__, {"SpectralConfig": "TransformConfig"}, globals())
