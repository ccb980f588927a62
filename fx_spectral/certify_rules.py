r"""Lipschitz factors of the elementary ops :func:`fx_spectral.certify` composes (l2 -> l2, per example).

Every factor here is an upper bound of the op's Lipschitz constant with a stated reason:

* elementwise activations: the largest slope (``sup |f'|``), from the one table in
  :mod:`fx_spectral.lipschitz` (re-exported here): exact where it is a simple number, else computed
  in float64 and rounded up (GELU: :math:`\Phi(\sqrt2)+\sqrt2\,\varphi(\sqrt2) = 1.1289`,
  attained at :math:`x=\sqrt2`; SiLU: 1.0998; tanh-GELU: 1.1290);
* max pooling: :math:`|\max_w a - \max_w b| \le \max_w |a-b|`, so
  :math:`\lVert y(a)-y(b)\rVert^2 \le \sum_m c_m (a_m-b_m)^2 \le c_{\max}\lVert a-b\rVert^2` with
  :math:`c_m` the number of windows holding entry ``m``: factor :math:`\sqrt{c_{\max}}` (1 for
  non-overlapping windows); the count is separable, so the product over dims;
* average pooling (fixed or adaptive windows, any divisor rule): a linear map that is a Kronecker
  product of one small averaging matrix per spatial dim, the same for every channel, so its norm
  is the product of those matrices' exact largest singular values;
* a mean over ``c`` entries: :math:`1/\sqrt c`; a sum: :math:`\sqrt c`;
* reflect / replicate / circular padding: :math:`\sqrt{\text{max copies}}` per dim.

:func:`canonical` maps a graph node to one op name and its bound arguments, whether the model
wrote the op as a function, a Tensor method or (under ``torch.export``) an aten op.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

from fx_spectral.conv_bounds import SVD_MARGIN, padding_map_norm
from fx_spectral.lipschitz import GELU_SLOPE, GELU_TANH_SLOPE, SELU_SLOPE, SILU_SLOPE, activation_module_slope

__all__ = [
    "INPLACE_OPS",
    "SHAPE_OPS",
    "GELU_SLOPE",
    "GELU_TANH_SLOPE",
    "SILU_SLOPE",
    "SELU_SLOPE",
    "activation_module_slope",
    "adaptive_windows",
    "avg_pool_factor",
    "canonical",
    "family",
    "max_pool_factor",
    "padding_map_norm",
]

_MARGIN = 1e-12


#: Largest slope of the functional activations, by canonical name; ``kw`` holds the bound arguments.
FUNCTION_SLOPES = {
    "relu": lambda kw: 1.0,
    "relu6": lambda kw: 1.0,
    "tanh": lambda kw: 1.0,
    "hardtanh": lambda kw: 1.0,
    "softsign": lambda kw: 1.0,
    "softplus": lambda kw: 1.0,
    "abs": lambda kw: 1.0,
    "clamp": lambda kw: 1.0,
    "clip": lambda kw: 1.0,
    "clamp_min": lambda kw: 1.0,
    "clamp_max": lambda kw: 1.0,
    "logsigmoid": lambda kw: 1.0,
    "sigmoid": lambda kw: 0.25,
    "hardsigmoid": lambda kw: 1 / 6,
    "hardswish": lambda kw: 1.5,
    "silu": lambda kw: SILU_SLOPE,
    "gelu": lambda kw: GELU_TANH_SLOPE if kw.get("approximate", "none") == "tanh" else GELU_SLOPE,
    "leaky_relu": lambda kw: max(1.0, abs(float(kw.get("negative_slope", 0.01)))),
    "elu": lambda kw: max(1.0, float(kw.get("alpha", 1.0))),
    "selu": lambda kw: SELU_SLOPE,
    "celu": lambda kw: 1.0,
}


def _windows(n: int, n_out: int, k: int, s: int, p: int, d: int = 1) -> list[list[int]]:
    """Input positions of each output window (padding positions dropped)."""
    return [[t * s - p + j * d for j in range(k) if 0 <= t * s - p + j * d < n] for t in range(n_out)]


def adaptive_windows(n: int, n_out: int) -> list[list[int]]:
    """torch's adaptive pooling windows: ``[floor(t n / m), ceil((t+1) n / m))``."""
    return [list(range((t * n) // n_out, -((-(t + 1) * n) // n_out))) for t in range(n_out)]


def max_pool_factor(windows_per_dim: list[list[list[int]]], sizes: list[int]) -> float:
    """``sqrt`` of the largest number of windows sharing an input entry (separable: product over dims)."""
    out = 1
    for wins, n in zip(windows_per_dim, sizes):
        counts = [0] * n
        for w in wins:
            for m in w:
                counts[m] += 1
        out *= max(counts)
    return math.sqrt(out)


def avg_pool_matrices(windows_per_dim, sizes, divisors_per_dim) -> list[torch.Tensor]:
    mats = []
    for wins, n, divs in zip(windows_per_dim, sizes, divisors_per_dim):
        P = torch.zeros(len(wins), n, dtype=torch.float64)
        for t, (w, dv) in enumerate(zip(wins, divs)):
            P[t, w] = 1.0 / dv
        mats.append(P)
    return mats


def avg_pool_factor(mats: list[torch.Tensor], scale: float = 1.0) -> float:
    """Exact norm of the Kronecker product ``scale * (P_1 x ... x P_D)`` (+ the SVD margin)."""
    return scale * math.prod(float(torch.linalg.matrix_norm(P, ord=2)) for P in mats) * (1 + SVD_MARGIN)


def pool_windows(kind: str, n: int, n_out: int, k: int, s: int, p: int, d: int, count_include_pad: bool):
    """(windows, divisors) of one dim of max / avg pooling, as torch computes them."""
    wins = _windows(n, n_out, k, s, p, d)
    if kind == "max":
        return wins, None
    divs = []
    for t, w in enumerate(wins):
        start = t * s - p
        end = min(start + k, n + p)
        divs.append(max(end - start, 1) if count_include_pad else max(len(w), 1))
    return wins, divs


# --------------------------------------------------------------------------------------------
# Canonical op names: one name per op, whichever way the model spells it
# --------------------------------------------------------------------------------------------

# Canonical names of torch callables (functional, torch.*, operator.*).
_FUNCS: dict = {}
for _name in ("relu", "relu6", "tanh", "sigmoid", "hardtanh", "softsign", "softplus", "silu", "gelu", "leaky_relu",
              "elu", "selu", "celu", "logsigmoid", "hardsigmoid", "hardswish", "linear", "batch_norm", "pad",
              "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
              "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
              "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
              "adaptive_max_pool2d", "adaptive_max_pool3d", "dropout", "dropout1d", "dropout2d", "dropout3d",
              "alpha_dropout", "feature_alpha_dropout"):
    if hasattr(F, _name):
        _FUNCS[getattr(F, _name)] = _name
for _name in ("relu", "tanh", "sigmoid", "abs", "clamp", "clip", "clamp_min", "clamp_max", "add", "sub", "mul",
              "div", "neg", "flatten", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "cat", "concat",
              "stack", "mean", "sum", "matmul", "clone", "movedim", "swapaxes", "dropout", "selu", "celu", "sort",
              "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
    _FUNCS.setdefault(getattr(torch, _name), _name)
_FUNCS.update({getattr: "getattr",
               operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
               operator.neg: "neg", operator.getitem: "getitem", operator.matmul: "matmul",
               operator.iadd: "add", operator.imul: "mul", operator.isub: "sub", operator.itruediv: "div"})

# Positional parameter names of the torch-level spellings (aten ops bind through their schema).
_PARAMS = {
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "linear": ("input", "weight", "bias"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "max_pool": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "adaptive": ("input", "output_size"),
    "leaky_relu": ("input", "negative_slope"),
    "elu": ("input", "alpha"),
    "gelu": ("input", "approximate"),
    "dropout": ("input", "p", "training"),
    "pad": ("input", "pad", "mode", "value"),
    "add": ("input", "other", "alpha"),
    "sub": ("input", "other", "alpha"),
    "mul": ("input", "other"),
    "div": ("input", "other"),
    "cat": ("tensors", "dim"),
    "stack": ("tensors", "dim"),
    "mean": ("input", "dim", "keepdim"),
    "sum": ("input", "dim", "keepdim"),
    "matmul": ("input", "other"),
    "transpose": ("input", "dim0", "dim1"),
    "getitem": ("input", "index"),
    "sort": ("input", "dim", "descending"),
    "getattr": ("input", "attr"),
}


def family(name: str) -> str:
    for fam in ("conv_transpose", "conv", "max_pool", "avg_pool", "adaptive", "dropout"):
        if name.startswith(fam) or (fam == "dropout" and "dropout" in name):
            return fam
    return {"concat": "cat", "swapaxes": "transpose"}.get(name, name)


def canonical(node: torch.fx.Node) -> tuple[str, dict]:
    """(canonical op name, bound arguments) of a call_function / call_method node."""
    if node.op == "call_method":
        name = node.target
        args = node.args
        kwargs = dict(node.kwargs)
    elif isinstance(node.target, torch._ops.OpOverload):
        name = node.target.overloadpacket.__name__
        name = {"_native_batch_norm_legit_no_training": "batch_norm_no_training", "_to_copy": "clone",
                "_unsafe_view": "view", "max_pool2d_with_indices": "max_pool2d", "alias": "clone",
                "max_pool1d_with_indices": "max_pool1d", "max_pool3d_with_indices": "max_pool3d",
                "_adaptive_avg_pool2d": "adaptive_avg_pool2d", "t": "transpose2d"}.get(name, name)
        bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        kw = dict(bound.kwargs) if bound is not None else {}
        for a, b in (("self", "input"), ("train", "training"), ("dim0", "dim0")):
            if a in kw:
                kw[b] = kw.pop(a)
        return name, kw
    else:
        name = _FUNCS.get(node.target) or getattr(node.target, "__name__", str(node.target))
        args, kwargs = node.args, dict(node.kwargs)
    params = _PARAMS.get(family(name), ())
    kw = dict(zip(params, args)) if params else {"input": args[0] if args else None, "args": args[1:]}
    kw.update(kwargs)
    if name in ("permute", "view", "reshape", "flatten", "squeeze", "unsqueeze", "movedim", "expand", "repeat"):
        kw["args"] = args[1:]
    return name, kw


SHAPE_OPS = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "contiguous", "clone", "float", "double",
              "to", "type_as", "detach", "permute", "transpose", "movedim", "transpose2d", "unflatten",
              "view_as", "reshape_as"}


INPLACE_OPS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
