r"""What dynamo runs for a graph with weights: the rewritten variants and the per-call owners of the weights.

:class:`SpectralGraph` is the callable the ``"spectral"`` backend returns for a dynamo graph whose
Parameter inputs feed linear / conv / conv_transpose ops. At every call it finds the modules owning
that call's Parameters (cached per set of Parameters, revalidated per call: :class:`_Binding`),
reads their float32 u/v buffers and ``.training``, and runs the variant of the graph for that mode,
rewritten by :func:`_rewritten` so each op gets ``W / sigma``:

.. math:: \bar W = W / \sigma, \qquad \sigma = u^\top W_{mat} v \ \text{(one power-iteration step per training call)}
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fx_spectral import nn as sn
from fx_spectral.graph.operator import CONV_T_TYPES, CONV_TYPES, ensure_operator_uv, transposed_output_padding
from fx_spectral.graph.owners import ensure_uv, find_owners, wanted

if TYPE_CHECKING:
    from fx_spectral.graph.config import BackendConfig

__all__ = ["Slot", "SpectralGraph", "inner_compile", "static_fakes"]


@dataclasses.dataclass(frozen=True)
class Slot:
    """One weight input of a graph: its position among the placeholders, its ``dim``, its dynamo source."""

    index: int
    dim: int
    source: str  # e.g. L['self']._modules['fc']._parameters['weight'] (for messages)
    op_in: tuple | None = None  # operator mode: the conv op's input shape (one example), None: matrix
    op_out: tuple | None = None  # operator mode: the conv op's output shape (one example)


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
    gm: torch.fx.GraphModule,
    slots: list[Slot],
    labels: list[str],
    mode: tuple[bool | None, ...],
    config: BackendConfig,
    specs: list[tuple | None] | None = None,
) -> torch.fx.GraphModule:
    """``gm`` with the weights of ``mode`` (True: training, False: eval, None: left alone) normalized.

    The u/v of the normalized weights are extra inputs, after the original ones, in slot order.
    A weight that reaches its op through an activation-checkpoint subgraph is normalized outside
    it: the higher-order op receives ``W / sigma`` in place of ``W`` (its subgraph is not edited).
    ``specs`` (operator mode): per slot, the conv's operator (:func:`fx_spectral.nn.conv_operator_spec`)
    or None; a slot with a spec gets one ``operator_weight`` node instead of the matrix-mode nodes.
    """
    from fx_spectral.graph.emit import autocast_guard
    from fx_spectral.graph.operator import insert_operator_normalization
    from fx_spectral.graph.rewrite import find_weight_uses_nested, rewrite_weight

    graph = _copy_graph(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    specs = specs or [None] * len(slots)
    active = [(s, label, train, spec) for s, label, train, spec in zip(slots, labels, mode, specs) if train is not None]
    last, uv = placeholders[-1], []
    for _, label, _, _ in active:
        for k in ("_u", "_v"):
            with graph.inserting_after(last):
                last = graph.placeholder(re.sub(r"\W|^(?=\d)", "_", f"{label}{k}"))
            uv.append(last)
    uses, _, _ = find_weight_uses_nested(gm, graph)
    # each weight's nodes go right after the placeholders: in reverse, so they read in graph order
    for j, (s, label, train, spec) in reversed(list(enumerate(active))):
        w = placeholders[s.index]
        if spec is not None:
            new = insert_operator_normalization(
                graph, w, uv[2 * j], uv[2 * j + 1], None, uv[-1].next, spec=spec, where=label,
                n_power_iterations=config.n_power_iterations, eps=config.eps, training=train,
            )
            for consumer in dict.fromkeys(op for op, _ in uses[w]):
                consumer.replace_input_with(w, new)
            continue
        # NB: one sigma (one power iteration) for every use: a Linear called twice, or a weight
        # passed into a checkpointed subgraph (which gets W / sigma); each linear / conv op divides
        # its output or its weight by sigma, whichever is smaller (rewrite.divides_output)
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
            # the estimate in float32 under CUDA autocast too (mv autocasts there)
            autocast_off=autocast_guard(_device_type(w)),
        )
    graph.lint()
    new_gm = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new_gm.meta.update(gm.meta)
    return new_gm


def _device_type(placeholder: torch.fx.Node) -> str:
    """The device type of a graph input, from the example value dynamo records ("cpu" when none is)."""
    value = placeholder.meta.get("example_value", placeholder.meta.get("val"))
    return value.device.type if isinstance(value, torch.Tensor) else "cpu"


def inner_compile(config: BackendConfig, gm: torch.fx.GraphModule, inputs: list, dynamic: bool) -> Callable:
    if config._inductor:
        from torch._inductor.compile_fx import compile_fx

        patches = {}
        if config._inductor_mode is not None:
            from torch._inductor import list_mode_options

            patches.update(list_mode_options(config._inductor_mode, dynamic))
        patches.update(config.inner_options)
        return compile_fx(gm, inputs, config_patches=patches) if patches else compile_fx(gm, inputs)
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(config.inner)(gm, inputs)


_MAX_BINDINGS = 4096


class _Binding:
    """The owners of one set of weight Parameters, as ``(index, ref, name, u key, v key, normalize)``.

    ``ref`` is a weakref to the owning module (to the Parameter itself when no owner was found,
    with ``name`` None). :meth:`state` revalidates the owners on every call: one dict lookup and an
    identity test per weight.
    """

    __slots__ = ("entries",)

    def __init__(self, entries: tuple):
        self.entries = entries

    def state(self, args: tuple) -> tuple[tuple[bool | None, ...], list[torch.Tensor]] | None:
        """``(mode, u/v tensors)`` for this call; None when an owner no longer holds its Parameter."""
        mode, uv = [], []
        add_mode, add_uv = mode.append, uv.append
        for i, ref, name, ku, kv, on in self.entries:
            target = ref()
            if name is None:  # no owner was found: ref is the Parameter's own weakref
                if target is not args[i]:
                    return None
                add_mode(None)
            elif target is None or target._parameters.get(name) is not args[i]:
                return None
            elif on:
                buffers = target._buffers
                u, v = buffers.get(ku), buffers.get(kv)
                if u is None or v is None:
                    return None
                add_mode(target.training)
                add_uv(u)
                add_uv(v)
            else:
                add_mode(None)
        return tuple(mode), uv


class SpectralGraph:
    """What dynamo calls: finds the owners of this call's weights, picks a variant, appends their u/v.

    Dynamo runs this one graph for every module instance whose code and guards match the one it was
    compiled for (N identical blocks, two instances of a model), each time with *that* instance's
    Parameters. So the owning modules, their u/v and their ``.training`` are resolved per call from
    the Parameter objects (:mod:`fx_spectral.graph.owners`), cached by their ``id`` and revalidated
    on every call (:class:`_Binding`). A variant is compiled per mode tuple (per weight: True
    training, False eval, None left alone): the one of the first call with the graph, the others at
    their first call (with that call's inputs: dynamo guards on their shapes, so they stand for all
    calls of this graph), or with the graph too when its shapes are dynamic.
    """

    def __init__(self, gm, example_inputs, slots, config, dynamic, roots):
        self.gm, self.slots, self.config, self.dynamic = gm, slots, config, dynamic
        self._index = tuple(s.index for s in slots)
        self._bindings: dict[tuple[int, ...], _Binding] = {}
        self._warned: set[int] = set()
        self.specs: list[tuple | None] = [None] * len(slots)  # operator mode: per slot, set at the first bind
        self.variants: dict[tuple[bool | None, ...], Callable] = {}
        key = tuple(id(example_inputs[i]) for i in self._index)
        binding = self._bind(key, example_inputs, roots, sys._getframe(1))
        # u/v placeholder names: the weights' fqn.name at compile time (fc_weight_u); arbitrary otherwise
        self.labels = [
            f"{fqn}.{name}" if fqn else (name or f"input{s.index}")
            for s, (fqn, name) in zip(slots, self._first_owners)
        ]
        mode, uv = binding.state(tuple(example_inputs))
        modes = [mode]
        if dynamic:
            modes += [tuple(None if m is None else t for m in mode) for t in (True, False)]
        for m in dict.fromkeys(modes):
            self._compile(m, list(example_inputs), static_fakes(uv))

    def _bind(self, key, args, roots=(), frame=None) -> _Binding:
        params = [args[i] for i in self._index]
        owners = find_owners(params, roots, frame if frame is not None else sys._getframe(2))
        entries, todo, todo_op, first = [], [], [], []
        for s, p, owner in zip(self.slots, params, owners):
            if owner is None:
                self._warn_unowned(s, p)
                entries.append((s.index, weakref.ref(p), None, None, None, False))
                first.append(("", None))
                continue
            module, fqn, name = owner
            on = wanted(self.config, module, fqn, name)
            if on and s.op_in is not None:
                todo_op.append(self._operator_state(s, module, fqn, name, p))
            elif on:
                todo.append((module, fqn, name, s.dim, p))
            entries.append((s.index, weakref.ref(module), name, name + "_u", name + "_v", on))
            first.append((fqn, name))
        ensure_uv(todo, self.config.eps)
        ensure_operator_uv(todo_op, self.config.eps)
        if not hasattr(self, "_first_owners"):
            self._first_owners = first
        if len(self._bindings) >= _MAX_BINDINGS:  # Parameter sets that died; their ids are stale keys
            self._bindings.clear()
        binding = self._bindings[key] = _Binding(tuple(entries))
        return binding

    def _operator_state(self, s: Slot, module, fqn: str, name: str, p) -> tuple:
        """Operator mode: ``(module, fqn, name, spec, in_shape, out_shape, weight)`` of one weight, its spec
        checked against (or, at the first bind, recorded for) the compiled graph."""
        where = f"{fqn}.{name}" if fqn else name
        if not isinstance(module, CONV_TYPES + CONV_T_TYPES) or name != "weight":
            raise ValueError(
                f"spectral backend: mode='operator': {where} ({type(module).__name__}) feeds a convolution but is "
                "not the weight of a Conv / ConvTranspose module; its operator is unknown (exclude it with filter_fn)"
            )
        in_shape, out_shape = s.op_in, s.op_out
        if isinstance(module, CONV_TYPES) and module.padding_mode != "zeros":
            # the graph's conv reads the padded input: one example's own shape is smaller by the padding
            pad = sn.conv_operator_spec(module)[0]
            spatial = [d - pad[2 * j] - pad[2 * j + 1] for j, d in enumerate(reversed(in_shape[1:]))]
            in_shape = (in_shape[0], *reversed(spatial))
        output_padding = None
        if isinstance(module, CONV_T_TYPES):
            output_padding = transposed_output_padding(module, in_shape, out_shape)
        spec = sn.conv_operator_spec(module, output_padding)
        i = self.slots.index(s)
        if self.specs[i] is None:
            self.specs[i] = spec
        elif self.specs[i] != spec:
            raise ValueError(
                f"spectral backend: mode='operator': {where}: this graph was compiled for the operator {self.specs[i]}"
                f", this module's is {spec}"
            )
        return (module, fqn, name, spec, in_shape, out_shape, p)

    def _warn_unowned(self, slot: Slot, param: torch.Tensor) -> None:
        if slot.index in self._warned:
            return
        self._warned.add(slot.index)
        warnings.warn(
            f"spectral backend: the weight input {slot.source} (shape {tuple(param.shape)}) is a Parameter of no "
            "module in reach (the compiled frame, the calling frames, the modules seen at compile time); it is left "
            "unnormalized (normalize it with fx_spectral.spectral_norm, or compile the module that owns it)",
            stacklevel=3,
        )

    def _compile(self, mode: tuple[bool | None, ...], inputs: list, uv: list) -> Callable:
        gm = _rewritten(self.gm, self.slots, self.labels, mode, self.config, self.specs)
        fn = self.variants[mode] = inner_compile(self.config, gm, inputs + uv, self.dynamic)
        return fn

    def __call__(self, *args):
        key = tuple([id(args[i]) for i in self._index])
        binding = self._bindings.get(key)
        state = None if binding is None else binding.state(args)
        if state is None:  # Parameters not seen before (another instance), or an owner changed
            state = self._bind(key, args).state(args)
        mode, uv = state
        fn = self.variants.get(mode)
        if fn is None:
            fn = self._compile(mode, list(args), uv)
        return fn(*args, *uv)  # dynamo's convention: unboxed, even where fn has _boxed_call


def static_fakes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as static-shape fake tensors of dynamo's fake mode (real ones outside dynamo).

    aot_autograd gives a real input that dynamo did not fakify fresh *symbolic* sizes; u/v would
    then make inductor emit dynamic-shape kernels and, where they meet the batch dimension, make
    dynamo specialize a graph compiled with ``dynamic=True``.
    """
    ctx = torch._guards.TracingContext.try_get()
    if ctx is None or ctx.fake_mode is None:
        return tensors
    return [ctx.fake_mode.from_tensor(t, static_shapes=True) for t in tensors]
