r"""Eager spectral normalization, operator mode: sigma of the convolution operator itself.

Part of :mod:`fx_spectral.nn` (which re-exports every name here). For ``mode="operator"``
(Conv/ConvTranspose 1-3d) sigma is the norm of the convolution as a linear map of one example,

.. math:: \sigma_{op} = \langle u, A(W) v\rangle, \quad
          u \leftarrow \frac{A(W) v}{\lVert A(W) v\rVert},\quad
          v \leftarrow \frac{A(W)^\top u}{\lVert A(W)^\top u\rVert}

by power iteration on the conv and its adjoint, with u/v shaped like one output/input example.
Here: the operator and its adjoint, the functional forms the graph pass uses
(:func:`conv_operator_spec`, :func:`operator_init_uv`, :func:`operator_normalized_weight`), and the
operator-mode Conv/ConvTranspose forwards.

Example::

    >>> conv = nn.Conv2d(3, 8, 3, padding=1)
    >>> spec = conv_operator_spec(conv)
    >>> u, v = operator_init_uv(conv.weight, spec, (3, 16, 16))
    >>> w_bar = operator_normalized_weight(conv.weight, u, v, spec, training=False)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import UninitializedTensorMixin

from fx_spectral import power as P
from fx_spectral.kinds import CONV_T_FN as _CONV_T_FN
from fx_spectral.kinds import CONV_TRANSPOSE
from fx_spectral.sn_autograd import (
    SNParam as _SNParam,
)
from fx_spectral.sn_autograd import (
    conv_forward as _conv_forward,
)
from fx_spectral.sn_autograd import (
    conv_transpose_forward as _conv_transpose_forward,
)
from fx_spectral.sn_autograd import (
    functorch_active as _functorch_active,
)
from fx_spectral.sn_autograd import (
    recomputing as _recomputing,
)

# Operator mode: a conv's top singular values lie close together (neighbouring frequencies), so the
# power iteration converges far slower than on the small reshaped kernel; one-example convs are cheap.
N_OPERATOR_WARMUP_ITERATIONS = 100

_CONV_T = CONV_TRANSPOSE.module_types


# --------------------------------------------------------------------------------------------
# Operator mode: sigma of the convolution operator itself
# --------------------------------------------------------------------------------------------
#
# The conv's operator A(W): one input example (C_in, *spatial_in) -> one output example. It is
# an optional padding map P (padding_mode != "zeros", or an asymmetric padding="same") followed by
# aten.convolution with numeric padding; its adjoint is P^T after convolution_backward's input
# gradient (for conv and conv_transpose alike). v is shaped like one input example, u like one
# output example: their shapes fix the operator (for ConvTranspose, u's shape fixes output_padding).


@dataclass(frozen=True)
class _ConvOperator:
    pre_pad: tuple[int, ...] | None  # F.pad amounts, last dim first; None: no padding map
    pad_mode: str  # F.pad mode: "constant", "circular", "reflect", "replicate"
    conv_args: tuple  # aten.convolution's (stride, padding, dilation, transposed, output_padding, groups)


def _operator_of(module: nn.Module, output_padding: tuple[int, ...] | None) -> _ConvOperator:
    n = len(module.kernel_size)
    stride, dilation, groups = tuple(module.stride), tuple(module.dilation), module.groups
    if isinstance(module, _CONV_T):
        args = (stride, tuple(module.padding), dilation, True, tuple(output_padding), groups)
        return _ConvOperator(None, "constant", args)
    zero_args = (stride, (0,) * n, dilation, False, (0,) * n, groups)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return _ConvOperator(None, "constant", zero_args)
        # "same": left = total // 2, right = the rest (torch's split, asymmetric for even kernels).
        lr = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(dilation, module.kernel_size)]
    else:
        if module.padding_mode == "zeros":
            return _ConvOperator(None, "constant", (stride, tuple(module.padding)) + zero_args[2:])
        lr = [(p, p) for p in module.padding]
    pad = tuple(x for pair in reversed(lr) for x in pair)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return _ConvOperator(pad, mode, zero_args)


def _op_pad(op: _ConvOperator, v: Tensor) -> Tensor:
    return v if op.pre_pad is None else F.pad(v, op.pre_pad, mode=op.pad_mode)


def _op_apply(op: _ConvOperator, w: Tensor, v: Tensor) -> Tensor:
    """A(W) v for a batch of one: v (1, C_in, *spatial_in)."""
    return torch.ops.aten.convolution(_op_pad(op, v), w, None, *op.conv_args)


def _op_adjoint(op: _ConvOperator, w: Tensor, u: Tensor, v_like: Tensor) -> Tensor:
    """A(W)^T u, shaped like ``v_like`` (the conv's input gradient, then the padding map's adjoint)."""
    g = torch.ops.aten.convolution_backward(u, _op_pad(op, v_like), w, None, *op.conv_args, [True, False, False])[0]
    if op.pre_pad is None:
        return g
    n = v_like.dim() - 2
    if op.pad_mode in ("reflect", "replicate"):
        kind = "reflection" if op.pad_mode == "reflect" else "replication"
        return getattr(torch.ops.aten, f"{kind}_pad{n}d_backward")(g, v_like, list(op.pre_pad))
    for j in range(n):  # constant / circular, one spatial dim at a time (last dim first, as F.pad)
        d, (left, right), size = g.dim() - 1 - j, op.pre_pad[2 * j: 2 * j + 2], v_like.shape[-1 - j]
        core = g.narrow(d, left, size)
        if op.pad_mode == "circular":
            # the left pad copied x[size-left:], the right pad x[:right]: add their gradients back there.
            lead, tail = list(core.shape), list(core.shape)
            lead[d], tail[d] = size - left, size - right
            core = core + torch.cat([g.new_zeros(lead), g.narrow(d, 0, left)], d)
            core = core + torch.cat([g.narrow(d, left + size, right), g.new_zeros(tail)], d)
        g = core
    return g


def _write_uv_(u_buf: Tensor, v_buf: Tensor, u: Tensor, v: Tensor) -> None:
    # NB: the float32 buffers are updated in place.
    if _functorch_active():
        torch.mul(u, 1, out=u_buf), torch.mul(v, 1, out=v_buf)
    else:
        u_buf.copy_(u)
        v_buf.copy_(v)


def _buffer_output_padding(module: nn.Module) -> tuple[int, ...] | None:
    """ConvTranspose: the output_padding that maps v's spatial shape to u's; None for Conv."""
    if not isinstance(module, _CONV_T):
        return None
    n = len(module.kernel_size)
    pads = []
    for i in range(n):
        length, k, s, p, d = (module.weight_v.shape[1 + i], module.kernel_size[i], module.stride[i],
                              module.padding[i], module.dilation[i])
        pads.append(module.weight_u.shape[1 + i] - ((length - 1) * s - 2 * p + d * (k - 1) + 1))
    return tuple(pads)


@torch.no_grad()
def _materialize_operator_uv(module: nn.Module, spatial: tuple[int, ...], output_padding) -> None:
    """Create u/v for one input example of spatial shape ``spatial``, with the warm-up iterations."""
    # NB: materializes the module's lazy u/v buffers in place.
    cfg: _SNParam = module._sn_params["weight"]
    u, v = operator_init_uv(module.weight, conv_operator_spec(module, output_padding),
                            (module.in_channels, *spatial), cfg.eps)
    for buf, val in ((module.weight_u, u), (module.weight_v, v)):
        buf.materialize(val.shape, device=val.device, dtype=torch.float32)
        buf.copy_(val)


def _operator_normalized_weight(module: nn.Module, training: bool) -> Tensor:
    r"""``W / sigma_op`` with :math:`\sigma_{op} = \langle u, A(W) v\rangle` (u, v constants: the gradient
    of sigma w.r.t. W is the conv's weight gradient for input v and output gradient u)."""
    cfg: _SNParam = module._sn_params["weight"]
    spec = conv_operator_spec(module, _buffer_output_padding(module))
    return operator_normalized_weight(
        module.weight, module.weight_u, module.weight_v, spec,
        n_power_iterations=cfg.n_power_iterations, eps=cfg.eps, training=training,
    )


def conv_operator_spec(module: nn.Module, output_padding: Iterable[int] | None = None) -> tuple:
    """The operator of a Conv/ConvTranspose 1-3d as a plain hashable tuple (for graphs): ``(pre_pad, pad_mode,
    stride, padding, dilation, transposed, output_padding, groups)`` (ints, tuples and a str only).

    ``pre_pad`` is None or the ``F.pad`` amounts of the padding map applied before ``aten.convolution``
    (``padding_mode != "zeros"``, or an asymmetric ``padding="same"``). ``output_padding`` is needed for
    ConvTranspose (the one its forward uses); ignored for Conv.

    Example::

        >>> conv_operator_spec(nn.Conv2d(3, 8, 3, padding=1))
        (None, 'constant', (1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    """
    if isinstance(module, _CONV_T) and output_padding is None:
        output_padding = tuple(module.output_padding)
    op = _operator_of(module, None if output_padding is None else tuple(output_padding))
    return (op.pre_pad, op.pad_mode) + tuple(op.conv_args)


def _spec_operator(spec: tuple) -> _ConvOperator:
    return _ConvOperator(spec[0], spec[1], tuple(spec[2:]))


@torch.no_grad()
def operator_init_uv(weight: Tensor, spec: tuple, input_shape: Iterable[int], eps: float = 1e-12
                     ) -> tuple[Tensor, Tensor]:
    r"""Initial float32 ``(u, v)`` of operator mode for one input example of shape ``input_shape``
    (``(C_in, *spatial)``): random unit vectors, then ``N_OPERATOR_WARMUP_ITERATIONS`` power-iteration
    steps :math:`u \leftarrow A v/\lVert A v\rVert,\ v \leftarrow A^\top u/\lVert A^\top u\rVert` (as
    ``spectral_norm(..., mode="operator")`` does at the first forward). ``spec``: :func:`conv_operator_spec`.

    Returns:
        ``u`` shaped like one output example, ``v`` like one input example (no batch dimension).
    """
    op = _spec_operator(spec)
    weight = weight.detach().float()
    v = F.normalize(weight.new_empty(1, *input_shape).normal_(0, 1).flatten(), dim=0, eps=eps)
    v = v.view(1, *input_shape)
    out = _op_apply(op, weight, v)
    u = F.normalize(torch.randn_like(out).flatten(), dim=0, eps=eps).view_as(out)
    for _ in range(N_OPERATOR_WARMUP_ITERATIONS):
        u, _ = P.normalize_or_keep(_op_apply(op, weight, v), u, eps, dim=None)
        v, _ = P.normalize_or_keep(_op_adjoint(op, weight, u, v), v, eps, dim=None)
    return u[0].contiguous(), v[0].contiguous()


def operator_normalized_weight(
    weight: Tensor, u: Tensor, v: Tensor, spec: tuple, *, n_power_iterations: int = 1, eps: float = 1e-12,
    training: bool = True,
) -> Tensor:
    r"""``W / sigma_op``: the weight of a Conv/ConvTranspose normalized by the norm of its operator.

    .. math:: u \leftarrow \frac{A(W) v}{\lVert A(W) v\rVert},\quad
              v \leftarrow \frac{A(W)^\top u}{\lVert A(W)^\top u\rVert},\quad
              \sigma_{op} = \langle u, A(W) v\rangle,\quad \bar W = W / \sigma_{op}

    The functional form of ``spectral_norm(..., mode="operator")`` (its forward computes exactly this),
    for graphs: ``u``/``v`` are the float32 buffers (one output / input example, no batch dimension),
    ``spec`` is :func:`conv_operator_spec`. Training: ``n_power_iterations`` steps without gradient, then
    NB: ``u``/``v`` are updated in place; sigma is clamped to ``>= eps``. Eval: no update (sigma from
    copies of u/v), ``eps`` only where sigma is exactly 0. The gradient flows through ``W`` in sigma.

    Example::

        >>> conv = nn.Conv2d(3, 8, 3, padding=1)
        >>> spec = conv_operator_spec(conv)
        >>> u, v = operator_init_uv(conv.weight, spec, (3, 16, 16))
        >>> w_bar = operator_normalized_weight(conv.weight, u, v, spec, training=False)
    """
    op = _spec_operator(spec)
    dt = P.compute_dtype(weight.dtype)
    w = weight.to(dt)
    with torch.no_grad():
        wd = w.detach()
        uc, vc = u.to(dt).unsqueeze(0), v.to(dt).unsqueeze(0)
        if training and not _recomputing():  # a checkpoint recompute reuses the forward's u/v
            for _ in range(n_power_iterations):
                uc, _ = P.normalize_or_keep(_op_apply(op, wd, vc), uc, eps, dim=None)
                vc, _ = P.normalize_or_keep(_op_adjoint(op, wd, uc, vc), vc, eps, dim=None)
            _write_uv_(u, v, uc[0], vc[0])
        elif weight.requires_grad and torch.is_grad_enabled():
            # NB: copies saved for backward: a later training forward updates the buffers in place.
            uc, vc = uc.clone(), vc.clone()
        v_in = _op_pad(op, vc)
    sigma = torch.sum(uc * torch.ops.aten.convolution(v_in, w, None, *op.conv_args))
    # Training: sigma = ||A^T u|| >= 0; eval: stale u/v may give any sign, only an exact 0 needs the guard.
    sigma = sigma.clamp_min(eps) if training else torch.where(sigma == 0, eps, sigma)
    return (w / sigma).to(weight.dtype)


def _operator_weight(module: nn.Module, input: Tensor, output_padding: tuple[int, ...] | None) -> Tensor:
    """The normalized weight for this forward: checks (or, at the first forward, sets) the input shape."""
    n = len(module.kernel_size)
    spatial = tuple(input.shape[-n:])
    if isinstance(module.weight_v, UninitializedTensorMixin):  # (is_lazy, in a form dynamo traces)
        if torch.compiler.is_compiling():
            raise RuntimeError(f"{module._sn_params['weight'].where}: operator-mode u/v are created at the "
                               "first forward; run one eager forward (or pass input_shape=) before torch.compile")
        _materialize_operator_uv(module, spatial, output_padding)
    have = tuple(module.weight_v.shape[1:])
    if have != spatial:
        raise ValueError(
            f"{module._sn_params['weight'].where}: operator-mode spectral norm was set up for inputs of spatial "
            f"shape {have} (weight_v has shape {tuple(module.weight_v.shape)}), got an input of spatial shape "
            f"{spatial}; the operator norm depends on the input shape. Re-apply spectral_norm(..., "
            "mode='operator', input_shape=...) for the new shape, or keep the input shape fixed"
        )
    if output_padding is not None and tuple(output_padding) != _buffer_output_padding(module):
        raise ValueError(
            f"{module._sn_params['weight'].where}: operator-mode u/v were set up for output spatial shape "
            f"{tuple(module.weight_u.shape[1:])}; this call's output_size gives output_padding "
            f"{tuple(output_padding)} instead of {_buffer_output_padding(module)}"
        )
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return _operator_normalized_weight(module, module.training)
    return _operator_normalized_weight(module, module.training)


def _conv_operator_forward(self, input: Tensor) -> Tensor:
    return self._conv_forward(input, _operator_weight(self, input, None), self.bias)


def _conv_transpose_operator_forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
    if self.padding_mode != "zeros":
        raise ValueError(f"Only `zeros` padding mode is supported for {type(self).__name__}")
    n = len(self.kernel_size)
    output_padding = tuple(self._output_padding(
        input, output_size, self.stride, self.padding, self.kernel_size, n, self.dilation
    ))
    return _CONV_T_FN[n](
        input, _operator_weight(self, input, output_padding), self.bias, self.stride, self.padding,
        output_padding, self.groups, self.dilation,
    )


_OPERATOR_FORWARD = {_conv_forward: _conv_operator_forward, _conv_transpose_forward: _conv_transpose_operator_forward}


# The names sn_modules uses (public: no module reaches into another's private members).
OPERATOR_FORWARD = _OPERATOR_FORWARD
materialize_operator_uv = _materialize_operator_uv
