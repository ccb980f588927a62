r"""The torch.compile backend ``"spectral"``: spectral normalization of every weight, no model change.

.. math:: \bar W = W / \sigma(W), \qquad \sigma = u^\top W_{mat} v \ \text{(power iteration on float32 } u, v)

``torch.compile(model, backend="spectral")`` hands each graph dynamo captures to this backend. The
backend finds every parameter that feeds a linear / conv / conv_transpose op, rewrites the graph so
the op gets ``W / sigma`` (:func:`fx_spectral.graph.rewrite.insert_normalization`, the same nodes as the
FX transform), and compiles the result with an inner backend (inductor by default).

How weights are found. Dynamo hands the model's parameters to the backend as graph inputs: the
``example_inputs`` are the user's real ``nn.Parameter`` objects. The weights are the Parameter
inputs that feed a linear / conv / conv_transpose op, directly or inside an activation-checkpoint
subgraph (``tag_activation_checkpoint``: those are normalized *outside* the checkpointed region,
and the higher-order op receives ``W / sigma``). Each weight is matched to the module that owns it
by the *identity* of the Parameter object (:mod:`fx_spectral.graph.owners`), never by a name.

Per call, not per compile. Dynamo reuses one compiled graph for every instance of a class (N
identical blocks compiled one by one, two instances of a model, a block after a graph break), each
time with that instance's Parameters. So the owners (and their u/v and ``.training``) are resolved
from the Parameters of each call: searched once per new set of Parameters, cached by their ``id``
and revalidated at every call with one dict lookup per weight.

State. u/v are float32 buffers ``{name}_u`` / ``{name}_v`` registered on the owning module the
first time a graph runs for it (16 warm-up iterations, as :func:`fx_spectral.spectral_norm` does),
or up front by :func:`prepare` (so a checkpoint loads strictly before the first call).
``model.state_dict()`` has the same keys as with the eager API and a checkpoint moves between the
two. The compiled graph takes u/v as *extra inputs*, read from the owning module at every call:
``.to()``, ``load_state_dict`` and recompiles keep working.

Train / eval. Dynamo does not recompile on ``model.eval()`` unless ``forward`` reads
``self.training``; the backend compiles a training variant (power-iteration update, u/v written in
place) and an eval variant (no update) of each graph, the second one lazily at its first use, and
picks one at each call from the owning modules' ``.training``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fx_spectral.graph.compiled import Slot, SpectralGraph, inner_compile
from fx_spectral.graph.config import BACKEND_NAME, BackendConfig
from fx_spectral.graph.dynamo_owners import compile_roots as _compile_roots
from fx_spectral.graph.dynamo_owners import describe as _describe
from fx_spectral.graph.operator import conv_consumers
from fx_spectral.graph.owners import ensure_uv, remember_roots, wanted

__all__ = ["BackendConfig", "backend", "prepare", "spectral_backend"]


_CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(BackendConfig))


class SpectralBackend:
    """A configured ``"spectral"`` backend: ``backend(gm, example_inputs) -> compiled callable``."""

    __name__ = BACKEND_NAME  # what torch.compile shows for a callable backend

    def __init__(self, config: BackendConfig):
        self.config = config

    def __repr__(self) -> str:
        return f"SpectralBackend({self.config})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SpectralBackend) and other.config == self.config

    def __hash__(self) -> int:
        return hash((SpectralBackend, id(self.config)))

    def prepare(self, model: nn.Module) -> nn.Module:
        """:func:`prepare` with this backend's ``name``, ``filter_fn`` and ``eps``: u/v now, for a strict load."""
        return _prepare(model, self.config)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, **options) -> Callable:
        if options:
            return SpectralBackend(_merge_options(self.config, options))(gm, example_inputs)
        return _compile_graph(gm, list(example_inputs), self.config)


