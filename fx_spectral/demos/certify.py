r"""Certified robustness, shown: an operator-norm-controlled CNN next to a matrix-mode spectral-norm twin.

Both CNNs start from the same weights and train on scikit-learn's bundled 8x8 digits (no
download). They differ in how each convolution's norm is controlled:

* **operator**: :func:`fx_spectral.apply_spectral_norm` with ``mode="operator"``: each conv computes
  with ``W / sigma_op``, ``sigma_op`` a power-iteration estimate of the convolution's operator norm
  at that layer's input shape (the Linear with ``W / sigma(W)``). The estimate is a lower bound, so
  each layer's true operator norm is 1 or slightly above; the certificate reads the proven upper
  bounds of the weights the forward uses, so it is true either way (GroupSort is 1-Lipschitz);
* **matrix**: :func:`fx_spectral.apply_spectral_norm`, torch-style ``W / sigma(W_mat)`` with the
  reshaped kernel ``W_mat``; each conv's true operator norm is then *above* 1.

Both are trained on ``logit_scale * f(x)`` with cross entropy. Then :func:`fx_spectral.certify`
reads a Lipschitz bound ``L`` off each graph, and an example is certified at l2 radius ``eps``
when it is classified correctly with margin ``m = f_y - max_{j != y} f_j >= sqrt(2) L eps``
(``f_y - f_j`` is ``sqrt(2) L``-Lipschitz). The report lists each layer's true operator norm
(attained lower / proven upper), the certified accuracy at a few radii, and the attained
Lipschitz lower bound next to the certified one.

Example::

    >>> from fx_spectral.demos.certify import run
    >>> result = run(epochs=2, out_dir=None)
    >>> result.operator.attained <= result.operator.bound < result.matrix.bound
    True
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fx_spectral.certificates import certify
from fx_spectral.nn import apply_spectral_norm
from fx_spectral.operator_norms import effective_weight, operator_norm

RADII = (0.1, 0.2, 0.3, 0.4)


def load_digits_tensors(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits in [0, 1]: ``(x_train, y_train, x_test, y_test)``, 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the demo extra installs it
        raise ImportError("the certify demo needs scikit-learn: pip install 'fx_spectral[demo]'") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


class GroupSort(nn.Module):
    """Sort channel pairs (MaxMin, Anil et al. 2019): 1-Lipschitz and gradient-norm preserving, so a
    network of norm-1 layers does not lose signal the way it does through ReLU."""

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(1, (-1, 2)).sort(dim=2).values.flatten(1, 2)


def make_cnn(width: int = 16) -> nn.Sequential:
    """conv(1->w) - conv(w->2w, stride 2) - conv(2w->2w, stride 2) - Linear(8w -> 10), GroupSort between."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), GroupSort(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), GroupSort(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), GroupSort(),
        nn.Flatten(), nn.Linear(2 * width * 4, 10),
    )


