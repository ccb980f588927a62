r"""The module :func:`fx_spectral.transform` returns, and how its graphs are made from a plan.

:class:`SpectralGraphModule` holds the *plain* graph (module leaves lowered, nothing normalized)
and the plan (one :class:`PlannedWeight` per normalized weight); its training and eval graphs are
generated from those (:func:`rewrite_planned`: per weight, the nodes of
:func:`fx_spectral.graph.rewrite.rewrite_weight`, or the operator-mode node) and regenerated when a
weight's dtype or device changes. The tracing and planning that produce the plain graph and the
plan live in :mod:`fx_spectral.graph.tracing`.

Example::

    >>> gm = fx_spectral.transform(nn.Linear(4, 3))  # doctest: +SKIP
    >>> isinstance(gm, SpectralGraphModule), gm.spectral_weights  # doctest: +SKIP
    (True, [('weight', 0)])
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Graph, GraphModule
from torch.fx.graph_module import _forward_from_src

from fx_spectral.graph.config import TransformConfig
from fx_spectral.graph.emit import autocast_guard
from fx_spectral.graph.operator import conv_module_input, insert_operator_normalization
from fx_spectral.graph.rewrite import find_weight_uses, rewrite_weight

__all__ = ["PlannedWeight", "SpectralGraphModule", "install_owners", "resolve_target", "rewrite_planned"]


@dataclass(frozen=True)
class PlannedWeight:
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

    def __init__(
        self, root: nn.Module, plain_graph: Graph, weights: tuple[PlannedWeight, ...], config: TransformConfig
    ):
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
        return tuple((t.dtype, t.device.type) for t in (resolve_target(root, w.target) for w in self._sn_weights))

    def _generate(self, root: nn.Module) -> tuple[Graph, Graph]:
        train_graph, eval_graph = copy.deepcopy(self._sn_plain_graph), copy.deepcopy(self._sn_plain_graph)
        rewrite_planned(root, train_graph, self._sn_weights, self._sn_config, training=True)
        rewrite_planned(root, eval_graph, self._sn_weights, self._sn_config, training=False)
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
    install_owners(gm, root, weights)
    gm.training = training
    return gm


def _unpickle(holder: nn.Module, plain: GraphModule, weights, config, training: bool) -> SpectralGraphModule:
    for node in plain.graph.nodes:  # constants the re-trace created live on `plain`
        if node.op == "get_attr" and "." not in node.target and not hasattr(holder, node.target):
            setattr(holder, node.target, getattr(plain, node.target))
    return _rebuild(holder, plain.graph, weights, config, training)


def resolve_target(root: nn.Module, target: str):
    """The attribute a ``get_attr`` target names in ``root`` (``"0.weight"`` -> ``root[0].weight``)."""
    return functools.reduce(getattr, target.split("."), root)


def rewrite_planned(
    root: nn.Module, graph: Graph, plan: tuple[PlannedWeight, ...], cfg: TransformConfig, training: bool
) -> None:
    """Normalize every planned weight of ``graph`` (matrix mode: :func:`rewrite_weight`; operator mode:
    one operator-norm node before its convolution), as a training or an eval graph."""
    # NB: edits graph in place.
    targets = {w.target: w for w in plan}
    for w, uses in find_weight_uses(graph).items():
        if w.op != "get_attr" or w.target not in targets:
            continue
        info = targets[w.target]
        weight = resolve_target(root, w.target)
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
            autocast_off=autocast_guard(weight.device.type),
        )
    graph.lint()


def _rewrite_operator(root, graph: Graph, w, uses, info: PlannedWeight, cfg: TransformConfig, training: bool) -> None:
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


def install_owners(out: GraphModule, root: nn.Module, plan: tuple[PlannedWeight, ...]) -> None:
    """Make the planned weights' owning modules of ``root`` the submodules of ``out`` at their paths."""
    # GraphModule copies get_attr targets onto fresh empty parents; put the real owning modules
    # back so u/v stay buffers of the module that owns the weight (and follow its .to()).
    # NB: mutates out's module tree.
    for path in sorted({w.owner for w in plan if w.owner}, key=lambda p: p.count(".")):
        parent_path, _, child = path.rpartition(".")
        setattr(out.get_submodule(parent_path), child, root.get_submodule(path))
