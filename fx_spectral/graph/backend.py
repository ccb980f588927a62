r"""The torch.compile backend ``"spectral"``: spectral normalization of every weight, no model change.

.. math:: \bar W = W / \sigma(W), \qquad \sigma = u^\top W_{mat} v \ \text{(power iteration on float32 } u, v)

``torch.compile(model, backend="spectral")`` hands each graph dynamo captures to this backend. The
backend finds every parameter that feeds a linear / conv / conv_transpose op, rewrites the graph so
the op gets ``W / sigma`` (:func:`fx_spectral.graph.rewrite.rewrite_weight`, the same nodes as the
FX transform), and compiles the result with an inner backend (inductor by default).

How weights are found. Dynamo hands the model's parameters to the backend as graph inputs: the
``example_inputs`` are the user's real ``nn.Parameter`` objects. Each input's dynamo source (e.g.
``L['self']._modules['fc']._parameters['weight']``) leads to the root module of the compiled frame
(``L['self']``, or ``L['args'][0]`` for a model wrapped by a decorator); the root's
``named_modules()`` then give ``id(param) -> (module, fqn, name)``, and a weight is matched to its
owner by the *identity* of the Parameter object, never by the source name alone. A parameter shared
by several modules (tied weights) goes to the Linear / Conv / ConvTranspose that holds it.

State. u/v are float32 buffers ``{name}_u`` / ``{name}_v`` registered once on the owning module
(16 warm-up iterations, as :func:`fx_spectral.spectral_norm` does), so ``model.state_dict()`` has the
same keys as with the eager API and a checkpoint moves between the two. The compiled graph takes
u/v as *extra inputs*, read from the owning module at every call: ``.to()``, ``load_state_dict`` and
recompiles keep working.

Train / eval. Dynamo does not recompile on ``model.eval()`` unless ``forward`` reads
``self.training``; the backend compiles a training variant (power-iteration update, u/v written in
place) and an eval variant (no update) of each graph, the second one lazily at its first use, and
picks one at each call from the owning modules' ``.training``.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["SpectralBackendConfig", "backend", "spectral_backend"]

BACKEND_NAME = "spectral"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpectralBackendConfig:
    """Configuration of the ``"spectral"`` backend (frozen; validated at creation).

    Args:
        inner: the backend compiling the rewritten graph: ``"inductor"`` (default), any registered
            name (``"aot_eager"``, ``"eager"``...) or a backend callable ``(gm, example_inputs) -> fn``.
        n_power_iterations: power-iteration steps per training call. Default 1.
        eps: guard for the vector norms and for sigma. Default 1e-12.
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks which owning modules are normalized
            (``fqn`` relative to the root module of the compiled frame). Default: all.
        name: the parameter name(s) to normalize. Default ``"weight"``.
        mode: torch.compile ``mode`` for the inductor inner backend (e.g. ``"max-autotune"``).
        inner_options: inductor config options (``torch.compile(options=...)`` style) for the inner
            backend; only honoured with ``inner="inductor"``.
    """

    inner: str | Callable = "inductor"
    n_power_iterations: int = 1
    eps: float = 1e-12
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    name: str | tuple[str, ...] = "weight"
    mode: str | None = None
    inner_options: Mapping[str, Any] | None = None

    def __post_init__(self):
        from fx_spectral.nn import _check_options, _names

        _check_options(self.n_power_iterations, self.eps, "spectral backend")
        object.__setattr__(self, "name", _names(self.name, "spectral backend"))
        if not (isinstance(self.inner, str) or callable(self.inner)):
            raise TypeError(f"spectral backend: expected `inner` to be a backend name or callable, got {self.inner!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"spectral backend: expected `filter_fn(module, fqn) -> bool`, got {self.filter_fn!r}")
        if self.mode is not None and not isinstance(self.mode, str):
            raise TypeError(f"spectral backend: expected `mode` to be a str, got {self.mode!r}")
        if self.inner_options is not None and not isinstance(self.inner_options, Mapping):
            raise TypeError(f"spectral backend: expected `inner_options` to be a dict, got {self.inner_options!r}")
        if self.inner == BACKEND_NAME:
            raise ValueError("spectral backend: `inner` cannot be 'spectral' itself; use 'inductor' or 'aot_eager'")
        if not self._inductor and (self.mode is not None or self.inner_options):
            raise ValueError(
                f"spectral backend: `mode` and `inner_options` are inductor settings, but inner={self.inner!r}; "
                "drop them or use inner='inductor'"
            )
        object.__setattr__(self, "inner_options", dict(self.inner_options or {}))

    @property
    def _inductor(self) -> bool:
        return self.inner == "inductor"


_CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(SpectralBackendConfig))


class SpectralBackend:
    """A configured ``"spectral"`` backend: ``backend(gm, example_inputs) -> compiled callable``."""

    __name__ = BACKEND_NAME  # what torch.compile shows for a callable backend

    def __init__(self, config: SpectralBackendConfig):
        self.config = config

    def __repr__(self) -> str:
        return f"SpectralBackend({self.config})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SpectralBackend) and other.config == self.config

    def __hash__(self) -> int:
        return hash((SpectralBackend, id(self.config)))

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
        mode, inner_options: torch.compile ``mode`` / ``options`` passed on to inductor.

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
        SpectralBackendConfig(
            inner=inner,
            n_power_iterations=n_power_iterations,
            eps=eps,
            filter_fn=filter_fn,
            name=name,
            mode=mode,
            inner_options=inner_options,
        )
    )


def _merge_options(config: SpectralBackendConfig, options: Mapping[str, Any]) -> SpectralBackendConfig:
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
    return SpectralBackendConfig(**fields)


def _inductor_option_names() -> frozenset[str]:
    import torch._inductor.config as inductor_config

    return frozenset(inductor_config.get_config_copy())


_DEFAULT = None


def spectral_backend(gm: torch.fx.GraphModule, example_inputs: list, **options) -> Callable:
    """The ``"spectral"`` backend with default settings (the ``torch_dynamo_backends`` entry point).

    ``torch.compile(model, backend="spectral", mode=..., options={...})`` passes ``mode`` and
    ``options`` here: keys of :class:`SpectralBackendConfig` (``n_power_iterations``, ``eps``,
    ``inner``, ``filter_fn``, ``name``) configure the normalization, inductor config keys go to
    inductor, anything else is warned about.

    Example::

        >>> compiled = torch.compile(model, backend="spectral", options={"n_power_iterations": 2})  # doctest: +SKIP
    """
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = SpectralBackend(SpectralBackendConfig())
    return _DEFAULT(gm, example_inputs, **options)


# --------------------------------------------------------------------------------------------
# Which module owns each weight
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One weight to normalize: its graph input, the module owning it, its ``dim``."""

    index: int  # position of the weight among the graph's placeholders
    module: nn.Module
    fqn: str  # of the module, relative to the root module of the compiled frame
    name: str
    dim: int

    @property
    def where(self) -> str:
        return f"{self.fqn}.{self.name}" if self.fqn else self.name