def backend(
    *,
    inner: str | Callable = "inductor",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    name: str | tuple[str, ...] = "weight",
    mode: str | None = None,
    inner_options: Mapping[str, Any] | None = None,
) -> SpectralBackend:
    r"""A configured ``"spectral"`` torch.compile backend.

    .. math:: \mathrm{op}(x, W) \ \to\ \mathrm{op}(x, W / \sigma(W)) \quad \text{(linear, conv, conv\_transpose)}

    Args:
        inner: the backend compiling the rewritten graph (default ``"inductor"``; ``"aot_eager"``
            and any registered name or backend callable work too).
        n_power_iterations: power-iteration steps per training call. Default 1.
        eps: guard for the vector norms and for sigma. Default 1e-12.
        filter_fn: ``filter_fn(module, fqn) -> bool``: which owning modules to normalize.
        name: the parameter name(s) to normalize. Default ``"weight"``.
        mode: ``"operator"``: Conv / ConvTranspose weights divided by the norm of their convolution
            operator :math:`\sigma_{op} = \langle u, A(W) v\rangle` for the input shape the graph sees
            (u/v shaped like one output / input example, as ``spectral_norm(..., mode="operator")``;
            a call with another input shape raises ValueError naming the module). ``"matrix"`` or
            None (default): matrix mode. Any other string is a torch.compile mode for inductor.
        inner_options: torch.compile ``options`` passed on to inductor.

    Returns:
        a backend for ``torch.compile(model, backend=...)``.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> compiled = torch.compile(model, backend=fx_spectral.backend(inner="aot_eager"))
        >>> y = compiled(torch.randn(4, 8))  # doctest: +SKIP
        >>> sorted(model.state_dict())  # doctest: +SKIP
        ['0.bias', '0.weight', '0.weight_u', '0.weight_v', '2.bias', '2.weight', '2.weight_u', '2.weight_v']
    """
    return SpectralBackend(
        BackendConfig(
            inner=inner,
            n_power_iterations=n_power_iterations,
            eps=eps,
            filter_fn=filter_fn,
            name=name,
            mode=mode,
            inner_options=inner_options,
        )
    )


def _merge_options(config: BackendConfig, options: Mapping[str, Any]) -> BackendConfig:
    """``config`` updated by ``torch.compile(..., mode=..., options={...})`` / keyword options.

    Keys that name a config field are honoured; the rest go to inductor as config options when the
    inner backend is inductor and inductor knows them; anything else is warned about, by name.
    """
    options = dict(options)
    nested = options.pop("options", None) or {}
    if not isinstance(nested, Mapping):
        raise TypeError(f"spectral backend: expected `options` to be a dict, got {nested!r}")
    merged = {**nested, **options}
    ours = {k: merged.pop(k) for k in list(merged) if k in _CONFIG_KEYS}
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields.update(ours)
    if merged:
        inner = fields["inner"]
        known = _inductor_option_names() if inner == "inductor" else frozenset()
        passed = {k: v for k, v in merged.items() if k in known}
        for key in merged:
            if key not in known:
                warnings.warn(
                    f"spectral backend: ignoring option {key!r}: it is neither a spectral backend option "
                    f"({', '.join(sorted(_CONFIG_KEYS))}) nor an inductor config option"
                    + ("" if inner == "inductor" else f" (inner backend is {inner!r})"),
                    stacklevel=3,
                )
        fields["inner_options"] = {**(fields["inner_options"] or {}), **passed}
    return BackendConfig(**fields)


def _inductor_option_names() -> frozenset[str]:
    import torch._inductor.config as inductor_config

    return frozenset(inductor_config.get_config_copy())


_DEFAULT = None


def spectral_backend(gm: torch.fx.GraphModule, example_inputs: list, **options) -> Callable:
    """The ``"spectral"`` backend with default settings (the ``torch_dynamo_backends`` entry point).

    ``torch.compile(model, backend="spectral", mode=..., options={...})`` passes ``mode`` and
    ``options`` here: keys of :class:`BackendConfig` (``n_power_iterations``, ``eps``,
    ``inner``, ``filter_fn``, ``name``) configure the normalization, inductor config keys go to
    inductor, anything else is warned about.

    Example::

        >>> compiled = torch.compile(model, backend="spectral", options={"n_power_iterations": 2})  # doctest: +SKIP
    """
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = SpectralBackend(BackendConfig())
    return _DEFAULT(gm, example_inputs, **options)


# --------------------------------------------------------------------------------------------
# The weights of a graph (their owners' roots come from graph/dynamo_owners.py)
# --------------------------------------------------------------------------------------------


