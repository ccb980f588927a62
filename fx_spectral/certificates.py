r"""A Lipschitz certificate for any model the graph can see: :func:`certify`.

The model is traced (``torch.fx.symbolic_trace``, or ``torch.export`` when it does not trace)
and run once on the example to learn every node's shape. Then, for every node ``v`` computed
from the input ``x``, a bound :math:`L_v` of the Lipschitz constant of ``x -> v`` (l2 -> l2, one
example at a time; the batch dimension is dim 0 and no op may mix examples) is composed along
the graph:

.. math::
    L_{g(u)} \le \operatorname{Lip}(g)\, L_u, \qquad
    L_{u + w} \le L_u + L_w, \qquad
    L_{\mathrm{cat}(u, w)} \le \sqrt{L_u^2 + L_w^2}

(a concatenation's squared distance is the sum of its parts'), and nodes that do not depend on
the input (weights, buffers, constants) have :math:`L = 0`. The per-op factors:

* Linear / conv / conv-transpose (modules or functional, constant weight): the proven
  ``upper`` of :func:`fx_spectral.operator_norm` at that node's input shape, with the weight the
  forward uses (``W / sigma`` for a module normalized by :func:`fx_spectral.spectral_norm`);
* BatchNorm in eval: :math:`\max_c |\gamma_c| / \sqrt{\mathrm{var}_c + \epsilon}`;
* activations, pooling, means, padding: :mod:`fx_spectral.certify_rules`;
* reshapes, permutations that keep dim 0, slicing, dropout in eval: 1; multiplication or
  division by a constant ``c``: :math:`\max|c|` or :math:`1/\min|c|`; ``x @ W``: :math:`\lVert W\rVert_2`;
* the Lipschitz transformer of :mod:`fx_spectral.models`: the bound of
  :func:`fx_spectral.lipschitz.lipschitz_bound` (in the largest-token-l2 norm, on inputs whose tokens
  have norm at most ``embed_max_norm``) times :math:`\sqrt T`, which converts it to l2 over the
  ``(T, d)`` example: :math:`\lVert Y\rVert_F \le \sqrt T \max_i \lVert y_i\rVert
  \le \sqrt T L \max_i\lVert x_i\rVert \le \sqrt T L \lVert X\rVert_F`.

Anything else (``exp``, LayerNorm, softmax, a product of two computed tensors, an op touching the
batch dimension) raises an error naming the node and the op: there is no silent pass-through.

Example::

    >>> model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)).eval()
    >>> cert = certify(model, torch.randn(4, 1, 8, 8))
    >>> cert.bound >= cert.attained(model, torch.randn(4, 1, 8, 8))
    True
    >>> print(cert)            # the per-node table
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fx_spectral.certify_graph import analyze_graph, trace_model
from fx_spectral.models import LipschitzTransformer

__all__ = ["CertRow", "Certificate", "certify"]


@dataclass(frozen=True)
class CertRow:
    """One node of a certificate: ``factor`` is the op's own Lipschitz factor (``None`` for ops
    that combine several inputs), ``bound`` the composed bound from the model's input to here."""

    name: str
    op: str
    factor: float | None
    bound: float
    rule: str


@dataclass(frozen=True)
class Certificate:
    """A Lipschitz bound of a model, l2 -> l2 per example: ``||f(x) - f(y)|| <= bound * ||x - y||``.

    Attributes:
        bound: the certified constant (a float; ``inf`` never: unknown ops raise instead).
        rows: the per-node table, in graph order (:class:`CertRow`).
        norm: which norm and domain the bound holds in.
        traced_by: ``"symbolic_trace"``, ``"torch.export"`` or ``"lipschitz_transformer"``.
        input_shape: one example's shape.
    """

    bound: float
    rows: tuple[CertRow, ...]
    norm: str
    traced_by: str
    input_shape: tuple[int, ...]
    input_radius: float | None = None

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.rows] + [4])
        o = max([len(r.op) for r in self.rows] + [2])
        lines = [f"Lipschitz certificate ({self.norm}; traced by {self.traced_by}): bound = {self.bound:.6g}",
                 f"{'node':{w}s}  {'op':{o}s}  {'factor':>10s}  {'bound':>10s}  rule"]
        for r in self.rows:
            f = "-" if r.factor is None else f"{r.factor:.6g}"
            lines.append(f"{r.name:{w}s}  {r.op:{o}s}  {f:>10s}  {r.bound:10.6g}  {r.rule}")
        return "\n".join(lines)

    def attained(self, model: nn.Module, example_input: Tensor, *, steps: int = 50, seed: int = 0) -> float:
        r"""An attained lower bound of the Lipschitz constant: the best ``||f(x) - f(y)|| / ||x - y||``.

        Starts at every example (``x``) with ``y - x`` along the Jacobian's top right singular
        vector (10 power iterations with autograd), then runs ``steps`` Adam steps of gradient
        ascent on the ratio over both points. The returned ratio is re-evaluated in float64 on a
        copy of the model for the best pair found (or, where the forward cannot run in float64,
        in its own dtype less a relative 1e-4), so it is a true ratio of the eval-mode model:
        ``attained <= Lip(f) <= bound``. For a :class:`~fx_spectral.models.LipschitzTransformer`
        the points are embedded sequences whose tokens stay in the certified ball.
        The model is not changed (eval mode, no parameter gradients are accumulated).
        """
        return attained_lower_bound(model, example_input, steps=steps, seed=seed, radius=self.input_radius)