def _dynamo_frame():
    """The instruction translator of the frame dynamo is compiling, None outside dynamo (private API)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # not under dynamo, or the private API moved
        return None


def _source(node: torch.fx.Node):
    src = getattr(node, "_dynamo_source", None)
    if src is None:
        src = getattr(node.meta.get("grapharg"), "source", None)
    return src


def _resolve(tx, source) -> Any:
    output = getattr(tx, "output", None)
    if hasattr(output, "resolve_source_value"):
        return output.resolve_source_value(source)
    return source.get_value({"G": tx.f_globals, "L": tx.f_locals}, {}, {})


def _root_module(source, tx, cache: dict) -> nn.Module | None:
    """The outermost nn.Module on the path of ``source`` (``L['self']`` in ``L['self']._modules['fc']...``)."""
    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    for s in reversed(chain):  # from the frame's local / global inwards
        if s not in cache:
            try:
                cache[s] = _resolve(tx, s)
            except Exception:  # a source dynamo can guard on but we cannot evaluate: try the next one
                cache[s] = None
        if isinstance(cache[s], nn.Module):
            return cache[s]
    return None


def _owners(weights: dict[int, tuple[torch.fx.Node, nn.Parameter]]) -> dict[int, tuple[nn.Module, str, str]]:
    """``{input index: (module, fqn, name)}``, matched by the identity of the Parameter objects."""
    from fx_spectral.nn import SUPPORTED_MODULES

    tx = _dynamo_frame()
    roots: list[nn.Module] = []
    if tx is not None:
        cache: dict = {}
        for node, _ in weights.values():
            root = _root_module(_source(node), tx, cache)
            if root is not None and all(root is not r for r in roots):
                roots.append(root)
        # fallback for sources we could not follow: every module among the frame's locals
        local_modules = [m for m in getattr(tx, "f_locals", {}).values() if isinstance(m, nn.Module)]
        roots += [m for m in local_modules if all(m is not r for r in roots)]
    table: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for root in roots:
        for fqn, module in root.named_modules(remove_duplicate=False):
            for name, p in module._parameters.items():
                if p is not None:
                    table.setdefault(id(p), []).append((module, fqn, name))
    owners = {}
    for i, (_, param) in weights.items():
        found = table.get(id(param), [])
        # a tied parameter (embedding + LM head) belongs to the Linear/Conv that consumes it
        found = [c for c in found if isinstance(c[0], SUPPORTED_MODULES)] or found
        if found:
            owners[i] = found[0]
    return owners


def _plan(gm: torch.fx.GraphModule, example_inputs: list, config: SpectralBackendConfig) -> list[_Slot]:
    """The weights of ``gm`` to normalize (reads the graph, changes nothing)."""
    from fx_spectral.graph.rewrite import find_weight_uses
    from fx_spectral.nn import is_spectral_normalized

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(example_inputs), "dynamo passes one example input per placeholder"
    index = {n: i for i, n in enumerate(placeholders)}
    weights, dims, unowned = {}, {}, []
    for w, uses in find_weight_uses(gm.graph).items():
        if w.op != "placeholder":
            continue  # computed in the graph, e.g. W / sigma of a module the eager API normalizes
        param = example_inputs[index[w]]
        if not isinstance(param, nn.Parameter):
            unowned.append((w, uses[0][0]))
            continue
        weights[index[w]] = (w, param)
        dims[index[w]] = {d for _, d in uses}
    owners = _owners(weights) if weights else {}
    slots = []
    for i, (w, param) in weights.items():
        if i not in owners:
            unowned.append((w, None))
            continue
        module, fqn, name = owners[i]
        if name not in config.name or is_spectral_normalized(module, name):
            continue
        if config.filter_fn is not None and not config.filter_fn(module, fqn):
            continue
        if len(dims[i]) != 1:
            warnings.warn(
                f"spectral backend: {fqn}.{name} feeds ops with different output dims {sorted(dims[i])}; "
                "left unnormalized",
                stacklevel=4,
            )
            continue
        if not param.is_floating_point() or param.dim() < 2:
            continue
        slots.append(_Slot(i, module, fqn, name, dims[i].pop()))
    for w, op in unowned:
        src = _source(w)
        what = src.name if src is not None else w.name
        warnings.warn(
            f"spectral backend: the weight input {what} "
            + (
                f"of {op.name} is not an nn.Parameter"
                if op is not None
                else "is a Parameter of no module reachable from the compiled frame"
            )
            + "; left unnormalized (normalize it with fx_spectral.spectral_norm, or compile the module that owns it)",
            stacklevel=4,
        )
    return slots


def _ensure_uv(slots: list[_Slot], example_inputs: list, eps: float) -> None:
    """Create the float32 u/v buffers the slots need (16 warm-up iterations, as the eager API); reuse existing ones.

    Existing u/v of another floating dtype (after ``model.double()``) are converted back to float32.
    """
    from fx_spectral.nn import _init_uv, weight_matrix

    todo, recast = [], []
    for s in slots:
        rows, cols = weight_matrix(example_inputs[s.index].detach(), s.dim).shape
        have = [s.module._buffers.get(s.name + k) for k in ("_u", "_v")]
        if have == [None, None]:
            for k in ("_u", "_v"):
                if hasattr(s.module, s.name + k):
                    raise ValueError(
                        f"spectral backend: {s.where}: cannot add buffer {s.name + k!r}: "
                        "the module already has an attribute of that name"
                    )
            todo.append(s)
            continue
        for t, n, k in zip(have, (rows, cols), ("_u", "_v")):
            if not (isinstance(t, torch.Tensor) and t.dtype.is_floating_point and tuple(t.shape) == (n,)):
                got = "missing" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
                raise ValueError(f"spectral backend: {s.where}{k} must be a float32 vector of length {n}, got {got}")
            if t.dtype != torch.float32:
                recast.append((s.module, s.name + k))
    for module, key in recast:
        # NB: model.to(dtype) / .half() also converted u/v (plain modules do not protect them as the
        # eager API's do): put them back in float32, in place of the converted buffers.
        module._buffers[key] = module._buffers[key].float()
    for s in todo:
        u, v = _init_uv(example_inputs[s.index], s.dim, eps)
        # NB: registers {name}_u / {name}_v on the owning module: part of model.state_dict() from now on.
        s.module.register_buffer(s.name + "_u", u)
        s.module.register_buffer(s.name + "_v", v)


# --------------------------------------------------------------------------------------------
# Rewriting and compiling
# --------------------------------------------------------------------------------------------


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` (dynamo shares ``gm.graph`` with its OutputGraph: never edit it)."""
    new = torch.fx.Graph()
    new._codegen = graph._codegen
    old_out = graph.output_node()
    out = new.graph_copy(graph, {})
    new_out = new.output(out, type_expr=old_out.type)
    new_out.meta = dict(old_out.meta)
    return new