def _plan(gm: torch.fx.GraphModule, example_inputs: list, config: BackendConfig) -> list[Slot]:
    """The Parameter inputs of ``gm`` that feed a linear / conv / conv_transpose op as its weight.

    Directly or through an activation-checkpoint subgraph. Reads the graph, changes nothing; warns
    about the weights it cannot normalize (a plain tensor, conflicting dims, an opaque subgraph).
    """
    from fx_spectral.graph.rewrite import find_weight_uses_nested

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(example_inputs), "dynamo passes one example input per placeholder"
    index = {n: i for i, n in enumerate(placeholders)}
    uses, opaque, mixed = find_weight_uses_nested(gm)
    slots = []
    for w, consumers in uses.items():
        if w.op != "placeholder":
            continue  # computed in the graph, e.g. W / sigma of a module the eager API normalizes
        param = example_inputs[index[w]]
        if not isinstance(param, nn.Parameter):
            warnings.warn(
                f"spectral backend: the weight input {_describe(w)} of {consumers[0][0].name} is not an "
                "nn.Parameter; left unnormalized (normalize it with fx_spectral.spectral_norm, or compile the "
                "module that owns it)",
                stacklevel=4,
            )
            continue
        dims = {d for _, d in consumers}
        if len(dims) != 1:
            warnings.warn(
                f"spectral backend: {_describe(w)} feeds ops with different output dims {sorted(dims)}; "
                "left unnormalized",
                stacklevel=4,
            )
            continue
        if not param.is_floating_point() or param.dim() < 2:
            continue
        shapes = _operator_shapes(gm, w, consumers) if config._operator else None
        slots.append(Slot(index[w], dims.pop(), _describe(w), *(shapes or (None, None))))
    for node, ph in mixed:
        warnings.warn(
            f"spectral backend: inside the checkpointed subgraph of {node.name}, {ph.name} is also read by ops "
            "other than its linear / conv op; the weight is normalized outside the subgraph, so those reads see "
            "W / sigma too (without checkpointing they would see the raw W)",
            stacklevel=4,
        )
    for node in opaque:
        warnings.warn(
            f"spectral backend: {node.name} ({node.target}) runs a subgraph that uses some of its inputs as "
            "weights; the backend only rewrites activation-checkpoint subgraphs, so those weights are left "
            "unnormalized (normalize them with fx_spectral.spectral_norm)",
            stacklevel=4,
        )
    return sorted(slots, key=lambda s: s.index)


def _operator_shapes(gm: torch.fx.GraphModule, w: torch.fx.Node, consumers) -> tuple[tuple, tuple] | None:
    """Operator mode: the (input, output) shapes of one example of the conv using ``w`` (None: a Linear).

    The input is the conv op's, before the ``F.pad`` of a non-zeros padding_mode (the owner tells
    which, at bind time: see :class:`fx_spectral.graph.compiled.SpectralGraph`). Raises ValueError
    for a weight used by several convs, by a conv and a linear, or with symbolic channel / spatial sizes.
    """
    from fx_spectral.graph.ops import weight_op

    ops = conv_consumers(gm, w)
    kinds = {weight_op(op).kind for op in ops}
    if kinds <= {"linear"}:
        return None
    if len(ops) != 1 or len(kinds) != 1:
        raise ValueError(
            f"spectral backend: mode='operator': {_describe(w)} is used by {len(ops)} ops ({sorted(kinds)}); "
            "operator-mode u/v describe one convolution with one input shape"
        )
    op = ops[0]
    x = op.args[0] if op.args else op.kwargs.get("input")
    shapes = []
    for node in (x, op):
        val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"spectral backend: mode='operator': no example shape for the convolution of "
                             f"{_describe(w)}")
        shape = tuple(val.shape[1:])
        if not all(isinstance(d, int) for d in shape):
            raise ValueError(
                f"spectral backend: mode='operator': the convolution of {_describe(w)} has symbolic sizes "
                f"{shape} (dynamo makes sizes dynamic when a new input shape arrives); its operator norm and u/v "
                "depend on the input shape: keep the input shape fixed (compile with dynamic=False to get an "
                "error naming the module, or mark only the batch dimension dynamic)"
            )
        shapes.append(shape)
    return shapes[0], shapes[1]


# --------------------------------------------------------------------------------------------
# State: u/v on the owning modules
# --------------------------------------------------------------------------------------------


