r"""The FX pass behind ``fx_spectral.transform``: spectral normalization as a torch.fx graph rewrite.

.. math:: \text{op}(x, W) \ \to\ \text{op}(x, W / \sigma(W)) \quad
          \text{for every weight of a linear / conv / conv\_transpose op}

:func:`transform` traces a model with ``torch.fx.symbolic_trace`` (or takes a GraphModule as is,
e.g. ``ep.module()`` of an ExportedProgram) and returns a :class:`SpectralGraphModule`: one
graph for training (power iteration, u/v updated in place) and one for eval (no update), chosen
on ``self.training`` at each call. :func:`spectral_pass` is the single-graph, in-place pass for
pt2e-style pipelines. The u/v vectors are float32 buffers ``{name}_u`` / ``{name}_v`` on the
module owning the weight, so ``state_dict`` keys equal the eager API's. The returned module and the
generation of its graphs from the plan are in :mod:`fx_spectral.graph.spectral_module`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.fx import Graph, GraphModule

from fx_spectral import nn as sn
from fx_spectral import power as P
from fx_spectral.graph.config import TransformConfig
from fx_spectral.graph.operator import (
    CONV_T_TYPES,
    CONV_TYPES,
    check_operator_uv,
    conv_module_input,
    transposed_output_padding,
)
from fx_spectral.graph.ops import MODULE_TYPES, WEIGHT_OPS
from fx_spectral.graph.rewrite import find_weight_uses, lower_module_call, lowering_blocker
from fx_spectral.graph.spectral_module import PlannedWeight as _Weight
from fx_spectral.graph.spectral_module import SpectralGraphModule
from fx_spectral.graph.spectral_module import install_owners as _install_owners
from fx_spectral.graph.spectral_module import rewrite_planned as _rewrite

__all__ = ["TransformConfig", "SpectralGraphModule", "transform", "spectral_pass"]

_BACKEND_HINT = 'torch.compile(model, backend="spectral")'


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


# Old names (one release): they warn and give the same class (TorchTitan's SpectralConfig is another class).
from fx_spectral.deprecation import renamed  # noqa: E402

__getattr__ = renamed(__name__, {"SpectralConfig": "TransformConfig"}, globals())
