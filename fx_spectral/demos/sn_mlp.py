r"""Eager spectral-norm demo: a spectral-normalized MLP next to its unnormalized twin.

Both networks start from the same weights and train on the same two-spirals data (made here, no
download). Every Linear of one of them goes through :func:`fx_spectral.apply_spectral_norm`, so
each layer computes with :math:`W/\hat\sigma`. ReLU is 1-Lipschitz, so the product of the per-layer
spectral norms bounds the network's Lipschitz constant (in the l2 norm):

.. math:: \operatorname{Lip}(f) \le \prod_i \lVert W_i \rVert_2

For the normalized network each factor is :math:`\lVert W_i\rVert_2 / \hat\sigma_i`, about 1; for the
twin the factors are its raw spectral norms, which grow during training. The demo prints both,
the fx_spectral estimates :math:`\hat\sigma_i` next to the true :math:`\lVert W_i\rVert_2`
(``torch.linalg.matrix_norm(ord=2)``), an empirical lower bound of the Lipschitz constant
(largest Jacobian norm over the test points), and the test accuracy of both networks.

The normalized network's logits are bounded-slope, so it is trained on ``logit_scale * f(x)``
(a fixed temperature in the loss; the classifier is ``argmax f(x)`` either way).

Example::

    >>> from fx_spectral.demos.sn_mlp import run
    >>> result = run(steps=50, progress=False)
    >>> result.sn_bound <= 1.05 ** len(result.layers)
    True
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fx_spectral import apply_spectral_norm, spectral_sigma


def make_spirals(
    n_per_class: int, *, noise: float = 0.04, turns: float = 1.5, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Two interleaved spirals in [-1, 1]^2: points ``(2 * n_per_class, 2)`` and labels 0/1."""
    t = torch.rand(n_per_class, generator=generator).sqrt()  # uniform density along the arc
    angle = t * turns * 2 * math.pi
    arm = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1)
    x = torch.cat([arm, -arm]) + noise * torch.randn(2 * n_per_class, 2, generator=generator)
    y = torch.cat([torch.zeros(n_per_class, dtype=torch.long), torch.ones(n_per_class, dtype=torch.long)])
    return x, y


def make_mlp(width: int, depth: int) -> nn.Sequential:
    """``depth`` hidden Linear + ReLU layers of ``width`` units, then a Linear to 2 logits."""
    dims = [2] + [width] * depth
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], 2))
    return nn.Sequential(*layers)


@dataclass
class LayerReport:
    """Spectral norms of one Linear layer: the twin's, and the normalized network's."""

    name: str
    plain_before: float  # ||W||_2 of the twin (= of both networks) at initialization
    plain_after: float  # ||W||_2 of the twin after training
    sn_sigma_before: float  # fx_spectral's estimate sigma_hat at initialization
    sn_raw_after: float  # ||W||_2 of the normalized network's raw parameter after training
    sn_sigma_after: float  # fx_spectral's estimate sigma_hat after training
    sn_effective_before: float  # ||W / sigma_hat||_2 at initialization
    sn_effective_after: float  # ||W / sigma_hat||_2 after training: the layer's factor in the bound


@dataclass
class DemoResult:
    layers: list[LayerReport] = field(default_factory=list)
    plain_bound: float = math.nan  # product of the twin's ||W_i||_2
    sn_bound: float = math.nan  # product of ||W_i / sigma_hat_i||_2
    plain_jacobian: float = math.nan  # max over test points of ||J(x)||_2 (a lower bound on Lip)
    sn_jacobian: float = math.nan
    plain_accuracy: float = math.nan
    sn_accuracy: float = math.nan
    seconds: float = math.nan
    plain_model: nn.Module | None = None  # the trained networks (eval mode), for further inspection
    sn_model: nn.Module | None = None


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]


def _true_norm(w: Tensor) -> float:
    return torch.linalg.matrix_norm(w.detach().double(), ord=2).item()


def _effective_norms(model: nn.Module) -> list[float]:
    # The weight an eval forward uses is W / sigma_hat, sigma_hat from the stored u, v.
    return [_true_norm(m.weight) / spectral_sigma(m).item() for _, m in _linears(model)]