def prepare(
    model: nn.Module,
    *,
    name: str | tuple[str, ...] = "weight",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    eps: float = 1e-12,
) -> nn.Module:
    r"""Create now the u/v buffers the backend creates at the first call, so a checkpoint loads strictly before it.

    Registers float32 buffers ``{name}_u`` / ``{name}_v`` (16 warm-up power iterations on the
    weight, as at the backend's first call) on every ``nn.Linear`` / ``ConvNd`` / ``ConvTransposeNd``
    of ``model`` the backend would normalize; u/v that exist already are kept. Then
    ``model.load_state_dict(checkpoint)`` (``strict=True``) of a checkpoint saved by the backend,
    the eager API or :func:`fx_spectral.transform` finds every key it expects:

    .. math:: u \in \mathbb{R}^{W_{mat}.\mathrm{rows}}, \quad v \in \mathbb{R}^{W_{mat}.\mathrm{cols}}, \quad
              W_{mat} = \mathrm{flatten}_1(\mathrm{movedim}(W, dim, 0))

    ``dim`` is 1 for ConvTranspose, else 0. Weights the eager API already normalizes are skipped.
    Lazy modules that have not run yet (no shape) are skipped with a warning. Weights that are
    not held by one of these layer types (a custom module calling ``F.linear(x, self.w)``) are not
    covered: for those, run one call in eval mode (creates u/v, no update) before loading.

    NB: mutates ``model`` (adds buffers); returns it.

    Args:
        model: the model to be compiled with ``backend="spectral"``.
        name: the parameter name(s) the backend normalizes. Default ``"weight"``.
        filter_fn: ``filter_fn(module, fqn) -> bool``, ``fqn`` relative to ``model``: the backend's
            filter, when it uses one.
        eps: guard for the vector norms during the warm-up iterations.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> prepare(model).load_state_dict(checkpoint)  # doctest: +SKIP
        >>> compiled = torch.compile(model, backend="spectral")  # doctest: +SKIP
    """
    return _prepare(model, BackendConfig(inner="eager", name=name, filter_fn=filter_fn, eps=eps))


def _prepare(model: nn.Module, config: BackendConfig) -> nn.Module:
    from fx_spectral.nn import SUPPORTED_MODULES, default_dim

    if not isinstance(model, nn.Module):
        raise TypeError(f"spectral backend: prepare expects an nn.Module, got {type(model).__name__}")
    todo = []
    for fqn, module in model.named_modules():
        if not isinstance(module, SUPPORTED_MODULES):
            continue
        if config._operator and not isinstance(module, nn.Linear):
            continue  # operator-mode u/v are shaped by the input: created at the first call
        for n in config.name:
            p = module._parameters.get(n)
            if p is None or not wanted(config, module, fqn, n):
                continue
            if isinstance(p, nn.parameter.UninitializedParameter):
                warnings.warn(
                    f"spectral backend: prepare: {fqn}.{n} is a Lazy parameter that has not run yet; its u/v are "
                    "created at its first call (run one forward before loading a checkpoint)",
                    stacklevel=3,
                )
                continue
            if p.is_floating_point() and p.dim() >= 2:
                todo.append((module, fqn, n, default_dim(module), p))
    ensure_uv(todo, config.eps)
    return model


# --------------------------------------------------------------------------------------------
# Compiling one dynamo graph
# --------------------------------------------------------------------------------------------


def _is_dynamic(gm: torch.fx.GraphModule, example_inputs: list) -> bool:
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        return True
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return any(
        isinstance(n.meta.get("example_value"), torch.Tensor) and free_symbols(n.meta["example_value"])
        for n in gm.graph.nodes
        if n.op == "placeholder"
    )


def _compile_graph(gm: torch.fx.GraphModule, example_inputs: list, config: BackendConfig) -> Callable:
    """Normalize the weights of one dynamo graph and compile it with the inner backend."""
    dynamic = _is_dynamic(gm, example_inputs)
    slots = _plan(gm, example_inputs, config)
    if not slots:
        return inner_compile(config, gm, example_inputs, dynamic)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    roots = _compile_roots([placeholders[s.index] for s in slots])
    remember_roots(roots)
    return SpectralGraph(gm, example_inputs, slots, config, dynamic, roots)


def _register() -> None:
    """Register ``"spectral"`` with dynamo unless it is registered or pending as an entry point."""
    from torch._dynamo.backends import registry

    if BACKEND_NAME in getattr(registry, "_COMPILER_FNS", {}):
        return
    # An entry point discovered but not loaded yet: dynamo registers it when it loads this module's
    # spectral_backend (registering here as well would make that raise "duplicate name").
    if getattr(registry, "_BACKENDS", {}).get(BACKEND_NAME) is not None:
        return
    try:
        registry.register_backend(spectral_backend, name=BACKEND_NAME)
    except AssertionError:  # registered concurrently: fine, it is registered
        pass


_register()


# Old names (one release): they warn and give the same class.
from fx_spectral.deprecation import renamed  # noqa: E402

__getattr__ = renamed(__name__, {"SpectralBackendConfig": "BackendConfig"}, globals())