def _rewritten(
    gm: torch.fx.GraphModule, slots: list[_Slot], training: tuple[bool, ...], config: SpectralBackendConfig
) -> torch.fx.GraphModule:
    """``gm`` with its weights normalized and u/v as extra inputs after the original ones."""
    from fx_spectral.graph.rewrite import find_weight_uses, rewrite_weight

    graph = _copy_graph(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last, uv = placeholders[-1], []
    for s in slots:
        for k in ("_u", "_v"):
            with graph.inserting_after(last):
                last = graph.placeholder(re.sub(r"\W|^(?=\d)", "_", f"{s.where}{k}"))
            uv.append(last)
    uses = find_weight_uses(graph)
    # each weight's nodes go right after the placeholders: in reverse, so they read in graph order
    for j, (s, train) in reversed(list(enumerate(zip(slots, training)))):
        w = placeholders[s.index]
        rewrite_weight(
            graph,
            w,
            [op for op, _ in uses[w]],
            uv[2 * j],
            uv[2 * j + 1],
            dim=s.dim,
            n_power_iterations=config.n_power_iterations,
            eps=config.eps,
            training=train,
        )
    graph.lint()
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new


def _inner_compile(config: SpectralBackendConfig, gm: torch.fx.GraphModule, inputs: list, dynamic: bool) -> Callable:
    if config._inductor:
        from torch._inductor.compile_fx import compile_fx

        patches = {}
        if config.mode is not None:
            from torch._inductor import list_mode_options

            patches.update(list_mode_options(config.mode, dynamic))
        patches.update(config.inner_options)
        return compile_fx(gm, inputs, config_patches=patches) if patches else compile_fx(gm, inputs)
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(config.inner)(gm, inputs)


class _SpectralGraph:
    """What dynamo calls: picks the train or eval variant and appends u/v read from the owning modules.

    The variant for the modules' current modes is compiled with the graph; the other one at its
    first call (with that call's inputs: dynamo guards on their shapes, so they stand for all calls
    of this graph), or with the graph too when its shapes are dynamic.
    """

    def __init__(self, gm, example_inputs, slots, config, dynamic):
        self.gm, self.slots, self.config, self.dynamic = gm, slots, config, dynamic
        self._uv_keys = [(s.module, s.name + "_u", s.name + "_v") for s in slots]
        self.variants: dict[tuple[bool, ...], Callable] = {}
        modes = [self._mode()] + ([(True,) * len(slots), (False,) * len(slots)] if dynamic else [])
        for mode in dict.fromkeys(modes):
            self._compile(mode, list(example_inputs), _static_fakes(self._uv()))

    def _mode(self) -> tuple[bool, ...]:
        return tuple(s.module.training for s in self.slots)

    def _uv(self) -> list[torch.Tensor]:
        out = []
        for module, ku, kv in self._uv_keys:
            out += (module._buffers[ku], module._buffers[kv])
        return out

    def _compile(self, mode: tuple[bool, ...], inputs: list, uv: list) -> Callable:
        gm = _rewritten(self.gm, self.slots, mode, self.config)
        fn = self.variants[mode] = _inner_compile(self.config, gm, inputs + uv, self.dynamic)
        return fn

    def __call__(self, *args):
        mode = self._mode()
        fn = self.variants.get(mode)
        if fn is None:
            fn = self._compile(mode, list(args), self._uv())
        return fn(*args, *self._uv())  # dynamo's convention: unboxed, even where fn has _boxed_call


def _static_fakes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as static-shape fake tensors of dynamo's fake mode (real ones outside dynamo).

    aot_autograd gives a real input that dynamo did not fakify fresh *symbolic* sizes; u/v would
    then make inductor emit dynamic-shape kernels and, where they meet the batch dimension, make
    dynamo specialize a graph compiled with ``dynamic=True``.
    """
    ctx = torch._guards.TracingContext.try_get()
    if ctx is None or ctx.fake_mode is None:
        return tensors
    return [ctx.fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


def _is_dynamic(gm: torch.fx.GraphModule, example_inputs: list) -> bool:
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        return True
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return any(
        isinstance(n.meta.get("example_value"), torch.Tensor) and free_symbols(n.meta["example_value"])
        for n in gm.graph.nodes
        if n.op == "placeholder"
    )


def _compile_graph(gm: torch.fx.GraphModule, example_inputs: list, config: SpectralBackendConfig) -> Callable:
    """Normalize the weights of one dynamo graph and compile it with the inner backend."""
    dynamic = _is_dynamic(gm, example_inputs)
    slots = _plan(gm, example_inputs, config)
    if not slots:
        return _inner_compile(config, gm, example_inputs, dynamic)
    _ensure_uv(slots, example_inputs, config.eps)
    return _SpectralGraph(gm, example_inputs, slots, config, dynamic)


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
