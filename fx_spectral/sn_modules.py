"""Eager spectral normalization, the generated subclasses: how a module becomes spectral.

Part of :mod:`fx_spectral.nn` (which re-exports every name here). :func:`_spectral_class` builds
(and caches) the subclass ``Spectral{Base}`` of a module's class whose ``forward`` feeds the
normalized weight to the op: the fused forwards of :mod:`fx_spectral.sn_autograd` for stock
Linear / Conv / ConvTranspose, the operator-mode forwards of :mod:`fx_spectral.sn_operator`, or a
generic forward that serves ``W / sigma`` through a property while the base ``forward`` runs. The
subclass also keeps u/v float32 under ``.to(dtype)``, materializes Lazy modules' u/v, pickles and
deep-copies by the importable base class (:func:`_rebuild`), and saves/loads operator-mode u/v.

Example::

    >>> cls = _spectral_class(nn.Linear, ("weight",))
    >>> cls.__name__, cls.__mro__[1] is nn.Linear
    ('SpectralLinear', True)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, is_lazy

from fx_spectral import power as P
from fx_spectral.kinds import CONV, CONV_TRANSPOSE, LINEAR, stock_kind
from fx_spectral.sn_autograd import conv_forward as _conv_forward
from fx_spectral.sn_autograd import conv_transpose_forward as _conv_transpose_forward
from fx_spectral.sn_autograd import linear_forward as _linear_forward
from fx_spectral.sn_autograd import sn_weight as _sn_weight
from fx_spectral.sn_operator import OPERATOR_FORWARD as _OPERATOR_FORWARD
from fx_spectral.sn_operator import materialize_operator_uv as _materialize_operator_uv

_CONV_T = CONV_TRANSPOSE.module_types


def _operator_save_to_state_dict(self, destination, prefix, keep_vars):
    # Before the first forward u/v are uninitialized: save them as they are (as the Lazy modules do).
    if not is_lazy(self._buffers["weight_u"]):
        return self._sn_base._save_to_state_dict(self, destination, prefix, keep_vars)
    with _uv_set_aside(self) as uv:
        self._sn_base._save_to_state_dict(self, destination, prefix, keep_vars)
    for key in ("weight_u", "weight_v"):
        destination[prefix + key] = uv[key]


def _operator_load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
    # A module that has not run yet has lazy u/v: take their shape (the input shape) from the checkpoint.
    for key in ("weight_u", "weight_v"):
        buf, src = self._buffers.get(key), state_dict.get(prefix + key)
        if buf is not None and is_lazy(buf) and isinstance(src, Tensor):
            # NB: materializes the buffer in place; the base class then copies the values.
            buf.materialize(src.shape, device=buf.device, dtype=torch.float32)
    return self._sn_base._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


def _generic_forward(self, *args, **kwargs):
    # NB: the normalized weights are served by the class properties while forward runs.
    self.__dict__["_sn_active"] = {name: _sn_weight(self, name) for name in self._sn_params}
    try:
        return self._sn_base_forward(*args, **kwargs)
    finally:
        del self.__dict__["_sn_active"]


def _param_property(name: str) -> property:
    def fget(self):
        active = self.__dict__.get("_sn_active")
        return active[name] if active is not None else self._parameters[name]

    return property(fget, doc=f"raw parameter {name!r}; W / sigma while forward runs")


def _fast_forward(base: type[nn.Module]) -> Callable | None:
    """The fused forward for an unmodified Linear / Conv / ConvTranspose class, else None."""
    fused = {LINEAR: _linear_forward, CONV: _conv_forward, CONV_TRANSPOSE: _conv_transpose_forward}
    return fused.get(stock_kind(base))


def _rebuild(base: type[nn.Module], names: tuple[str, ...], operator: bool = False) -> nn.Module:
    cls = _spectral_class(base, names, operator)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    # Pickle / deepcopy by the importable base class, not the generated subclass. The state goes
    # in the third slot so copy/pickle memoize the new object before copying the state: an un-run
    # Lazy module's hooks are bound methods of the module itself.
    return _rebuild, (self._sn_base, self._sn_class_names, self._sn_operator), self.__getstate__()


class _LazyUV(UninitializedBuffer):
    """The u/v of a Lazy module that has not run yet. Unlike UninitializedBuffer it can be
    deep-copied (as UninitializedParameter can), so an un-run model can be copied."""

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            memo[id(self)] = type(self)(device=self.device, dtype=self.dtype)
        return memo[id(self)]


def _initialize_parameters(self, *args, **kwargs):
    # Lazy modules: materialize u/v right after the weight, before LazyModuleMixin checks that
    # nothing is left uninitialized (and before the first normalized forward).
    # u/v leave _buffers while the base initializes: the Lazy modules skip reset_parameters()
    # while anything (our u/v included) is still uninitialized.
    with _uv_set_aside(self) as uv:
        self._sn_base.initialize_parameters(self, *args, **kwargs)
    for name, cfg in self._sn_params.items():
        if is_lazy(uv[name + "_u"]) and cfg.mode == "operator":
            input = args[0] if args else kwargs["input"]
            n = len(self.kernel_size)
            output_padding = None
            if isinstance(self, _CONV_T):
                output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
                output_padding = tuple(self._output_padding(
                    input, output_size, self.stride, self.padding, self.kernel_size, n, self.dilation
                ))
            _materialize_operator_uv(self, tuple(input.shape[-n:]), output_padding)
        elif is_lazy(uv[name + "_u"]):
            u, v = P.init_uv(self._parameters[name], cfg.dim, cfg.eps)
            for buf, val in ((uv[name + "_u"], u), (uv[name + "_v"], v)):
                buf.materialize(val.shape, device=val.device, dtype=torch.float32)
                buf.copy_(val)


@contextlib.contextmanager
def _uv_set_aside(module: nn.Module):
    """Take the u/v buffers out of ``module._buffers`` for the duration; yields them by key."""
    # NB: mutates module._buffers; restores it (in its original order) even on error.
    keys = list(module._buffers)
    uv = {k: module._buffers.pop(k) for n in module._sn_params for k in (n + "_u", n + "_v")}
    try:
        yield uv
    finally:
        rest = module._buffers
        module._buffers = {k: uv[k] if k in uv else rest[k] for k in keys}


def _apply(self, fn, recurse=True):
    # u/v stay float32 under .to(dtype) / .half(): move them by device only, never through fn's
    # dtype (a round trip through fp16 would lose their precision).
    with _uv_set_aside(self) as uv:
        self._sn_base._apply(self, fn, recurse)
        for k, b in uv.items():
            device = fn(b).device
            if is_lazy(b):
                uv[k] = _LazyUV(device=device, dtype=torch.float32)
            elif b.is_meta and device.type != "meta":
                # to_empty() after a meta-device build: there are no values to move. Restart from
                # the uniform unit vector; the training forwards' power iteration converges from it.
                uv[k] = torch.full(b.shape, max(b.numel(), 1) ** -0.5, dtype=torch.float32, device=device)
            else:
                uv[k] = b.to(device)
    return self


@functools.cache
def _spectral_class(base: type[nn.Module], names: tuple[str, ...], operator: bool = False) -> type[nn.Module]:
    """The cached subclass of ``base`` that normalizes ``names`` in forward (``operator``: operator mode)."""
    ns: dict = {
        "_sn_base": base, "_sn_class_names": names, "_sn_operator": operator, "__reduce_ex__": _reduce_ex,
        "_apply": _apply, "__module__": base.__module__,
    }
    fast = _fast_forward(base) if names == ("weight",) else None
    if operator:
        ns["forward"] = _OPERATOR_FORWARD[fast]
        ns["_load_from_state_dict"] = _operator_load_from_state_dict
        ns["_save_to_state_dict"] = _operator_save_to_state_dict
    elif fast is not None:
        ns["forward"] = fast
    else:
        ns["forward"] = _generic_forward
        ns["_sn_base_forward"] = base.forward
        ns.update({name: _param_property(name) for name in names})
    if issubclass(base, LazyModuleMixin):
        ns["initialize_parameters"] = _initialize_parameters
        if base.cls_to_become is not None:
            ns["cls_to_become"] = _spectral_class(base.cls_to_become, names, operator)
    return type(f"Spectral{base.__name__}", (base,), ns)


def _base_class(module: nn.Module) -> type[nn.Module]:
    return getattr(type(module), "_sn_base", type(module))


def _swap_class(module: nn.Module) -> None:
    params = module.__dict__.get("_sn_params", {})
    operator = any(cfg.mode == "operator" for cfg in params.values())
    module.__class__ = _spectral_class(_base_class(module), tuple(params), operator) if params else _base_class(module)

