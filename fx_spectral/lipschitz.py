r"""Certified Lipschitz bounds read off the weights.

Two families of networks are covered:

* **Sequential nets** (``nn.Sequential`` of ``nn.Linear`` and 1-D activations, nested
  Sequentials allowed): ``Lip(f) <= prod_k ||W_k||_2 * prod_j Lip(act_j)`` in the l2 norm.
* **The paper-style transformer** :class:`fx_spectral.models.LipschitzTransformer`
  (arXiv 2507.13338): the map from embedded inputs ``X`` (``(T, d)``, one row per token) to the
  logits, in the norm ``||X|| = max_i ||x_i||_2`` (largest per-token l2 norm) on both sides.

Every spectral norm is exact (``torch.linalg.matrix_norm(ord=2)``, float64), not a power-iteration
estimate, so the result is a certificate, not an estimate.

Relation to :func:`fx_spectral.certify`: ``certify(model, example_input)`` is the general tool (any
graph it can trace: convolutions as operators, BatchNorm, pooling, residuals, ...; it needs an
example input for the shapes). This module is the shortcut that needs no input: for a Sequential
of Linears and activations it gives the same l2 -> l2 bound as ``certify`` (the same exact norms
and the same activation slopes, :func:`activation_module_slope`), and it is the transformer-specific bound that
``certify`` itself uses as the leaf for a :class:`~fx_spectral.models.LipschitzTransformer`.
Convolutions are refused here, because their operator norm depends on the input size: use
``certify``.

Attention is only Lipschitz on bounded inputs, so the transformer bound holds on the set of inputs
whose tokens all have ``||x_i||_2 <= r`` (``r = embed_max_norm``: ``nn.Embedding(max_norm=r)``
guarantees it for real tokens). With ``a = 1/(2L)``, for a head ``h`` with row blocks
``W_q^h, W_k^h, W_v^h`` (``d_h x d``), column block ``W_o^h`` and input radius ``R``:

.. math::

    b_h = \|W_v^h\| \left(1 + \frac{2 \|W_q^h\| \|W_k^h\| R^2}{d_h}\right), \qquad
    \mathrm{Lip(attn)} \le \min\Big(\|W_o\| \sqrt{\textstyle\sum_h b_h^2},\;
    \textstyle\sum_h \|W_o^h\| b_h\Big)

(the ``1`` is the value path; the second term bounds the softmax path: logits
``s_ij = q_i.k_j / d_h`` move by at most ``2 ||W_q^h|| ||W_k^h|| R delta / d_h`` and
``sum_j dp_ij v_j`` is at most that times ``max_j ||v_j||``; rotary embeddings are rotations and
change no norm; the position bias added to the logits does not depend on the input and leaves
both terms unchanged). ``Lip(mlp) <= ||W_out|| ||W_in|| * 1.12890415 / 1.1289``. Each residual
sub-block ``x <- (1-a) x + a f(x)`` contributes ``(1-a) + a Lip(f)``, the head ``||W_head||``.
The radius is propagated the same way: ``R <- ((1-a) + a g) R`` with the gains
``g_attn = min(||W_o|| sqrt(sum_h ||W_v^h||^2), sum_h ||W_o^h|| ||W_v^h||)`` (attention outputs are
convex combinations of values) and ``g_mlp = ||W_out|| ||W_in|| / 1.1289``
(``|GELU(x)| <= |x|``). With ``attn_input_radius = rho`` every attention sees its input
projected onto the ball of radius ``rho`` (a 1-Lipschitz map), so its ``b_h`` uses
``min(R, rho)`` in place of ``R``, and the radius after it is ``(1-a) R + a g_attn min(R, rho)``.

Example::

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> lipschitz_bound(net)          # ||W_2|| * 1 * ||W_1||
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fx_spectral.kinds import kind_of
from fx_spectral.models import GELU_LIPSCHITZ, Attention, LipschitzTransformer, ScaledGELU

__all__ = [
    "GELU_SLOPE",
    "GELU_TANH_SLOPE",
    "SILU_SLOPE",
    "SELU_SLOPE",
    "LipschitzTerm",
    "activation_module_slope",
    "lipschitz_bound",
    "lipschitz_terms",
    "rms_operator_norms",
]

# --------------------------------------------------------------------------------------------
# Activation slopes: the one table lipschitz_bound and fx_spectral.certify read
# --------------------------------------------------------------------------------------------

#: Upper bounds of the largest slope ``sup |f'|`` of the smooth activations: the exact value,
#: computed in float64, rounded UP at the 8th decimal (tests/test_lipschitz.py recomputes each and
#: checks ``exact <= constant < exact * (1 + 1e-8)``). GELU: ``Phi(sqrt 2) + sqrt 2 phi(sqrt 2) =
#: 1.128904146`` at ``x = sqrt 2``; tanh-GELU: 1.128993070; SiLU: 1.099839321.
GELU_SLOPE = 1.12890415
GELU_TANH_SLOPE = 1.12899307
SILU_SLOPE = 1.09983933
#: SELU's largest slope: its scale times its alpha (the slope of ``scale * alpha * (exp(x) - 1)`` at 0).
SELU_SLOPE = 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717


def activation_module_slope(m: nn.Module) -> float | None:
    """Largest slope (an upper bound of the Lipschitz constant) of an elementwise activation module.

    ``None`` if ``m`` is not an activation this table knows. Exact numbers (1, 1/4, 1/6, 1.5,
    ``max(1, |negative_slope|)``, ...) where the slope has a closed form; the constants above otherwise.

    Example::

        >>> activation_module_slope(nn.Sigmoid())
        0.25
    """
    if isinstance(m, nn.GELU):
        return GELU_TANH_SLOPE if m.approximate == "tanh" else GELU_SLOPE
    if isinstance(m, nn.SiLU):
        return SILU_SLOPE
    if isinstance(m, nn.LeakyReLU):
        return max(1.0, abs(m.negative_slope))
    if isinstance(m, nn.ELU):
        return max(1.0, m.alpha)
    if isinstance(m, nn.SELU):
        return SELU_SLOPE
    if isinstance(m, nn.PReLU):
        return max(1.0, float(m.weight.detach().abs().max()))
    if isinstance(m, nn.Sigmoid):
        return 0.25
    if isinstance(m, nn.Hardsigmoid):
        return 1 / 6
    if isinstance(m, nn.Hardswish):
        return 1.5
    if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.CELU, nn.LogSigmoid,
                      nn.Tanhshrink, nn.Softshrink, nn.Identity)):
        return 1.0
    return None


@dataclass(frozen=True)
class LipschitzTerm:
    """One factor of a bound: ``name`` (module path), its Lipschitz ``factor`` (for a residual
    sub-block already ``(1-a) + a Lip(f)``), and the input ``radius`` after it (``None`` for
    sequential nets, which need no radius)."""

    name: str
    factor: float
    radius: float | None = None


def _sigma(w: torch.Tensor) -> torch.Tensor:
    """Exact spectral norm(s) of ``w`` (``(..., m, n)``) in float64."""
    return torch.linalg.matrix_norm(w.detach().to(torch.float64), ord=2)


def _activation_lipschitz(module: nn.Module) -> float | None:
    # A Sequential's elementwise layers: the slope table, ScaledGELU (GELU / 1.1289), and the
    # layers that are the identity in eval or a reshape.
    if isinstance(module, ScaledGELU):
        return GELU_SLOPE / GELU_LIPSCHITZ
    if isinstance(module, (nn.Dropout, nn.Flatten)):
        return 1.0
    return activation_module_slope(module)


def _sequential_terms(seq: nn.Sequential, prefix: str) -> list[LipschitzTerm]:
    terms: list[LipschitzTerm] = []
    for name, child in seq.named_children():
        path = f"{prefix}{name}"
        kind = kind_of(child)
        if isinstance(child, nn.Sequential):
            terms += _sequential_terms(child, path + ".")
        elif kind is not None and kind.operator_norm == "matrix":  # Linear: the exact norm of its matrix
            terms.append(LipschitzTerm(path, float(_sigma(kind.matrix(child.weight, kind.dim)))))
        elif kind is not None and kind.operator_norm == "conv":
            raise TypeError(
                f"lipschitz_bound: {path} is a {type(child).__name__}; the norm of its reshaped weight "
                "matrix is not the operator norm of the convolution, so no certificate "
                "can be read off it. Supported: Linear and elementwise activations."
            )
        else:
            lip = _activation_lipschitz(child)
            if lip is None:
                raise TypeError(
                    f"lipschitz_bound: no Lipschitz constant known for {path} ({type(child).__name__}); "
                    "supported: Linear, nested Sequential, the elementwise activations of "
                    "fx_spectral.lipschitz.activation_module_slope (ReLU, GELU, SiLU, Tanh, Sigmoid, ...), "
                    "ScaledGELU, Dropout (eval), Flatten."
                )
            if lip != 1.0:
                terms.append(LipschitzTerm(path, lip))
    return terms


def _attention_factors(attn: Attention, radius: float) -> tuple[float, float]:
    """(Lipschitz bound, norm gain) of one attention module on tokens with l2 norm <= radius."""
    H, dh = attn.n_heads, attn.head_dim
    heads = lambda w: w.detach().reshape(H, dh, -1)  # noqa: E731  (row block per head)
    sq, sk, sv = _sigma(heads(attn.wq.weight)), _sigma(heads(attn.wk.weight)), _sigma(heads(attn.wv.weight))
    wo = attn.wo.weight.detach()
    so = _sigma(wo.reshape(wo.shape[0], H, dh).transpose(0, 1))  # column block per head
    so_all = _sigma(wo)
    b = sv * (1 + 2 * sq * sk * radius**2 / dh)
    lip = torch.minimum(so_all * b.square().sum().sqrt(), (so * b).sum())
    gain = torch.minimum(so_all * sv.square().sum().sqrt(), (so * sv).sum())
    return float(lip), float(gain)


def _transformer_terms(model: LipschitzTransformer, radius: float) -> list[LipschitzTerm]:
    a = model.config.residual_weight
    terms: list[LipschitzTerm] = []
    ball = model.config.attn_input_radius
    for i, block in enumerate(model.layers):
        # attention sees P_R(x): tokens of norm <= min(radius, R); P_R is 1-Lipschitz
        seen = radius if ball is None else min(radius, float(ball))
        lip, gain = _attention_factors(block.attn, seen)
        radius = (1 - a) * radius + a * gain * seen
        terms.append(LipschitzTerm(f"layers.{i}.attn", (1 - a) + a * lip, radius))
        prod = float(_sigma(block.mlp.fc_out.weight) * _sigma(block.mlp.fc_in.weight))
        lip, gain = prod * GELU_SLOPE / GELU_LIPSCHITZ, prod / GELU_LIPSCHITZ
        radius = ((1 - a) + a * gain) * radius
        terms.append(LipschitzTerm(f"layers.{i}.mlp", (1 - a) + a * lip, radius))
    head = float(_sigma(model.lm_head.weight))
    terms.append(LipschitzTerm("lm_head", head, head * radius))
    return terms


def lipschitz_terms(model: nn.Module, *, input_radius: float | None = None) -> list[LipschitzTerm]:
    """The factors whose product is :func:`lipschitz_bound`, one per layer / sub-block, in order.

    Args:
        model: an ``nn.Sequential`` (or ``nn.Linear``) or a
            :class:`~fx_spectral.models.LipschitzTransformer`.
        input_radius: transformer only: largest l2 norm of an input token; defaults to the
            model's ``embed_max_norm``.
    """
    if isinstance(model, LipschitzTransformer):
        radius = model.config.embed_max_norm if input_radius is None else input_radius
        if radius is None or not radius > 0 or not math.isfinite(radius):
            raise ValueError(
                "lipschitz_bound: attention is only Lipschitz on bounded inputs; the model has "
                f"embed_max_norm=None and input_radius={input_radius!r}: pass input_radius > 0"
            )
        return _transformer_terms(model, float(radius))
    if input_radius is not None:
        raise ValueError("lipschitz_bound: input_radius only applies to a LipschitzTransformer")
    if isinstance(model, nn.Linear):
        return [LipschitzTerm("", float(_sigma(model.weight)))]
    if isinstance(model, nn.Sequential):
        return _sequential_terms(model, "")
    raise TypeError(
        f"lipschitz_bound: expected nn.Sequential, nn.Linear or LipschitzTransformer, got {type(model).__name__}"
    )


def lipschitz_bound(model: nn.Module, *, input_radius: float | None = None) -> float:
    """A certified upper bound on the Lipschitz constant of ``model``.

    ``Lip(f) <= prod_k factor_k`` over :func:`lipschitz_terms`. For sequential nets the norm is
    l2 on inputs and outputs; for a :class:`~fx_spectral.models.LipschitzTransformer` it is the
    largest per-token l2 norm, ``||X|| = max_i ||x_i||_2``, on embedded inputs with every
    ``||x_i||_2 <= input_radius`` (the module docstring has the attention bound). Valid in eval
    mode (Dropout counted as the identity).

    This is the no-input shortcut; :func:`fx_spectral.certify` (which needs an example input) is
    the general certificate and agrees with it on Sequential / Linear models (exact norms on both
    sides, to ~1e-9 relative). For convolutions, residual nets or BatchNorm use ``certify``.

    Args:
        model: ``nn.Sequential`` / ``nn.Linear`` / ``LipschitzTransformer``.
        input_radius: transformer only, defaults to ``model.config.embed_max_norm``.

    Returns:
        the bound as a Python float.

    Example::

        >>> lipschitz_bound(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)))
    """
    return math.prod(t.factor for t in lipschitz_terms(model, input_radius=input_radius))


@torch.no_grad()
def rms_operator_norms(model: nn.Module) -> dict[str, float]:
    """RMS->RMS operator norm ``sigma(W) * sqrt(fan_in / fan_out)`` of every ``nn.Linear``
    weight, keyed by parameter FQN (``"layers.0.attn.wq.weight"``)."""
    out: dict[str, float] = {}
    for name, mod in model.named_modules():
        kind = kind_of(mod)
        if kind is not None and kind.operator_norm == "matrix":  # Linear
            w = kind.matrix(mod.weight, kind.dim)
            out[f"{name}.weight" if name else "weight"] = float(_sigma(w)) / kind.rms_scale(*w.shape)
    return out
