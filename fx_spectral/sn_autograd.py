r"""Eager spectral normalization, the autograd side: ``W / sigma`` and the fused forwards.

Part of :mod:`fx_spectral.nn` (which re-exports every name here). It holds the math shared with the
graph transform (:func:`normalize_weight`, :func:`power_iteration_`), sigma's estimate per forward
(power iteration in training, a replay under activation checkpointing's recompute), the two autograd
Functions with fused backwards, and the fused Linear / Conv / ConvTranspose forwards with their
per-call choice of route:

.. math::
    \bar W = \frac{W}{\sigma}, \qquad \sigma = u^\top W v, \qquad
    \frac{\partial L}{\partial W} = \frac{1}{\sigma}\Big(G - \langle G, \bar W\rangle\, u v^\top\Big)

"weight" route: ``op(x, W / sigma) + b`` (:class:`_DivideBySigma`); "output" route:
``op(x, W) / sigma + b`` (:class:`_OpOverSigma`), when the output is the smaller tensor.

Example::

    >>> w = torch.randn(8, 4, requires_grad=True)
    >>> u = F.normalize(torch.randn(8), dim=0); v = F.normalize(torch.randn(4), dim=0)
    >>> w_bar = normalize_weight(w, u, v)  # NB: u, v updated in place
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fx_spectral import power as P
from fx_spectral.kinds import CONV_T_FN, weight_matrix
from fx_spectral.matrices import add_outer

# --------------------------------------------------------------------------------------------
# Math (shared with the graph transform)
# --------------------------------------------------------------------------------------------


# default_dim(module) and weight_matrix(weight, dim) come from fx_spectral.kinds (re-exported here).


def _normalize_or_keep(t: Tensor, old: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # (t / ||t||, ||t||) over the whole tensor (an operator-mode u/v is shaped like an example), or
    # the old vector where ||t|| <= eps: power.normalize_or_keep's plain rule.
    return P.normalize_or_keep(t, old, eps, dim=None)


@torch.no_grad()
def _power_iteration(
    w_mat: Tensor, u_buf: Tensor, v_buf: Tensor, n_iter: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # Returns fresh (u, v, ||W^T u||) in w_mat's dtype; the last norm is sigma = u^T W v.
    u, v, norm = P.iterate(w_mat, None, u_buf.to(w_mat.dtype), v_buf.to(w_mat.dtype), n_iter, eps)
    # NB: the float32 buffers are updated in place.
    if _functorch_active():
        # torch.func refuses copy_ into a captured tensor; an out= op is allowed (torch's own way).
        torch.mul(u, 1, out=u_buf), torch.mul(v, 1, out=v_buf)
    else:
        u_buf.copy_(u)
        v_buf.copy_(v)
    return u, v, norm


def power_iteration_(w_mat: Tensor, u: Tensor, v: Tensor, n_iter: int, eps: float) -> tuple[Tensor, Tensor]:
    r"""Run ``n_iter`` power-iteration steps on the matrix ``w_mat`` (no grad).

    One step is :math:`u = \mathrm{normalize}(W v)`, then :math:`v = \mathrm{normalize}(W^\top u)`
    (torch's order). NB: ``u`` and ``v`` are updated in place; the returned tensors are fresh
    copies of their new values, safe to save for backward while the buffers move on.
    """
    u_new, v_new, _ = _power_iteration(w_mat, u, v, n_iter, eps)
    return u_new, v_new


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for fp16/bf16/fp32 weights; float64 weights keep float64 (gradcheck, science).
    return P.compute_dtype(dtype)


def normalize_weight(
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    *,
    dim: int = 0,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    training: bool = True,
) -> Tensor:
    r"""Return ``weight / sigma``, updating the float32 buffers ``u``/``v`` in place when training.

    .. math::
        \sigma = u^\top W v, \qquad
        \frac{\partial L}{\partial W} = \frac{1}{\sigma}\Big(G - \langle G, \bar W\rangle\, u v^\top\Big)

    (``G`` the gradient w.r.t. :math:`\bar W = W/\sigma`; u, v are constants, as in torch.)
    Sigma is computed in float32 (float64 for float64 weights) with autocast disabled; the result
    is cast back to ``weight.dtype``. A zero weight gives a zero result (sigma is clamped to ``eps``).

    Example::

        >>> w = torch.randn(8, 4, requires_grad=True)
        >>> u = F.normalize(torch.randn(8), dim=0); v = F.normalize(torch.randn(4), dim=0)
        >>> w_bar = normalize_weight(w, u, v)  # NB: u, v updated in place
    """
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return _normalize_weight(weight, u, v, dim, n_power_iterations, eps, training)
    return _normalize_weight(weight, u, v, dim, n_power_iterations, eps, training)


def _normalize_weight(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_iter: int, eps: float, training: bool
) -> Tensor:
    needs_grad = weight.requires_grad and torch.is_grad_enabled()
    u, v, sigma = _estimate_sigma(weight, u, v, dim, n_iter, eps, training, needs_grad)
    if _functorch_active():
        # torch.func (grad, vmap, jacrev) refuses our autograd.Functions: plain differentiable ops.
        return _divide(weight, _sigma_with_grad(weight, u, v, sigma, dim))
    if needs_grad:
        return _DivideBySigma.apply(weight, u, v, sigma, dim)
    return _divide(weight, sigma)


def _functorch_active() -> bool:
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _recomputing() -> bool:
    """Whether this forward is activation checkpointing's recompute (``torch.utils.checkpoint``,
    either kind), which runs inside backward. It must reproduce the forward's sigma from the u/v
    that forward left, without a second power-iteration update (that would advance u/v twice per
    step and give backward a slightly different sigma than forward used)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