def _layers(model: nn.Module) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, one example's input shape) of each Conv2d / Linear, in order."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: shapes.__setitem__(n, tuple(a[0].shape[1:])))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 8))
    for h in hooks:
        h.remove()
    return [(n, m, shapes[n]) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def settle_(model: nn.Module, x: Tensor, steps: int) -> None:
    """Run ``steps`` no-grad training-mode forwards on ``x`` so that each layer's power iteration
    catches up with the final weights (one iteration per forward, as during training), then
    switch to eval mode. NB: mutates the models' ``u``/``v`` buffers in place; the weights do not
    change (no BatchNorm here, whose running statistics would)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    model.eval()


@dataclass
class LayerNorms:
    name: str
    lower: float  # attained: ||A v|| / ||v||
    upper: float  # proven
    matrix: float  # ||W_mat||_2 of the weight the forward uses (the reshaped-kernel norm)


@dataclass
class ModelReport:
    label: str
    clean_accuracy: float
    bound: float  # certified Lipschitz constant
    attained: float  # attained lower bound of the Lipschitz constant
    certified: dict[float, float]  # radius -> certified accuracy
    layers: list[LayerNorms] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class DemoResult:
    operator: ModelReport
    matrix: ModelReport
    png: Path | None


def _margins(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        logits = model(x)
    correct = logits.argmax(1) == y
    top = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], -math.inf).max(1).values
    return correct, top - other


def _train(model, x, y, *, epochs, batch_size, lr, logit_scale, seed) -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            loss = F.cross_entropy(logit_scale * model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t0


def _report(label, model, layers, x_test, y_test, attain_steps, seconds) -> ModelReport:
    cert = certify(model, x_test[:2])
    correct, margin = _margins(model, x_test, y_test)
    certified = {r: float((correct & (margin >= math.sqrt(2) * cert.bound * r)).float().mean()) for r in RADII}
    norms = []
    for name, m, shape in layers:
        r = operator_norm(m, shape, n_iter=48, restarts=3)
        w = effective_weight(m).double().flatten(1)
        layer_name = f"{name}:{type(m).__name__.removeprefix('Parametrized').removeprefix('Spectral')}"
        norms.append(LayerNorms(layer_name, r.lower, r.upper, float(torch.linalg.matrix_norm(w, ord=2))))
    attained = cert.attained(model, x_test[:32], steps=attain_steps)
    return ModelReport(label, float(correct.float().mean()), cert.bound, attained, certified, norms, seconds)


def run(
    *,
    epochs: int = 30,
    width: int = 16,
    batch_size: int = 64,
    lr: float = 3e-3,
    logit_scale: float = 16.0,
    attain_steps: int = 50,
    settle_steps: int = 100,
    seed: int = 0,
    out_dir: str | Path | None = "certify_demo",
    out: TextIO | None = None,
) -> DemoResult:
    """Train both CNNs, certify them, print the report (to ``out``) and write ``certify.png``.

    Args:
        epochs: passes over the 1437 training digits. width: channels of the first conv.
        logit_scale: the fixed temperature of the training loss (``CE(logit_scale * f(x))``).
        attain_steps: gradient-ascent steps of the attained Lipschitz lower bound.
        settle_steps: no-grad power-iteration forwards after training (:func:`settle_`).
        out_dir: folder of the PNG (``None``: no plot).
    """
    out = out if out is not None else sys.stdout
    x_tr, y_tr, x_te, y_te = load_digits_tensors(seed)
    torch.manual_seed(seed)
    base = make_cnn(width)
    op_model, mx_model = copy.deepcopy(base), copy.deepcopy(base)
    apply_spectral_norm(op_model, mode="operator")
    layers_op = _layers(op_model)  # its first forward fixes each conv's input shape
    apply_spectral_norm(mx_model)
    layers_mx = _layers(mx_model)
    kw = dict(epochs=epochs, batch_size=batch_size, lr=lr, logit_scale=logit_scale, seed=seed)
    t_op = _train(op_model, x_tr, y_tr, **kw)
    t_mx = _train(mx_model, x_tr, y_tr, **kw)
    for m in (op_model, mx_model):
        settle_(m, x_tr[:1], settle_steps)
    rep_op = _report("operator mode", op_model, layers_op, x_te, y_te, attain_steps, t_op)
    rep_mx = _report("matrix (torch-style SN)", mx_model, layers_mx, x_te, y_te, attain_steps, t_mx)
    png = _plot(rep_op, rep_mx, Path(out_dir)) if out_dir is not None else None
    _print(rep_op, rep_mx, png, epochs, out)
    return DemoResult(rep_op, rep_mx, png)


def _print(a: ModelReport, b: ModelReport, png, epochs: int, out: TextIO) -> None:
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"certify-demo: two CNNs on the 8x8 digits ({epochs} epochs each); l2 radii on [0, 1] pixels")
    for r in (a, b):
        p(f"\n== {r.label}: clean accuracy {r.clean_accuracy:.3f}, trained in {r.seconds:.1f} s")
        p(f"   certified Lipschitz bound L = {r.bound:.4f}; attained lower bound {r.attained:.4f} "
          f"(attained / certified = {r.attained / r.bound:.3f})")
        p("   certified accuracy: " + ", ".join(f"eps={e}: {v:.3f}" for e, v in r.certified.items()))
        p("   layer         operator norm:  lower     upper  | reshaped-kernel norm")
        for ln in r.layers:
            p(f"   {ln.name:12s}                {ln.lower:8.4f}  {ln.upper:8.4f}  | {ln.matrix:8.4f}")
    p(f"\nThe matrix-mode twin's layers have reshaped-kernel norm 1 but operator norms up to "
      f"{max(ln.lower for ln in b.layers):.3f} (attained): its Lipschitz constant is at least "
      f"{b.attained:.3f}, not 1.")
    if png is not None:
        p(f"plot: {png}")


def _plot(a: ModelReport, b: ModelReport, out_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    radii = (0.0,) + RADII
    for r, style in ((a, "o-"), (b, "s--")):
        accs = [r.clean_accuracy] + [r.certified[e] for e in RADII]
        ax1.plot(radii, accs, style, label=f"{r.label}, L={r.bound:.2f}")
    ax1.set(xlabel="l2 radius", ylabel="certified accuracy", title="Certified accuracy (margin / (sqrt 2 L))")
    ax1.legend()
    x = range(len(a.layers))
    ax2.bar([i - 0.2 for i in x], [ln.upper for ln in a.layers], 0.4, label="operator mode")
    ax2.bar([i + 0.2 for i in x], [ln.upper for ln in b.layers], 0.4, label="matrix SN (torch-style)")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xticks(list(x), [ln.name for ln in a.layers])
    ax2.set(ylabel="operator norm (proven upper)", title="Per-layer operator norm")
    ax2.legend()
    fig.tight_layout()
    path = out_dir / "certify.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per network (default: 30)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv (default: 16)")
    parser.add_argument("--attain-steps", type=int, default=50, help="ascent steps of the attained bound (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default="certify_demo", help="folder of the PNG (default: certify_demo)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")


def run_from_args(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run(epochs=args.epochs, width=args.width, attain_steps=args.attain_steps, seed=args.seed, out_dir=args.out)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