def _mode_dependent(m: nn.Module) -> bool:
    """Modules whose forward differs (or mutates state) in training mode."""
    from fx_spectral.nn import is_spectral_normalized

    return (
        isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
        or is_spectral_normalized(m)
        or torch.nn.utils.parametrize.is_parametrized(m)
    )


def _check_eval(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if m.training and _mode_dependent(m):
            raise ValueError(
                f"certify: module {name or type(model).__name__!r} ({type(m).__name__}) is in training mode; the "
                "certificate is for the eval-mode function (BatchNorm with running statistics, no dropout, no "
                "power-iteration updates): call model.eval() first"
            )


def certify(model: nn.Module, example_input: Tensor, *, dense_limit: int = 1 << 20) -> Certificate:
    r"""A certified l2 -> l2 Lipschitz bound of ``model`` per example, read off its graph.

    Args:
        model: an ``nn.Module`` (BatchNorm, Dropout and normalized modules in eval mode) whose
            forward takes one tensor with the batch in dim 0 and treats examples independently; or a
            :class:`~fx_spectral.models.LipschitzTransformer` (then the certified map is
            :meth:`~fx_spectral.models.LipschitzTransformer.forward_embeddings`, on inputs whose
            tokens have l2 norm at most ``embed_max_norm``).
        example_input: a batch of examples (the shapes come from it; tokens or embeddings for the
            transformer).
        dense_limit: passed to the conv bounds (largest dense Jacobian tried, per group).

    Returns:
        a :class:`Certificate` with ``.bound`` and the per-node table.

    Raises:
        ValueError / TypeError: a module in training mode, an op with no known bound (naming the
        node and the op), an op that mixes examples.

    Example::

        >>> cert = certify(model.eval(), x[:8])
        >>> cert.bound, cert.attained(model, x[:8])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"certify: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor) or example_input.dim() < 1:
        raise TypeError("certify: expected example_input to be a tensor with the batch in dim 0")
    _check_eval(model)
    if isinstance(model, LipschitzTransformer):
        return _certify_transformer(model, example_input)
    if not example_input.is_floating_point():
        raise TypeError(f"certify: a Lipschitz bound needs a floating-point input, got {example_input.dtype}")
    x = example_input.detach()
    if x.shape[0] == 1:
        x = torch.cat([x, x])  # two examples, so that an op mixing the batch shows in the shapes
    gm, traced_by = trace_model(model, x)
    with torch.no_grad():
        expected, got = model(x), gm(x)
    if not isinstance(expected, Tensor):
        raise TypeError(f"certify: expected {type(model).__name__} to return one tensor, got {type(expected).__name__}")
    if not (isinstance(got, Tensor) and got.shape == expected.shape
            and torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max().clamp_min(1)))):
        raise TypeError(
            f"certify: the graph traced by {traced_by} does not reproduce {type(model).__name__}'s output on the "
            "example (in-place updates of aliased tensors, or Python-level state, change what the model computes); "
            "no certificate can be read off it"
        )
    rows, bound = analyze_graph(gm, x, dense_limit=dense_limit)
    return Certificate(bound, tuple(CertRow(*r) for r in rows), "l2 -> l2 per example", traced_by,
                       tuple(x.shape[1:]))


def _embedded(model: LipschitzTransformer, example_input: Tensor) -> Tensor:
    """Embedded inputs ``(B, T, d)`` with every token projected onto the certified ball (no mutation:
    ``nn.Embedding(max_norm=...)`` would renormalize its weight in place)."""
    if example_input.is_floating_point():
        x = example_input.detach()
        if x.dim() != 3 or x.shape[-1] != model.config.dim:
            raise ValueError(f"certify: expected embeddings (B, T, {model.config.dim}), got {tuple(x.shape)}")
    else:
        x = torch.nn.functional.embedding(example_input, model.tok_emb.weight.detach())
    return _project_rows(x, model.config.embed_max_norm)


def _project_rows(x: Tensor, radius: float | None) -> Tensor:
    if radius is None:
        return x
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.clamp(radius / norms.clamp_min(1e-30), max=1.0)


def _certify_transformer(model: LipschitzTransformer, example_input: Tensor) -> Certificate:
    from fx_spectral.lipschitz import lipschitz_terms

    x = _embedded(model, example_input)
    T = x.shape[1]
    if T > model.config.max_seq_len:
        raise ValueError(f"certify: sequence length {T} exceeds max_seq_len={model.config.max_seq_len}")
    terms = lipschitz_terms(model)
    rows, cum = [], 1.0
    for t in terms:
        cum *= t.factor
        rows.append((t.name, "lipschitz_transformer", t.factor, cum,
                     f"lipschitz_bound term (largest-token-l2 norm; token radius after: {t.radius:.4g})"))
    cum *= math.sqrt(T)
    rows.append(("(norm change)", "sqrt(T)", math.sqrt(T), cum, "largest-token-l2 -> l2 over the (T, d) example"))
    r = model.config.embed_max_norm
    return Certificate(cum, tuple(CertRow(*row) for row in rows),
                       f"l2 -> l2 per example on embedded sequences with every token norm <= {r}",
                       "lipschitz_transformer", tuple(x.shape[1:]), input_radius=r)


# --------------------------------------------------------------------------------------------
# Attained lower bound
# --------------------------------------------------------------------------------------------


def _ratios(f, x: Tensor, y: Tensor) -> Tensor:
    num = torch.linalg.vector_norm((f(y) - f(x)).flatten(1), dim=1)
    den = torch.linalg.vector_norm((y - x).flatten(1), dim=1)
    return num / den.clamp_min(1e-30)


def attained_lower_bound(
    model: nn.Module, example_input: Tensor, *, steps: int = 50, seed: int = 0, radius: float | None = None
) -> float:
    """See :meth:`Certificate.attained`."""
    _check_eval(model)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, LipschitzTransformer):
        x0 = _embedded(model, example_input)
        f = model.forward_embeddings
        radius = model.config.embed_max_norm
    else:
        x0 = example_input.detach()
        f = model
    x0 = x0.to(torch.float32) if x0.dtype not in (torch.float32, torch.float64) else x0
    proj = (lambda t: _project_rows(t, radius)) if radius is not None else (lambda t: t)
    eps = 1e-2 * (x0.flatten(1).norm(dim=1).mean().item() + 1e-3)
    # Power iteration on J^T J at each example: J v by a forward difference, J^T u by autograd.
    v = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    with torch.enable_grad():
        for _ in range(10):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))
            xr = x0.clone().requires_grad_(True)
            fx = f(xr)
            with torch.no_grad():
                u = (f(x0 + eps * v) - fx) / eps
            (v,) = torch.autograd.grad(fx, xr, u)
    v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))
    x = proj(x0.clone()).requires_grad_(True)
    y = proj((x0 + eps * v).clone()).requires_grad_(True)
    best_r, best_pair = -1.0, (x.detach().clone(), y.detach().clone())
    opt = torch.optim.Adam([x, y], lr=eps / 4)
    with torch.enable_grad():
        for _ in range(steps + 1):
            r = _ratios(f, x, y)
            i = int(torch.argmax(r.detach()))
            if float(r[i].detach()) > best_r:
                best_r, best_pair = float(r[i].detach()), (x[i : i + 1].detach().clone(), y[i : i + 1].detach().clone())
            opt.zero_grad(set_to_none=True)
            (-r.sum()).backward(inputs=[x, y])
            opt.step()
            with torch.no_grad():
                x.copy_(proj(x))
                y.copy_(proj(y))
    # Re-evaluate the best pair in float64 on a copy (so rounding cannot inflate the ratio).
    m64 = copy.deepcopy(model).to(torch.float64)
    f64 = m64.forward_embeddings if isinstance(m64, LipschitzTransformer) else m64
    with torch.no_grad():
        bx, by = (t.to(torch.float64) for t in best_pair)
        try:
            return float(_ratios(f64, bx, by)[0])
        except RuntimeError:
            # The forward holds tensors .to() cannot reach (e.g. captured in a closure): keep its own
            # dtype and give up a relative 1e-4, far more than the rounding of the pair's difference.
            return float(_ratios(f, *best_pair)[0]) * (1 - 1e-4)
