r"""Eager spectral normalization: a faster, more complete ``torch.nn.utils.parametrizations.spectral_norm``.

It needs torch, the standard library, :mod:`fx_spectral.kinds` (the table of weight kinds: which
modules are Linear / Conv / ConvTranspose, their ``dim`` and matrix view) and :mod:`fx_spectral.power`
(the power iteration, its constants and the u/v rule). The rest of fx_spectral builds on its math
(:func:`normalize_weight`).

This module is the public API and its argument checks; the work lives in three modules it imports
and re-exports (every name stays reachable as ``fx_spectral.nn.<name>``):
:mod:`fx_spectral.sn_autograd` (``W / sigma``, sigma's estimate, the autograd Functions, the fused
forwards), :mod:`fx_spectral.sn_operator` (operator mode) and :mod:`fx_spectral.sn_modules` (the
generated ``Spectral{Base}`` subclasses: class swap, Lazy modules, ``.to()``, pickling).

.. math::
    \bar W = \frac{W}{\sigma(W)}, \qquad
    u \leftarrow \frac{W v}{\lVert W v \rVert},\quad
    v \leftarrow \frac{W^\top u}{\lVert W^\top u \rVert},\quad
    \sigma = u^\top W v

State layout (shared with the graph transform and the backend): the raw parameter keeps its name
and its object identity; the power-iteration vectors are float32 buffers ``{name}_u`` and
``{name}_v`` on the module that owns the parameter. ``module.weight`` stays the raw parameter
outside ``forward``; inside ``forward`` the module computes with ``W / sigma``.

Operator mode (``mode="operator"``, Conv/ConvTranspose 1-3d): sigma is the norm of the convolution
as a linear map of one example, :math:`\sigma = \langle u, A(W) v\rangle`, by the same power iteration
on the conv and its adjoint, with u/v shaped like one output/input example (same buffer names).

How it works: the module's class is swapped for a cached subclass whose ``forward`` feeds the
normalized weight to the op (Linear, Conv, ConvTranspose: straight into the functional op; any
other module: through a property that serves the normalized weight while ``forward`` runs). No
hooks, no parametrization containers: one power-iteration update per training forward.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from fx_spectral import power as P
from fx_spectral.kinds import (
    CONV,
    CONV_TRANSPOSE,
    LINEAR,
    MODULE_TYPES,
    default_dim,
    kind_of,
    weight_matrix,
)

# The implementation modules; every name they define was defined here before the split and stays
# importable from fx_spectral.nn (the graph pass, tests and old pickles use several private ones).
from fx_spectral.sn_autograd import (  # noqa: F401
    _CONV_T_FN,
    _compute_dtype,
    _conv_forward,
    _conv_out_numel,
    _conv_transpose_forward,
    _divide,
    _divide_output,
    _DivideBySigma,
    _estimate_sigma,
    _functorch_active,
    _init_uv,
    _linear_forward,
    _normalize_or_keep,
    _normalize_weight,
    _op_over_sigma,
    _OpOverSigma,
    _power_iteration,
    _recomputing,
    _sigma_with_grad,
    _sn_weight,
    _SNParam,
    normalize_weight,
    power_iteration_,
)
from fx_spectral.sn_modules import (  # noqa: F401
    _apply,
    _base_class,
    _fast_forward,
    _generic_forward,
    _initialize_parameters,
    _LazyUV,
    _operator_load_from_state_dict,
    _operator_save_to_state_dict,
    _param_property,
    _rebuild,
    _reduce_ex,
    _spectral_class,
    _swap_class,
    _uv_set_aside,
)
from fx_spectral.sn_operator import (  # noqa: F401
    _OPERATOR_FORWARD,
    N_OPERATOR_WARMUP_ITERATIONS,
    _buffer_output_padding,
    _conv_operator_forward,
    _conv_transpose_operator_forward,
    _ConvOperator,
    _materialize_operator_uv,
    _op_adjoint,
    _op_apply,
    _op_pad,
    _operator_normalized_weight,
    _operator_of,
    _operator_weight,
    _spec_operator,
    _write_uv_,
    conv_operator_spec,
    operator_init_uv,
    operator_normalized_weight,
)

__all__ = [
    "spectral_norm",
    "remove_spectral_norm",
    "apply_spectral_norm",
    "is_spectral_normalized",
    "spectral_sigma",
    "normalize_weight",
    "power_iteration_",
    "weight_matrix",
    "default_dim",
    "SUPPORTED_MODULES",
    "conv_operator_spec",
    "operator_init_uv",
    "operator_normalized_weight",
]

# torch runs 15 in _SpectralNorm.__init__ plus one more when register_parametrization checks the
# parametrization with a training forward: 16 gives torch's initial u/v for the same RNG state.
N_WARMUP_ITERATIONS = P.N_INIT

_LINEAR = LINEAR.module_types
_CONV = CONV.module_types
_CONV_T = CONV_TRANSPOSE.module_types
#: Module types :func:`apply_spectral_norm` normalizes (their Lazy variants subclass these): the
#: default-selected kinds of :mod:`fx_spectral.kinds`.
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = MODULE_TYPES


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _names(name: str | Iterable[str], where: str) -> tuple[str, ...]:
    names = (name,) if isinstance(name, str) else tuple(name) if isinstance(name, (tuple, list)) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{where}: expected `name` to be a parameter name or a tuple of names, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: `name` lists a parameter twice: {names!r}")
    return names


def _check_options(n_power_iterations: int, eps: float, where: str) -> None:
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int):
        raise TypeError(f"{where}: expected n_power_iterations to be an int >= 1, got {n_power_iterations!r}")
    if n_power_iterations < 1:
        raise ValueError(f"{where}: expected n_power_iterations >= 1, got {n_power_iterations}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{where}: expected eps to be a positive float, got {eps!r}")
    # eps only guards divisions by ~0 (vector norms, sigma): a value near a real sigma would freeze
    # u/v and replace sigma by eps, so it must be finite and well below 1.
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(f"{where}: expected eps > 0, finite and < 1 (a guard against division by ~0; "
                         f"default 1e-12), got {eps}")


def _check_mode(mode: str, where: str) -> None:
    if mode not in ("matrix", "operator"):
        raise ValueError(f"{where}: expected mode 'matrix' (the reshaped weight's norm, torch's) or 'operator' "
                         f"(the convolution operator's norm), got {mode!r}")


def _operator_config(module: nn.Module, name: str, dim: int | None, input_shape, where: str) -> str:
    """Validate operator mode for ``module``; return the effective mode ("matrix" for Linear)."""
    kind = type(module).__name__
    wkind = kind_of(module)
    if wkind is LINEAR:
        # A Linear's operator is its weight matrix: operator mode is matrix mode.
        if input_shape is not None and (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 1
                                        or (module.in_features and tuple(input_shape) != (module.in_features,))):
            raise ValueError(f"{where}: input_shape of {kind} must be (in_features,) = ({module.in_features},), "
                             f"got {input_shape!r}")
        return "matrix"
    if wkind is None or wkind.operator_norm != "conv" or _fast_forward(_base_class(module)) is None:
        raise ValueError(
            f"{where}: mode='operator' needs a Linear, Conv1-3d or ConvTranspose1-3d (or Lazy variant) with the "
            f"stock forward, got {kind}; use mode='matrix' or skip it (apply_spectral_norm's filter_fn)"
        )
    if name != "weight":
        raise ValueError(f"{where}: mode='operator' normalizes the 'weight' of {kind}, got name {name!r}")
    if dim is not None and dim != default_dim(module):
        raise ValueError(f"{where}: mode='operator' fixes dim (the operator has no reshaping), got dim={dim}")
    if module.__dict__.get("_sn_params"):
        raise ValueError(f"{where}: {kind} already has spectral-normalized parameters "
                         f"{list(module._sn_params)}; operator mode normalizes the weight alone")
    n = len(module.kernel_size)
    if input_shape is not None:
        if is_lazy(module.weight):
            raise ValueError(f"{where}: input_shape cannot be given for an uninitialized {kind}; its u/v are "
                             "created at the first forward")
        ok = (isinstance(input_shape, (tuple, list)) and len(input_shape) == n + 1
              and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in input_shape)
              and input_shape[0] == module.in_channels)
        if not ok:
            raise ValueError(f"{where}: expected input_shape = (in_channels, *spatial) = ({module.in_channels}, "
                             f"{n} positive ints) for {kind}, one example without the batch dimension; "
                             f"got {input_shape!r}")
    return "operator"


def _param_config(
    module: nn.Module, name: str, dim: int | None, n_iter: int, eps: float, where: str,
    mode: str = "matrix", input_shape=None,
) -> _SNParam:
    """Validate one parameter of ``module`` and return its configuration (no mutation)."""
    kind = type(module).__name__
    _check_mode(mode, where)
    if any(cfg.mode == "operator" for cfg in module.__dict__.get("_sn_params", {}).values()):
        raise ValueError(f"{where}: {kind}'s weight is normalized in operator mode; no other parameter can be "
                         "added (remove it first)")
    param = module._parameters.get(name) if name in module._parameters else None
    if param is None and parametrize.is_parametrized(module, name):
        found = ", ".join(type(p).__name__ for p in module.parametrizations[name])
        torch_sn = " (torch's own parametrizations.spectral_norm)" if "_SpectralNorm" in found else ""
        raise ValueError(
            f"{where}: parameter {name!r} of {kind} is already parametrized with torch.nn.utils.parametrize: "
            f"{found}{torch_sn}; the module has no plain parameter {name!r} to normalize. "
            "Remove torch's parametrization first: "
            f"torch.nn.utils.parametrize.remove_parametrizations(module, {name!r}) (it keeps the current "
            "normalized value as the plain weight), then apply fx_spectral"
        )
    if param is None:
        found = [n for n, p in module.named_parameters(recurse=False)]
        raise ValueError(
            f"{where}: {kind} has no parameter {name!r}; expected one of {found} "
            "(spectral_norm normalizes a module's own parameters, not its children's)"
        )
    if is_spectral_normalized(module, name):
        raise ValueError(f"{where}: parameter {name!r} of {kind} is already spectral-normalized; remove it first")
    taken = [n for n in (name + "_u", name + "_v") if hasattr(module, n)]
    if taken:
        raise ValueError(
            f"{where}: {kind} already has an attribute {taken[0]!r}, where the power-iteration vector goes"
        )
    if is_lazy(param):
        deferrable = getattr(kind_of(module), "lazy_deferrable", False)
        if not (deferrable and isinstance(module, LazyModuleMixin) and name == "weight"):
            raise ValueError(
                f"{where}: parameter {name!r} of {kind} is uninitialized and its shape cannot be checked; "
                "run one forward first (only the weight of the Lazy Linear/Conv/ConvTranspose modules can be deferred)"
            )
        ndim = len(module.kernel_size) + 2 if hasattr(module, "kernel_size") else 2
    else:
        if not param.dtype.is_floating_point:
            raise TypeError(
                f"{where}: parameter {name!r} of {kind} must be a real floating-point tensor, got dtype {param.dtype}"
            )
        ndim = param.dim()
        if ndim < 2:
            raise ValueError(
                f"{where}: parameter {name!r} of {kind} must have at least 2 dimensions to have a spectral norm, "
                f"got shape {tuple(param.shape)}"
            )
    if dim is None:
        dim = default_dim(module)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{where}: expected dim to be an int or None, got {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{where}: dim {dim} is out of range for parameter {name!r} of {kind} with {ndim} dimensions")
    if mode == "operator":
        mode = _operator_config(module, name, dim % ndim, input_shape, where)
    elif input_shape is not None:
        raise ValueError(f"{where}: input_shape is only used with mode='operator', got mode={mode!r}")
    return _SNParam(dim % ndim, n_iter, eps, mode, where)


def _attach(module: nn.Module, configs: dict[str, _SNParam], input_shape=None) -> None:
    """Create u/v and swap the class. Everything that can fail has been checked already."""
    # NB: mutates module in place: buffers {name}_u/{name}_v, _sn_params, __class__.
    params = dict(module.__dict__.get("_sn_params", {}))
    for name, cfg in configs.items():
        weight = module._parameters[name]
        if is_lazy(weight) or cfg.mode == "operator":
            # operator mode: u/v are shaped like one input/output example, known at the first forward.
            module.register_buffer(name + "_u", _LazyUV(dtype=torch.float32))
            module.register_buffer(name + "_v", _LazyUV(dtype=torch.float32))
        else:
            # _param_config refused any existing {name}_u/_v: this creates them (the rule all ways in share).
            P.ensure_uv(module, name, weight, cfg.dim, cfg.eps, cfg.where)
        params[name] = cfg
    module.__dict__["_sn_params"] = params
    _swap_class(module)
    if params.get("weight") is not None and params["weight"].mode == "operator" and input_shape is not None:
        out_pad = tuple(module.output_padding) if isinstance(module, _CONV_T) else None
        _materialize_operator_uv(module, tuple(input_shape[1:]), out_pad)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def spectral_norm(
    module: nn.Module,
    name: str | tuple[str, ...] = "weight",
    *,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    mode: str = "matrix",
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    r"""Spectral-normalize parameter(s) ``name`` of ``module`` in place and return the module.

    .. math:: \bar W = W / \sigma(W), \quad \sigma(W) \approx \lVert W_{mat} \rVert_2

    ``W_mat`` is the weight with ``dim`` moved first and the rest flattened. Sigma is estimated by
    power iteration on float32 buffers ``{name}_u`` / ``{name}_v`` (16 warm-up steps at creation,
    as torch ends up with, then ``n_power_iterations`` per training forward, none in eval). With the same u/v, outputs,
    gradients and u/v equal those of ``torch.nn.utils.parametrizations.spectral_norm``.

    Args:
        module: any module; Linear, Conv1-3d, ConvTranspose1-3d and their Lazy variants get a fused
            forward (Lazy ones get u/v at their first forward).
        name: a parameter name or a tuple of names (each gets its own u/v). Default ``"weight"``.
        n_power_iterations: power-iteration steps per training forward. Default 1.
        eps: guard for the vector norms and for sigma against division by ~0; finite, 0 < eps < 1.
            Default 1e-12.
        dim: the output dimension. Default 0, or 1 for ConvTranspose.
        mode: ``"matrix"`` (default, torch's): sigma of the reshaped weight. ``"operator"``
            (Conv/ConvTranspose 1-3d): sigma of the convolution as a linear map of one input example,
            :math:`\sigma = \langle u, A(W) v\rangle` by power iteration on the conv and its adjoint, with
            ``{name}_v`` shaped ``(C_in, *spatial_in)`` and ``{name}_u`` ``(C_out, *spatial_out)``; then
            ``module`` is 1-Lipschitz per example. The input shape is taken at the first forward (or
            from ``input_shape``); another input shape later raises ValueError. For Linear both modes
            are the same.
        input_shape: operator mode: one example's shape without the batch dimension,
            ``(C_in, *spatial)``, to create u/v now instead of at the first forward.

    Returns:
        ``module``, whose raw parameters keep their names and identity.

    Example::

        >>> m = spectral_norm(nn.Linear(20, 40))
        >>> sorted(m.state_dict())
        ['bias', 'weight', 'weight_u', 'weight_v']
    """
    return _spectral_norm(module, name, n_power_iterations, eps, dim, where=type(module).__name__, mode=mode,
                          input_shape=input_shape)


def _spectral_norm(module, name, n_power_iterations, eps, dim, where, mode="matrix", input_shape=None):
    if not isinstance(module, nn.Module):
        raise TypeError(f"spectral_norm: expected an nn.Module, got {type(module).__name__}")
    names = _names(name, where)
    _check_options(n_power_iterations, eps, where)
    configs = {
        n: _param_config(module, n, dim, n_power_iterations, eps, f"{where}.{n}", mode, input_shape) for n in names
    }
    _attach(module, configs, input_shape)
    return module


def remove_spectral_norm(module: nn.Module, name: str | tuple[str, ...] = "weight", *, bake: bool = True) -> nn.Module:
    """Remove spectral normalization of ``name`` from ``module`` and return the module.

    Args:
        module: a module normalized by :func:`spectral_norm`.
        name: a parameter name or a tuple of names. Default ``"weight"``.
        bake: if True (default), write ``W / sigma`` (current u/v, no update) into the raw parameter,
            in place, so the module computes what it computed before (torch's
            ``leave_parametrized=True``). If False, the raw weight is left as is.
    """
    where = type(module).__name__
    names = _names(name, where)
    for n in names:
        if not is_spectral_normalized(module, n):
            raise ValueError(f"{where}.{n}: parameter {n!r} of {where} is not spectral-normalized")
        if bake and not is_lazy(module._parameters[n]) and is_lazy(module._buffers[n + "_u"]):
            raise ValueError(f"{where}.{n}: the operator-mode u/v of {where} do not exist before the first forward, "
                             "so there is no sigma to bake; run a forward first or pass bake=False")
    params = dict(module._sn_params)
    for n in names:
        if bake and not is_lazy(module._parameters[n]):
            with torch.no_grad():
                # NB: in place, so the Parameter object (and the optimizer holding it) survives.
                module._parameters[n].copy_(_normalized_now(module, n))
        del module._buffers[n + "_u"], module._buffers[n + "_v"]
        del params[n]
    if params:
        module.__dict__["_sn_params"] = params
    else:
        del module.__dict__["_sn_params"]
    _swap_class(module)
    return module


def _normalized_now(module: nn.Module, name: str = "weight") -> Tensor:
    """``W / sigma`` with the current u/v, no update, no grad."""
    with torch.no_grad():
        cfg = module._sn_params[name]
        if cfg.mode == "operator":
            return _operator_normalized_weight(module, training=False)
        return normalize_weight(
            module._parameters[name], module._buffers[name + "_u"], module._buffers[name + "_v"],
            dim=cfg.dim, eps=cfg.eps, training=False,
        )


def apply_spectral_norm(
    model: nn.Module,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    name: str | tuple[str, ...] = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    mode: str = "matrix",
) -> list[str]:
    """Spectral-normalize every supported submodule of ``model`` (recursively, ``model`` included).

    Supported: Linear, Conv1-3d, ConvTranspose1-3d, their subclasses and Lazy variants (a model
    that has never run is fine). Parameters already normalized are skipped. Everything is
    validated before anything changes: on error the model is left as it was.

    Args:
        model: the root module.
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks which supported modules to normalize.
        name, n_power_iterations, eps, mode: as in :func:`spectral_norm` (operator mode: each conv's
            u/v are created at its first forward, for that forward's input shape).

    Returns:
        the FQNs of the parameters normalized now, e.g. ``["0.weight", "2.weight"]``.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LazyLinear(2))
        >>> apply_spectral_norm(model)
        ['0.weight', '2.weight']
    """
    names = _names(name, "apply_spectral_norm")
    _check_options(n_power_iterations, eps, "apply_spectral_norm")
    plan: list[tuple[nn.Module, dict[str, _SNParam]]] = []
    done: list[str] = []
    # MultiheadAttention reads out_proj.weight itself (F.multi_head_attention_forward), never
    # calling out_proj: normalizing it here would change nothing, so say so instead.
    read_by_parent = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for fqn, module in model.named_modules():
        wkind = kind_of(module)
        if wkind is None or not wkind.default_selected or (filter_fn is not None and not filter_fn(module, fqn)):
            continue
        if id(module) in read_by_parent:
            warnings.warn(
                f"apply_spectral_norm: skipping {fqn!r}: MultiheadAttention reads its weight directly, so the "
                "eager API cannot normalize it; use torch.compile(model, backend='spectral') for such models",
                stacklevel=2,
            )
            continue
        todo = [n for n in names if not is_spectral_normalized(module, n)]
        where = fqn or type(module).__name__
        configs = {n: _param_config(module, n, None, n_power_iterations, eps, f"{where}.{n}", mode) for n in todo}
        if configs:
            plan.append((module, configs))
            done += [f"{fqn}.{n}" if fqn else n for n in configs]
    _check_mode(mode, "apply_spectral_norm")  # (each module checked it already, naming its path)
    for module, configs in plan:
        _attach(module, configs)
    return done


def is_spectral_normalized(module: nn.Module, name: str = "weight") -> bool:
    """True if parameter ``name`` of ``module`` is spectral-normalized by fx_spectral."""
    return name in module.__dict__.get("_sn_params", ())


def spectral_sigma(module: nn.Module, name: str = "weight") -> Tensor:
    r"""The current float32 estimate of sigma for ``name`` (no power-iteration update, no grad).

    Operator mode: :math:`\langle u, A(W) v\rangle`, the convolution operator's sigma."""
    where = f"{type(module).__name__}.{name}"
    if not is_spectral_normalized(module, name):
        raise ValueError(f"{where}: parameter {name!r} is not spectral-normalized")
    u, v = module._buffers[name + "_u"], module._buffers[name + "_v"]
    if is_lazy(u):
        raise ValueError(f"{where}: the Lazy module has not run yet, so {name!r} has no sigma")
    with torch.no_grad():
        if module._sn_params[name].mode == "operator":
            op = _operator_of(module, _buffer_output_padding(module))
            return torch.sum(u * _op_apply(op, module._parameters[name].float(), v.unsqueeze(0))[0])
        w_mat = weight_matrix(module._parameters[name].float(), module._sn_params[name].dim)
        return torch.dot(u, torch.mv(w_mat, v))


# Argument checks shared with the graph configs (public: graph/config.py calls them).
validate_names = _names
validate_options = _check_options
validate_mode = _check_mode