@torch.no_grad()
def _estimate_sigma(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_iter: int, eps: float, training: bool, needs_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    # (u, v, sigma) in the compute dtype; u/v are fresh tensors wherever they get saved for backward.
    w_mat = weight_matrix(weight.to(_compute_dtype(weight.dtype)), dim)
    if training and _recomputing():
        # Replays the forward's last half-step from the u it left (bitwise the same v and sigma);
        # no second update of the buffers.
        u = u.to(w_mat.dtype, copy=True)
        v, sigma = _normalize_or_keep(torch.mv(w_mat.t(), u), v.to(w_mat.dtype), eps)
        return u, v, sigma.clamp_min(eps)
    if training:
        u, v, sigma = _power_iteration(w_mat, u, v, n_iter, eps)
        return u, v, sigma.clamp_min(eps)
    # NB: copies when saved for backward: a later training forward updates the buffers in place.
    u, v = u.to(w_mat.dtype, copy=needs_grad), v.to(w_mat.dtype, copy=needs_grad)
    sigma = torch.dot(u, torch.mv(w_mat, v))
    # Stale u/v may give any sign; only an exact zero (a zero weight) needs the guard.
    return u, v, torch.where(sigma == 0, eps, sigma)


def _divide(weight: Tensor, sigma: Tensor) -> Tensor:
    if weight.dtype == sigma.dtype:
        return weight / sigma
    return (weight.to(sigma.dtype) / sigma).to(weight.dtype)


class _DivideBySigma(torch.autograd.Function):
    """``W / sigma`` with sigma = uᵀ W v, and a fused backward (3 passes over W instead of ~7).

    Under ``create_graph=True`` the backward differentiates a recomputation instead, so that
    double backward (Hessian-vector products w.r.t. W) works as with torch's spectral_norm.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
        out = _divide(weight, sigma)
        ctx.save_for_backward(out, u, v, sigma, weight)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, u, v, sigma, weight = ctx.saved_tensors
        if torch.is_grad_enabled():
            w_bar = _divide(weight, _sigma_with_grad(weight, u, v, sigma, ctx.dim))
            return torch.autograd.grad(w_bar, weight, grad, create_graph=True)[0], None, None, None, None
        g = grad if grad.dtype == sigma.dtype else grad.to(sigma.dtype)
        # c = <G, W/sigma>: the part of G along the direction that only rescales W.
        if out.dtype == sigma.dtype:
            c = torch.dot(g.reshape(-1), out.reshape(-1))
        else:
            c = torch.sum(g * out.to(sigma.dtype))
        grad_w = g / sigma
        # NB: in place on the fresh grad_w (eager): grad_w -= (c / sigma) u v^T, in the matrix view.
        grad_w = add_outer(grad_w, u * (c / sigma), v, ctx.dim, alpha=-1.0, in_place=True)
        return grad_w if grad_w.dtype == grad.dtype else grad_w.to(grad.dtype), None, None, None, None


def _sigma_with_grad(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    """``sigma``'s value with the gradient of uᵀ W v (u, v constants): for differentiable backwards."""
    s = torch.dot(u, torch.mv(weight_matrix(weight.to(sigma.dtype), dim), v))
    return s - s.detach() + sigma


# Fresh float32 u/v: random unit vectors + N_WARMUP_ITERATIONS steps (torch's u/v for the same RNG state).
_init_uv = P.init_uv


# --------------------------------------------------------------------------------------------
# Per-parameter configuration and the fused forwards
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SNParam:
    dim: int
    n_power_iterations: int
    eps: float
    mode: str = "matrix"  # "operator": sigma of the convolution operator (see _operator_forward)
    where: str = field(default="", compare=False)  # the module path, for error messages


def _sn_weight(module: nn.Module, name: str) -> Tensor:
    cfg: _SNParam = module._sn_params[name]
    return normalize_weight(
        module._parameters[name],
        module._buffers[name + "_u"],
        module._buffers[name + "_v"],
        dim=cfg.dim,
        n_power_iterations=cfg.n_power_iterations,
        eps=cfg.eps,
        training=module.training,
    )


def _divide_output(module: nn.Module, input: Tensor, out_numel: int) -> bool:
    """Whether ``op(x, W)/sigma + b`` beats ``op(x, W/sigma) + b`` for this call.

    Dividing the output skips the W-sized passes (W/sigma, and three more in backward) for ~4
    output-sized ones, so it wins when the output is the smaller tensor: an MLP at small batch,
    the wide late layers of a conv net. Float32 only, where both are equal to rounding; eager and
    under torch.compile (inductor fuses the output passes), not under torch.export, whose graph
    keeps the plain ``op(x, W/sigma)`` (no autograd.Function in an exported program).
    """
    weight = module.weight
    return (
        5 * out_numel < 4 * weight.numel()
        and input.dtype == weight.dtype == torch.float32
        and not torch.compiler.is_exporting()
        and not torch.is_autocast_enabled(input.device.type)
        and not _functorch_active()
    )


def _op_over_sigma(module: nn.Module, input: Tensor, conv_args: tuple | None) -> Tensor:
    cfg: _SNParam = module._sn_params["weight"]
    weight = module.weight
    needs_grad = torch.is_grad_enabled() and (weight.requires_grad or input.requires_grad)
    u, v, sigma = _estimate_sigma(
        weight, module.weight_u, module.weight_v, cfg.dim, cfg.n_power_iterations, cfg.eps, module.training,
        needs_grad,
    )
    return _OpOverSigma.apply(input, weight, module.bias, u, v, sigma, cfg.dim, conv_args)


def _linear_forward(self, input: Tensor) -> Tensor:
    if _divide_output(self, input, math.prod(input.shape[:-1]) * self.out_features):
        return _op_over_sigma(self, input, None)
    return F.linear(input, _sn_weight(self, "weight"), self.bias)


def _conv_out_numel(module: nn.Module, input: Tensor, transposed: bool, output_padding=None) -> int:
    n = len(module.kernel_size)
    numel = module.out_channels * (input.shape[0] if input.dim() == n + 2 else 1)
    for i in range(n):
        length, k, s, p, d = (
            input.shape[-n + i], module.kernel_size[i], module.stride[i], module.padding[i], module.dilation[i]
        )
        if transposed:
            numel *= (length - 1) * s - 2 * p + d * (k - 1) + output_padding[i] + 1
        else:
            numel *= (length + 2 * p - d * (k - 1) - 1) // s + 1
    return numel


def _conv_forward(self, input: Tensor) -> Tensor:
    if (
        self.padding_mode == "zeros"
        and not isinstance(self.padding, str)
        and input.dim() == len(self.kernel_size) + 2  # aten.convolution wants a batch dim
        and _divide_output(self, input, _conv_out_numel(self, input, False))
    ):
        conv_args = (self.stride, self.padding, self.dilation, False, (0,) * len(self.kernel_size), self.groups)
        return _op_over_sigma(self, input, conv_args)
    return self._conv_forward(input, _sn_weight(self, "weight"), self.bias)


_CONV_T_FN = CONV_T_FN  # spatial dims -> F.conv_transpose{d}d (the kinds table)


def _conv_transpose_forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
    if self.padding_mode != "zeros":
        raise ValueError(f"Only `zeros` padding mode is supported for {type(self).__name__}")
    n = len(self.kernel_size)
    output_padding = self._output_padding(
        input, output_size, self.stride, self.padding, self.kernel_size, n, self.dilation
    )
    if input.dim() == n + 2 and _divide_output(self, input, _conv_out_numel(self, input, True, output_padding)):
        conv_args = (self.stride, self.padding, self.dilation, True, tuple(output_padding), self.groups)
        return _op_over_sigma(self, input, conv_args)
    return _CONV_T_FN[n](
        input, _sn_weight(self, "weight"), self.bias, self.stride, self.padding,
        output_padding, self.groups, self.dilation,
    )


class _OpOverSigma(torch.autograd.Function):
    r"""``op(x, W / sigma, b)`` computed as ``op(x, W) / sigma + b`` for op = linear or convolution.

    Backward, with :math:`z = op(x, W)` and :math:`G` the output gradient: the usual input and
    weight gradients of ``op`` for :math:`G/\sigma`, plus the sigma term
    :math:`-\frac{\langle G, z\rangle}{\sigma^2} u v^\top` added in place to the weight gradient
    (in its matrix view), and :math:`\nabla_b = \sum G` over all but the channel dimension.
    ``conv_args`` is ``(stride, padding, dilation, transposed, output_padding, groups)``, or None
    for linear.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, u, v, sigma, dim: int, conv_args: tuple | None) -> Tensor:
        if conv_args is None:
            z = F.linear(x, weight)
        else:
            z = torch.ops.aten.convolution(x, weight, None, *conv_args)
        # The raw z is saved (backward needs <G, z>), the output is a fresh tensor: an in-place op on
        # it (ReLU(inplace=True)) leaves the saved one alone. One output-sized pass: z / sigma + b.
        ctx.save_for_backward(x, weight, u, v, sigma, z)
        ctx.dim, ctx.conv_args = dim, conv_args
        if bias is None:
            return z / sigma
        return torch.addcdiv(bias if conv_args is None else bias.view(-1, *[1] * (z.dim() - 2)), z, sigma)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, u, v, sigma, z = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True (R1 / WGAN-GP penalties): differentiate a recomputation instead,
            # so that this backward is itself differentiable w.r.t. x and W (sigma's term included).
            w_bar = weight / _sigma_with_grad(weight, u, v, sigma, ctx.dim)
            if ctx.conv_args is None:
                out = F.linear(x, w_bar)
            else:
                out = torch.ops.aten.convolution(x, w_bar, None, *ctx.conv_args)
            wanted = [t for t, need in ((x, need_x), (weight, need_w)) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
            grad_x, grad_w = next(grads) if need_x else None, next(grads) if need_w else None
            grad_b = None
            if need_b:
                dims = [d for d in range(grad.dim()) if d != (grad.dim() - 1 if ctx.conv_args is None else 1)]
                grad_b = grad.sum(dims)
            return grad_x, grad_w, grad_b, None, None, None, None, None
        g = grad / sigma
        grad_x = grad_w = grad_b = None
        if ctx.conv_args is None:
            g2 = g.reshape(-1, g.shape[-1])
            if need_x:
                grad_x = g2.mm(weight).view(x.shape)
            if need_w:
                grad_w = g2.t().mm(x.reshape(-1, x.shape[-1]))
            if need_b:
                grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        else:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                g, x, weight, None, *ctx.conv_args, [need_x, need_w, False]
            )
            if need_b:
                grad_b = grad.sum([d for d in range(grad.dim()) if d != 1])
        if need_w:
            c = torch.dot(g.reshape(-1), z.reshape(-1)).div_(sigma)  # <G, z> / sigma^2
            # NB: in place on the fresh weight gradient (eager): grad_w -= c u v^T in the matrix view.
            grad_w = add_outer(grad_w, u * c, v, ctx.dim, alpha=-1.0, in_place=True)
        return grad_x, grad_w, grad_b, None, None, None, None, None


# The names sn_operator and sn_modules use (public: no module reaches into another's private
# members). The underscore spellings stay the ones this file calls and nn re-exports; tests patch those.
SNParam = _SNParam
sn_weight = _sn_weight
linear_forward = _linear_forward
conv_forward = _conv_forward
conv_transpose_forward = _conv_transpose_forward
functorch_active = _functorch_active
recomputing = _recomputing