def _max_jacobian_norm(model: nn.Module, x: Tensor) -> float:
    # Samples are independent, so the gradient of sum_n f_k(x_n) is row k of every J(x_n).
    x = x.detach().requires_grad_(True)
    logits = model(x)
    rows = [torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True)[0] for k in range(logits.shape[1])]
    jac = torch.stack(rows, dim=1)  # (n, logits, inputs)
    return torch.linalg.matrix_norm(jac.double(), ord=2).max().item()


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def run(
    *,
    steps: int = 400,
    width: int = 64,
    depth: int = 3,
    lr: float = 1e-2,
    batch_size: int = 256,
    logit_scale: float = 20.0,
    seed: int = 0,
    num_threads: int | None = 1,
    progress: bool = True,
    out: TextIO | None = None,
) -> DemoResult:
    """Train the twins for ``steps`` Adam steps, print the report to ``out`` and return its numbers.

    Args:
        steps: training steps (minibatches of ``batch_size``) for each network.
        width, depth: hidden units per layer, hidden layers.
        lr: Adam learning rate.
        logit_scale: the normalized network trains on ``logit_scale * f(x)`` (see module docstring).
        seed: seeds data, initialization and minibatch order.
        num_threads: torch intra-op threads while the demo runs (restored afterwards); the layers
            are tiny, so one thread is fastest and does not suffer when the machine is busy.
            ``None`` keeps torch's setting.
        progress: show a tqdm progress bar (on stderr).
        out: where the report goes (default ``sys.stdout``).
    """
    out = sys.stdout if out is None else out
    if steps < 1:
        raise ValueError(f"sn-demo: steps must be >= 1, got {steps}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"sn-demo: num_threads must be >= 1 or None, got {num_threads}")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run(steps, width, depth, lr, batch_size, logit_scale, seed, progress, out)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    steps: int, width: int, depth: int, lr: float, batch_size: int, logit_scale: float, seed: int,
    progress: bool, out: TextIO,
) -> DemoResult:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = make_spirals(1024, generator=gen)
    x_test, y_test = make_spirals(512, generator=gen)

    torch.manual_seed(seed)
    plain = make_mlp(width, depth)
    sn = copy.deepcopy(plain)
    apply_spectral_norm(sn)  # every Linear: W -> W / sigma_hat; weight_u / weight_v buffers added
    result = DemoResult()
    names = [name for name, _ in _linears(plain)]
    before_plain = [_true_norm(m.weight) for _, m in _linears(plain)]
    before_sn = _effective_norms(sn)
    before_sigma = [spectral_sigma(m).item() for _, m in _linears(sn)]

    opt_plain = torch.optim.Adam(plain.parameters(), lr=lr)
    opt_sn = torch.optim.Adam(sn.parameters(), lr=lr)
    plain.train()
    sn.train()
    bar = tqdm(range(steps), desc="training (plain | spectral-normalized)", disable=not progress, file=sys.stderr)
    for _ in bar:
        idx = torch.randint(0, x_train.shape[0], (batch_size,), generator=gen)
        xb, yb = x_train[idx], y_train[idx]
        loss_plain = F.cross_entropy(plain(xb), yb)
        loss_sn = F.cross_entropy(logit_scale * sn(xb), yb)
        for opt, loss in ((opt_plain, loss_plain), (opt_sn, loss_sn)):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss_plain.item():.3f} | {loss_sn.item():.3f}", refresh=False)
    bar.close()

    plain.eval()
    sn.eval()
    after_sn = _effective_norms(sn)
    for i, (name, m_plain) in enumerate(_linears(plain)):
        m_sn = sn.get_submodule(name)
        result.layers.append(
            LayerReport(
                name=name,
                plain_before=before_plain[i],
                plain_after=_true_norm(m_plain.weight),
                sn_sigma_before=before_sigma[i],
                sn_raw_after=_true_norm(m_sn.weight),
                sn_sigma_after=spectral_sigma(m_sn).item(),
                sn_effective_before=before_sn[i],
                sn_effective_after=after_sn[i],
            )
        )
    result.plain_bound = math.prod(r.plain_after for r in result.layers)
    result.sn_bound = math.prod(r.sn_effective_after for r in result.layers)
    with torch.no_grad():
        result.plain_accuracy = _accuracy(plain, x_test, y_test)
        result.sn_accuracy = _accuracy(sn, x_test, y_test)
    result.plain_jacobian = _max_jacobian_norm(plain, x_test)
    result.sn_jacobian = _max_jacobian_norm(sn, x_test)
    result.plain_model, result.sn_model = plain, sn
    result.seconds = time.perf_counter() - start
    _print_report(result, names, steps, out)
    return result


def _print_report(r: DemoResult, names: list[str], steps: int, out: TextIO) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"\nTwo spirals, MLP with {len(names)} Linear layers, {steps} Adam steps each ({r.seconds:.1f} s).")
    p("||W|| is the true spectral norm (torch.linalg.matrix_norm(ord=2)); sigma_hat is fx_spectral.spectral_sigma.\n")
    head = (
        f"{'layer':>5} | {'plain twin ||W||':^17} | {'spectral-normalized: before':^31} | "
        f"{'after':^31}"
    )
    sub = (
        f"{'':>5} | {'before':>8} {'after':>8} | {'||W||':>9} {'sigma_hat':>10} {'||W/s_hat||':>11} | "
        f"{'||W||':>9} {'sigma_hat':>10} {'||W/s_hat||':>11}"
    )
    p(head)
    p(sub)
    p("-" * len(sub))
    for lr in r.layers:
        p(
            f"{lr.name:>5} | {lr.plain_before:8.4f} {lr.plain_after:8.4f} | {lr.plain_before:9.4f} "
            f"{lr.sn_sigma_before:10.4f} {lr.sn_effective_before:11.4f} | {lr.sn_raw_after:9.4f} "
            f"{lr.sn_sigma_after:10.4f} {lr.sn_effective_after:11.4f}"
        )
    p("\nLipschitz constant (l2 norm) of each network after training:")
    p("  upper bound = product of the per-layer norms (ReLU is 1-Lipschitz); lower bound = max ||J(x)|| on test points")
    p(f"  plain twin:           upper bound {r.plain_bound:10.3f}   lower bound {r.plain_jacobian:8.3f}")
    p(f"  spectral-normalized:  upper bound {r.sn_bound:10.3f}   lower bound {r.sn_jacobian:8.3f}")
    p("\nTest accuracy:")
    p(f"  plain twin:           {100 * r.plain_accuracy:5.1f}%")
    p(f"  spectral-normalized:  {100 * r.sn_accuracy:5.1f}%")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=400, help="training steps per network (default: 400)")
    parser.add_argument("--width", type=int, default=64, help="hidden units per layer (default: 64)")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    run(
        steps=args.steps,
        width=args.width,
        depth=args.depth,
        seed=args.seed,
        num_threads=args.threads,
        progress=not args.no_progress,
    )
    return 0
