r"""The Lipschitz-transformer demo (``fx-spectral demo``), after arXiv 2507.13338.

A small paper-style transformer (:mod:`fx_spectral.models`: convex residuals, ``1/d_head``
attention, ``GELU/1.1289``, no LayerNorm) learns to predict the next character of Python source:
the ``*.py`` files at the top of this interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), split into train / validation **by file** (a file goes to
validation when ``crc32(name) % 10 == 0``; deterministic, no download).

Two models start from the same weights and see the same batches:

* **constrained**: ``torch.optim.Muon`` on the hidden matrices (Q, K, V, O, MLP) with
  :func:`fx_spectral.constraint.constrain` projecting them after every step (default: the exact
  cap ``"hard_cap"`` with ``mode="eigh"``); every token is projected onto the ball of radius
  ``attn_ball * sqrt(dim)`` before each attention (1-Lipschitz, so free in the bound; it keeps the
  attention's softmax term from growing with depth); the LM head has its own Muon and its own cap
  (same method); AdamW on the embedding and the position bias; embedding rows are capped by
  ``max_norm``;
* **twin**: the plain architecture (no ball projection) from the same initial weights, trained by
  AdamW with no constraint.

At the end it prints validation accuracy, the certified Lipschitz bound
(:func:`fx_spectral.lipschitz.lipschitz_bound`: logits vs. embedded inputs, largest per-token
l2 norm, on tokens of norm ``<= embed_max_norm``), the per-layer RMS->RMS norms and the largest
activations of both models, and writes ``metrics.json`` and ``lipschitz_demo.png`` to ``--out``.

Example::

    $ fx-spectral demo                       # default budget, ~1.5 minutes (one core)
    $ fx-spectral demo --steps 2000 --w-max 1.0 --method soft_cap --attn-ball 0 --out /tmp/demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fx_spectral.lipschitz import lipschitz_bound, lipschitz_terms, rms_operator_norms
from fx_spectral.models import LipschitzTransformer, LipschitzTransformerConfig

__all__ = ["DemoConfig", "add_arguments", "load_stdlib_corpus", "run", "run_from_args"]

#: Characters with their own token (tab, newline, printable ASCII); token 0 is "anything else".
ALPHABET = "\t\n" + "".join(chr(i) for i in range(32, 127))
VOCAB_SIZE = len(ALPHABET) + 1


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Everything the demo run depends on (defaults: the tuned default budget)."""

    steps: int = 400
    batch_size: int = 32
    seq_len: int = 64
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 1
    embed_max_norm: float | None = None  # None: sqrt(dim), i.e. unit RMS per token
    method: str = "hard_cap"
    cap_mode: str | None = "eigh"  # hard_cap's mode (exact by eigh; "msign" on accelerators)
    attn_ball: float | None = 1.0  # tokens projected onto the ball of radius attn_ball * radius before attention
    w_max: float = 1.5  # RMS->RMS cap of the attention's V and O
    w_max_qk: float = 0.3  # RMS->RMS cap of Q and K (how sharp content-based attention can be)
    w_max_mlp: float = 1.8  # RMS->RMS cap of the MLP's two weights
    w_max_head: float = 2.0  # cap of the LM head, l2 operator norm (the bound's last factor)
    muon_lr: float = 0.1
    head_lr: float = 0.25  # Muon learning rate of the constrained model's LM head
    adamw_lr: float = 0.02  # embedding and position bias of the constrained model
    twin_lr: float = 0.006  # every weight of the twin
    warmdown: float = 0.5  # linear learning-rate decay over the last fraction of steps
    eval_batches: int = 16
    log_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "dim", "n_layers", "n_heads", "eval_batches", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoConfig.{name}: expected a positive int, got {value!r}")
        for name in ("w_max", "w_max_qk", "w_max_mlp", "w_max_head", "muon_lr", "head_lr", "adamw_lr", "twin_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DemoConfig.{name}: expected > 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmdown <= 1:
            raise ValueError(f"DemoConfig.warmdown: expected in [0, 1], got {self.warmdown!r}")
        if self.attn_ball is not None and not self.attn_ball > 0:
            raise ValueError(f"DemoConfig.attn_ball: expected > 0 or None, got {self.attn_ball!r}")

    @property
    def method_options(self) -> dict:
        """Options passed to ``constrain()`` with ``method`` (hard_cap's ``mode``)."""
        return {"mode": self.cap_mode} if self.method == "hard_cap" and self.cap_mode is not None else {}

    @property
    def radius(self) -> float:
        return self.embed_max_norm if self.embed_max_norm is not None else math.sqrt(self.dim)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _encode(text: str) -> Tensor:
    table = torch.zeros(128, dtype=torch.long)
    for i, ch in enumerate(ALPHABET):
        table[ord(ch)] = i + 1
    raw = torch.frombuffer(bytearray(text.encode("ascii", errors="replace")), dtype=torch.uint8)
    return table[raw.long().clamp(max=127)]


def load_stdlib_corpus(root: str | Path | None = None) -> tuple[Tensor, Tensor, dict]:
    """Token ids of the standard library's top-level ``*.py`` files: ``(train, val, info)``.

    A file goes to validation when ``zlib.crc32(file_name) % 10 == 0`` (stable across machines).
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    train, val = [], []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        (val if zlib.crc32(path.name.encode()) % 10 == 0 else train).append(text)
    if not train or not val:
        raise RuntimeError(f"demo: need *.py files for both splits under {root}, found {len(files)} files")
    info = {"root": str(root), "train_files": len(train), "val_files": len(val)}
    return _encode("\n".join(train)), _encode("\n".join(val)), info


def _batch(data: Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------------------------
# models and optimizers
# ---------------------------------------------------------------------------------------------


def _hidden(name: str, p: Tensor) -> bool:
    return p.ndim == 2 and name.startswith("layers.") and name.endswith(".weight")


class _StepTimer:
    """Times ``optimizer.step()``: the optimizer itself, then the post-hooks registered after it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.mid = 0.0
        optimizer.register_step_post_hook(self._mark)  # runs before constrain()'s hook

    def _mark(self, *_args) -> None:
        self.mid = time.perf_counter()


def _build_constrained(model: nn.Module, cfg: DemoConfig):
    from fx_spectral.constraint import constrain

    hidden = [p for n, p in model.named_parameters() if _hidden(n, p)]
    others = [p for n, p in model.named_parameters() if not _hidden(n, p) and n != "lm_head.weight"]
    muon = torch.optim.Muon(hidden, lr=cfg.muon_lr)
    # The head gets its own Muon: orthogonalized updates lift *every* singular value towards the
    # cap, so the whole budget ||W_head|| <= w_max_head is used, not only the top direction
    # (AdamW + spectral normalization left most of the head's spectrum far below the cap).
    head_muon = torch.optim.Muon([model.lm_head.weight], lr=cfg.head_lr)
    adamw = torch.optim.AdamW(others, lr=cfg.adamw_lr, weight_decay=0.0)
    optimizers = [muon, head_muon, adamw]
    timers = [_StepTimer(opt) for opt in optimizers]
    w_max = {
        "*.attn.wq.weight": cfg.w_max_qk,
        "*.attn.wk.weight": cfg.w_max_qk,
        "*.mlp.*": cfg.w_max_mlp,
        "*": cfg.w_max,
    }
    hidden_handle = constrain(model, muon, cfg.method, w_max=w_max, **cfg.method_options)
    hidden_handle.project("pure_svd")  # start inside the ball
    # The head is capped in l2 units; constrain() works in RMS->RMS units (scale sqrt(out/in)).
    out_f, in_f = model.lm_head.weight.shape
    head_handle = constrain(
        model,
        head_muon,
        cfg.method,
        w_max=cfg.w_max_head / math.sqrt(out_f / in_f),
        include="lm_head.weight",
        **cfg.method_options,
    )
    head_handle.project("pure_svd")
    return optimizers, [hidden_handle, head_handle], timers


def _set_lr(optimizers, step: int, cfg: DemoConfig) -> None:
    left = 1 - step / cfg.steps
    factor = min(1.0, left / cfg.warmdown) if cfg.warmdown > 0 else 1.0
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor


@torch.no_grad()
def _evaluate(model: nn.Module, batches) -> tuple[float, float]:
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in batches:
        logits = model(x)
        loss += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        total += y.numel()
    model.train()
    return correct / total, loss / total


@torch.no_grad()
def max_activations(model: LipschitzTransformer, x: Tensor) -> dict[str, float]:
    """Largest ``|entry|`` of the embeddings, of every block's output and of the logits."""
    out = {}
    h = model.tok_emb(x)
    out["tok_emb"] = h.abs().max().item()
    for i, block in enumerate(model.layers):
        h = block(h)
        out[f"layers.{i}"] = h.abs().max().item()
    out["lm_head"] = model.lm_head(h).abs().max().item()
    return out


def _snapshot(model, cfg: DemoConfig, step: int, loss: float) -> dict:
    norms = rms_operator_norms(model)
    hidden = [v for k, v in norms.items() if k.startswith("layers.")]
    return {
        "step": step,
        "loss": loss,
        "bound": lipschitz_bound(model, input_radius=cfg.radius),
        "max_hidden_rms_norm": max(hidden),
        "head_l2_norm": float(torch.linalg.matrix_norm(model.lm_head.weight.detach(), ord=2)),
    }


def _train(name, model, optimizers, timers, train, cfg: DemoConfig, progress: bool) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed + 1)  # same batches for both models
    history, smooth = [], None
    t_step = t_opt = t_hooks = 0.0
    bar = tqdm(range(cfg.steps), desc=f"{name:>11}", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        _set_lr(optimizers, step, cfg)
        x, y = _batch(train, cfg.batch_size, cfg.seq_len, gen)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt, timer in zip(optimizers, timers or [None] * len(optimizers)):
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if timer is not None:
                t_opt += timer.mid - t1
                t_hooks += t2 - timer.mid
        t_step += time.perf_counter() - t0
        value = loss.item()
        smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            history.append(_snapshot(model, cfg, step, smooth))
            bar.set_postfix(loss=f"{smooth:.3f}", bound=f"{history[-1]['bound']:.3g}")
    n = max(cfg.steps, 1)
    timing = {"step_ms": 1e3 * t_step / n}
    if timers:
        timing.update({"optimizer_ms": 1e3 * t_opt / n, "constrain_ms": 1e3 * t_hooks / n})
    return history, timing


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def run(
    cfg: DemoConfig = DemoConfig(),
    *,
    out: str | Path = "fx_spectral_demo",
    progress: bool = True,
    corpus: tuple[Tensor, Tensor, dict] | None = None,
    stream=None,
    twin: bool = True,
) -> dict:
    """Train both models, write ``metrics.json`` and ``lipschitz_demo.png`` to ``out``, return the metrics.

    ``twin=False`` trains the constrained model only (the twin does not depend on the caps, the
    method or ``attn_ball``: a sweep over those trains it once per seed).
    """
    stream = stream if stream is not None else sys.stdout
    t_start = time.perf_counter()
    train, val, info = corpus if corpus is not None else load_stdlib_corpus()
    print(
        f"corpus: {info['train_files']} train / {info['val_files']} validation files of {info['root']} "
        f"({len(train):,} / {len(val):,} characters)",
        file=stream,
    )
    vgen = torch.Generator().manual_seed(1234)
    val_batches = [_batch(val, 64, cfg.seq_len, vgen) for _ in range(cfg.eval_batches)]

    torch.manual_seed(cfg.seed)
    mcfg = LipschitzTransformerConfig(
        vocab_size=VOCAB_SIZE,
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        max_seq_len=cfg.seq_len,
        embed_max_norm=cfg.radius,
    )
    ball = None if cfg.attn_ball is None else cfg.attn_ball * cfg.radius
    constrained = LipschitzTransformer(dataclasses.replace(mcfg, attn_input_radius=ball))
    # the twin is the plain architecture (no ball projection: nothing in it is there for the
    # bound), from the same initial weights (the projection has no parameters)
    with torch.random.fork_rng():  # (its own init draws are overwritten: leave the RNG as it was)
        twin_model = LipschitzTransformer(mcfg)
    twin_model.load_state_dict(constrained.state_dict())

    optimizers, handles, timers = _build_constrained(constrained, cfg)
    results = {}
    hist, timing = _train("constrained", constrained, optimizers, timers, train, cfg, progress)
    results["constrained"] = (hist, timing)
    models = [("constrained", constrained)]
    if twin:
        twin_opt = torch.optim.AdamW(twin_model.parameters(), lr=cfg.twin_lr, weight_decay=0.0)
        hist, timing = _train("twin", twin_model, [twin_opt], None, train, cfg, progress)
        results["twin"] = (hist, timing)
        models.append(("twin", twin_model))

    metrics = {"config": asdict(cfg), "corpus": info, "models": {}}
    for name, model in models:
        acc, loss = _evaluate(model, val_batches)
        hist, timing = results[name]
        terms = lipschitz_terms(model, input_radius=cfg.radius)
        metrics["models"][name] = {
            "val_accuracy": acc,
            "val_loss": loss,
            "lipschitz_bound": math.prod(t.factor for t in terms),
            "bound_terms": {t.name: t.factor for t in terms},
            "rms_norms": rms_operator_norms(model),
            "max_activations": max_activations(model, val_batches[0][0]),
            "timing": timing,
            "history": hist,
        }
    # constrain()'s own view: sigma of every projected weight in RMS->RMS units, and its cap.
    metrics["models"]["constrained"]["constrain_report"] = {k: v for h in handles for k, v in h.report().items()}
    metrics["wall_s"] = time.perf_counter() - t_start
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot(metrics, out / "lipschitz_demo.png")
    _print_summary(metrics, out, stream)
    return metrics


def _plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, style in (("constrained", "-"), ("twin", "--")):
        if name not in metrics["models"]:
            continue
        hist = metrics["models"][name]["history"]
        steps = [h["step"] for h in hist]
        axes[0].plot(steps, [h["loss"] for h in hist], style, label=name)
        axes[1].plot(steps, [h["bound"] for h in hist], style, label=name)
        axes[2].plot(steps, [h["max_hidden_rms_norm"] for h in hist], style, label=f"{name}: max hidden RMS->RMS")
        axes[2].plot(steps, [h["head_l2_norm"] for h in hist], style, alpha=0.6, label=f"{name}: head l2")
    axes[0].set(title="training loss (EMA)", xlabel="step", ylabel="cross-entropy (nats)")
    axes[1].set(title="certified Lipschitz bound", xlabel="step", yscale="log")
    axes[2].set(title="weight norms", xlabel="step", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.92, wspace=0.25)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_summary(metrics: dict, out: Path, stream) -> None:
    models = metrics["models"]
    names = [n for n in ("constrained", "twin") if n in models]
    c = models["constrained"]
    p = lambda *a: print(*a, file=stream)  # noqa: E731
    row = lambda label, key, fmt: p(f"{label:28}" + "".join(f"{models[n][key]:>14{fmt}}" for n in names))  # noqa: E731
    p("")
    p(f"{'':28}" + "".join(f"{n:>14}" for n in names))
    row("validation accuracy", "val_accuracy", ".4f")
    row("validation loss (nats)", "val_loss", ".4f")
    row("certified Lipschitz bound", "lipschitz_bound", ".4g")
    p("per-layer RMS->RMS norms:")
    for k in c["rms_norms"]:
        p(f"  {k:26}" + "".join(f"{models[n]['rms_norms'][k]:>14.4f}" for n in names))
    p("largest |activation|:")
    for k in c["max_activations"]:
        p(f"  {k:26}" + "".join(f"{models[n]['max_activations'][k]:>14.4g}" for n in names))
    ct = c["timing"]
    twin = f", twin {models['twin']['timing']['step_ms']:.1f} ms" if "twin" in models else ""
    p(
        f"time per step: constrained {ct['step_ms']:.1f} ms (Muon+AdamW {ct['optimizer_ms']:.2f} ms, "
        f"constrain() {ct['constrain_ms']:.2f} ms){twin}"
    )
    p(f"wall time {metrics['wall_s']:.1f} s; wrote {out / 'metrics.json'} and {out / 'lipschitz_demo.png'}")


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    a = parser.add_argument
    a("--steps", type=int, default=d.steps, help="training steps per model (default %(default)s)")
    a("--method", default=d.method, help="constrain() method for the hidden weights (default %(default)s)")
    a(
        "--cap-mode",
        default=d.cap_mode,
        choices=["polynomial", "eigh", "msign"],
        help="hard_cap's mode (default %(default)s: exact, eigendecomposition; msign: exact, matrix products)",
    )
    a(
        "--attn-ball",
        type=float,
        default=d.attn_ball,
        help="project tokens onto the ball of radius ATTN_BALL*sqrt(dim) before each attention; 0: off "
        "(default %(default)s)",
    )
    a("--no-twin", action="store_true", help="train the constrained model only")
    a("--w-max", type=float, default=d.w_max, help="RMS->RMS cap of attention V, O (default %(default)s)")
    a("--w-max-qk", type=float, default=d.w_max_qk, help="RMS->RMS cap of Q, K (default %(default)s)")
    a("--w-max-mlp", type=float, default=d.w_max_mlp, help="RMS->RMS cap of the MLP (default %(default)s)")
    a("--w-max-head", type=float, default=d.w_max_head, help="l2 cap of the LM head (default %(default)s)")
    a("--muon-lr", type=float, default=d.muon_lr)
    a("--head-lr", type=float, default=d.head_lr, help="Muon lr of the constrained model's head")
    a("--adamw-lr", type=float, default=d.adamw_lr)
    a("--twin-lr", type=float, default=d.twin_lr)
    a("--dim", type=int, default=d.dim)
    a("--layers", type=int, default=d.n_layers)
    a("--heads", type=int, default=d.n_heads)
    a("--seq-len", type=int, default=d.seq_len)
    a("--batch-size", type=int, default=d.batch_size)
    a("--seed", type=int, default=d.seed)
    a(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 0 keeps torch's choice (default 1: many small ops, and a busy "
        "machine makes multi-threaded small ops crawl)",
    )
    a("--out", default="./fx_spectral_demo/", help="output directory (default %(default)s)")
    a("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _run_args(args)
    finally:
        torch.set_num_threads(previous)
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments before anything runs (``fx-spectral`` turns the ValueError into a usage error)."""
    from fx_spectral.methods import METHODS

    if args.method not in METHODS:
        raise ValueError(f"--method: expected one of {', '.join(sorted(METHODS))}; got {args.method!r}")
    if args.threads < 0:
        raise ValueError(f"--threads: expected >= 0, got {args.threads}")
    _config(args)  # DemoConfig validates the rest


def _run_args(args: argparse.Namespace) -> None:
    run(_config(args), out=args.out, progress=not args.no_progress, twin=not args.no_twin)


def _config(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        steps=args.steps,
        method=args.method,
        cap_mode=args.cap_mode,
        attn_ball=args.attn_ball or None,
        w_max=args.w_max,
        w_max_qk=args.w_max_qk,
        w_max_mlp=args.w_max_mlp,
        w_max_head=args.w_max_head,
        muon_lr=args.muon_lr,
        head_lr=args.head_lr,
        adamw_lr=args.adamw_lr,
        twin_lr=args.twin_lr,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fx_spectral.demos.lipschitz", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
