"""Training-step overhead of spectral normalization: fx_spectral against torch's own and plain training.

One training step is forward + loss + backward + SGD step. Every variant of a model is built from
the same initial weights, then timed in interleaved rounds (each round runs every variant once, in
a rotating order) so that machine noise hits all variants alike; the table reports medians over
rounds and ratios against plain eager and against the best plain variant (eager or inductor).

Run::

    python benchmarks/step_overhead.py                 # all models, 21 rounds
    python benchmarks/step_overhead.py --quick         # smoke run (a few rounds)
    python benchmarks/step_overhead.py --models mlp gpt --rounds 30 --markdown out.md
    python benchmarks/step_overhead.py --device cuda --autocast bf16   # GPU (benchmarks/gpu.sh)

Besides the times and ratios it prints a "targets" table: each performance target of the project
(best fx_spectral vs best plain, the "spectral" backend vs plain inductor and vs torch's
spectral_norm under inductor, fx_spectral eager vs torch's spectral_norm eager and vs plain eager,
first-call compile time) per model, with the measured ratio and whether it is met.

Adding a variant is one entry in ``VARIANTS``: a function ``builder(model) -> forward`` that may
modify ``model`` in place and returns the callable run as the forward (the model itself, or a
compiled / transformed module). The SGD optimizer is built afterwards over ``model.parameters()``
(and the returned module's, if it is a different module), so in-place transforms that keep the
parameters' identity need nothing else.
"""

from __future__ import annotations

import os

# First-call (compile) times must not be served from a warm on-disk cache (and see _cold_cache).
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import fx_spectral  # noqa: E402

# Several models of the same classes get compiled in one process: give dynamo room.
for _knob in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _knob):
        setattr(torch._dynamo.config, _knob, 64)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """4 Linear layers of width 512 with ReLU between them."""

    def __init__(self, width: int = 512, depth: int = 4, n_classes: int = 10):
        super().__init__()
        dims = [width] * depth + [n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator for 3×64×64 images (ndf=32): strided 4×4 convs, BatchNorm, LeakyReLU."""

    def __init__(self, nc: int = 3, ndf: int = 32):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x).flatten(1)


class DCGANGenerator(nn.Module):
    """DCGAN generator (ConvTranspose2d, BatchNorm, ReLU, Tanh): nz=64 noise to 3×32×32 images (ngf=16)."""

    def __init__(self, nz: int = 64, ngf: int = 16, nc: int = 3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention (q, k, v, o Linears) and a GELU MLP."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        heads = (b, t, self.n_heads, d // self.n_heads)
        q, k, v = (lin(h).view(heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT: token + position embeddings, ``n_layers`` blocks, final LayerNorm, Linear LM head."""

    def __init__(self, vocab: int = 1024, d: int = 256, n_layers: int = 4, n_heads: int = 8, max_len: int = 128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@dataclass(frozen=True)
class Case:
    """A benchmark model: how to build it, one batch of inputs and targets, and the loss."""

    title: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]


def _gpt_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


CASES: dict[str, Case] = {
    "mlp": Case(
        "MLP 4×512, batch 64",
        MLP,
        lambda: (torch.randn(64, 512), torch.randint(0, 10, (64,))),
        F.cross_entropy,
    ),
    "dcgan_d": Case(
        "DCGAN discriminator, 16×3×64×64",
        DCGANDiscriminator,
        lambda: (torch.randn(16, 3, 64, 64), torch.randint(0, 2, (16, 1)).float()),
        F.binary_cross_entropy_with_logits,
    ),
    "dcgan_g": Case(
        "DCGAN generator (ConvTranspose), batch 16",
        DCGANGenerator,
        lambda: (torch.randn(16, 64, 1, 1), torch.rand(16, 3, 32, 32) * 2 - 1),
        F.mse_loss,
    ),
    "gpt": Case(
        "GPT 4 layers d=256, 8×128 tokens",
        GPT,
        lambda: (torch.randint(0, 1024, (8, 128)), torch.randint(0, 1024, (8, 128))),
        _gpt_loss,
    ),
}


# --------------------------------------------------------------------------------------------
# Variants: builder(model) -> forward callable
# --------------------------------------------------------------------------------------------
_SN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def torch_spectral_norm(model: nn.Module) -> nn.Module:
    """torch.nn.utils.parametrizations.spectral_norm on every Linear / Conv / ConvTranspose (ConvT: dim=1)."""
    for module in list(model.modules()):
        if isinstance(module, _SN_TYPES):
            dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
            torch.nn.utils.parametrizations.spectral_norm(module, dim=dim)
    return model


def fx_spectral_eager(model: nn.Module) -> nn.Module:
    fx_spectral.apply_spectral_norm(model)
    return model


VARIANTS: dict[str, Callable[[nn.Module], Callable]] = {
    "plain eager": lambda m: m,
    "plain inductor": lambda m: torch.compile(m),
    "torch SN eager": torch_spectral_norm,
    "torch SN inductor": lambda m: torch.compile(torch_spectral_norm(m)),
    "fx_spectral eager": fx_spectral_eager,
    "fx_spectral eager + inductor": lambda m: torch.compile(fx_spectral_eager(m)),
    "fx_spectral transform": lambda m: fx_spectral.transform(m),
    "fx_spectral transform + inductor": lambda m: torch.compile(fx_spectral.transform(m)),
    'backend="spectral"': lambda m: torch.compile(m, backend="spectral"),
}
#: Variants the "best plain" ratio is taken against.
PLAIN = ("plain eager", "plain inductor")
#: Variants whose first call compiles (their first-call time is reported).
COMPILED_MARKERS = ("inductor", "backend", "compile")
#: fx_spectral's variants (the "best fx_spectral" of a model is the fastest of these that ran).
SPECTRAL = tuple(n for n in VARIANTS if n.startswith("fx_spectral") or n == 'backend="spectral"')


@dataclass(frozen=True)
class Target:
    """A performance target: the best (lowest) of ``num`` over the best of ``den`` must be ``<= limit``
    (``< limit`` if ``strict``), per model (``models``: only those), on step times or first-call times."""

    label: str
    num: tuple[str, ...]
    den: tuple[str, ...]
    limit: float
    strict: bool = False
    first_call: bool = False
    models: tuple[str, ...] | None = None


#: The project's performance targets (issue 12), checked by the "targets" table.
TARGETS = (
    Target("best fx_spectral ≤ 1.05× best plain", SPECTRAL, PLAIN, 1.05),
    Target('backend="spectral" ≤ 1.05× plain inductor', ('backend="spectral"',), ("plain inductor",), 1.05),
    Target('backend="spectral" faster than torch SN inductor', ('backend="spectral"',), ("torch SN inductor",), 1.0,
           strict=True),
    Target("fx_spectral eager ≥ 5% faster than torch SN eager (≤ 0.95×)", ("fx_spectral eager",),
           ("torch SN eager",), 0.95),
    Target("fx_spectral eager ≤ 1.15× plain eager (MLP)", ("fx_spectral eager",), ("plain eager",), 1.15,
           models=("mlp",)),
    Target('first call (caches off): backend="spectral" ≤ 1.2× plain inductor', ('backend="spectral"',),
           ("plain inductor",), 1.2, first_call=True),
)


def make_step(
    model: nn.Module, forward: Callable, case: Case, device: str = "cpu", autocast: str = "none"
) -> Callable[[], None]:
    """One SGD training step over fixed inputs; the optimizer covers the model's (and forward's) parameters.

    ``model`` must already be on ``device``; the batch is moved there. ``autocast="bf16"`` runs the
    forward and the loss under ``torch.autocast(device, torch.bfloat16)`` (weights, gradients and
    the SGD step stay float32, as in mixed-precision training).
    """
    params = {id(p): p for p in model.parameters()}
    if isinstance(forward, nn.Module):
        params.update({id(p): p for p in forward.parameters()})
    opt = torch.optim.SGD(list(params.values()), lr=1e-3)
    model.train()
    if isinstance(forward, nn.Module):
        forward.train()
    x, y = (t.to(device) for t in case.make_batch())
    amp = autocast == "bf16"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            loss = case.loss(forward(x), y)
        loss.backward()
        opt.step()

    return step


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): call before reading a clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
@dataclass
class Result:
    first_call_s: float
    per_round_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.per_round_ms)

    @property
    def min_ms(self) -> float:
        return min(self.per_round_ms)

    def stat(self, name: str) -> float:
        return self.median_ms if name == "median" else self.min_ms


def _cold_cache(root: str | None) -> contextlib.AbstractContextManager:
    """A fresh, empty inductor cache for one variant's first call (under ``root``), or nothing if ``root`` is None.

    ``TORCHINDUCTOR_FORCE_DISABLE_CACHES`` alone still lets a variant reuse the C++ kernels an
    earlier variant compiled (kept in memory, and on disk by their source's hash): a spectral
    variant would then be timed without compiling the kernels it shares with plain inductor.
    """
    if root is None:
        return contextlib.nullcontext()
    from torch._inductor.utils import fresh_cache

    return fresh_cache(dir=root, delete=False)  # the compiled kernels stay loadable; root goes at the end


def bench_case(
    case: Case,
    variants: dict[str, Callable],
    rounds: int,
    warmup: int,
    round_s: float,
    clock: Callable[[], float] = time.perf_counter,
    device: str = "cpu",
    autocast: str = "none",
    cache_root: str | None = None,
) -> dict[str, Result]:
    torch.manual_seed(0)
    base = case.make_model().to(device)
    steps: dict[str, Callable[[], None]] = {}
    results: dict[str, Result] = {}
    for name, builder in variants.items():
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        step = make_step(model, builder(model), case, device, autocast)
        synchronize(device)
        t0 = time.perf_counter()
        with _cold_cache(cache_root if any(m in name for m in COMPILED_MARKERS) else None):
            step()  # first call: compiles for compiled variants, each with an empty cache
            synchronize(device)
        first = time.perf_counter() - t0
        for _ in range(warmup):
            step()
        steps[name] = step
        results[name] = Result(first, [])
        print(f"  built {name:<28} first call {first:8.2f} s", flush=True)

    # Steps per round and variant: enough to fill about round_s, from a quick estimate.
    inner: dict[str, int] = {}
    for name, step in steps.items():
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        est = time.perf_counter() - t0
        inner[name] = max(1, min(200, math.ceil(round_s / max(est, 1e-5))))
    n_inner = min(inner.values())  # same count for every variant: equal exposure to noise

    names = list(steps)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            step = steps[name]
            synchronize(device)
            t0 = clock()
            for _ in range(n_inner):
                step()
            synchronize(device)
            results[name].per_round_ms.append((clock() - t0) * 1e3 / n_inner)
    return results


def machine_info(device: str = "cpu", autocast: str = "none") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"Python {platform.python_version()}; {cpu}; {os.cpu_count()} logical CPUs, "
        f"torch threads {torch.get_num_threads()}"
    )
    if torch.device(device).type == "cuda":
        info += f"; device {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    if autocast != "none":
        info += f"; autocast {autocast}"
    return info


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def _check(target: Target, res: dict[str, Result], stat: str) -> tuple[float, str, bool] | None:
    """(ratio, the winning numerator variant, met) of ``target`` on one model's results; None if not run."""

    def value(name: str) -> float:
        return res[name].first_call_s if target.first_call else res[name].stat(stat)

    num = [n for n in target.num if n in res]
    den = [n for n in target.den if n in res]
    if not num or not den:
        return None
    best = min(num, key=value)
    ratio = value(best) / min(value(n) for n in den)
    return ratio, best, ratio < target.limit if target.strict else ratio <= target.limit


def targets_table(all_results: dict[str, dict[str, Result]], stat: str = "median") -> list[str]:
    """Markdown lines: one row per target, one column per model, each cell the ratio and met / MISSED."""
    keys = list(all_results)
    lines = ["| target | " + " | ".join(CASES[k].title for k in keys) + " |", "|---|" + "---|" * len(keys)]
    met = total = 0
    for target in TARGETS:
        cells = []
        for key in keys:
            got = None if target.models and key not in target.models else _check(target, all_results[key], stat)
            if got is None:
                cells.append("–")
                continue
            ratio, best, ok = got
            met, total = met + ok, total + 1
            which = f" ({best})" if len(target.num) > 1 else ""
            cells.append(f"{ratio:.2f}×{which} {'met' if ok else '**MISSED**'}")
        lines.append(f"| {target.label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{met} of {total} checked targets met (– : a variant it needs did not run, or another model).")
    return lines


def markdown(
    all_results: dict[str, dict[str, Result]],
    rounds: int,
    stat: str = "median",
    load: str = "",
    clock: str = "wall",
    device: str = "cpu",
    autocast: str = "none",
) -> str:
    """The results as Markdown tables: ms per step, ratios, first-call times, targets met or missed."""
    names = list(next(iter(all_results.values())))
    what = "Median" if stat == "median" else "Fastest"
    lines = [
        f"Machine: {machine_info(device, autocast)}; {load or _load()}.",
        "",
        f"{what} of {rounds} interleaved rounds, ms per training step (forward + backward + SGD step), "
        + ("wall clock:" if clock == "wall" else "process CPU time:"),
        "",
    ]
    lines.append("| model | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for key, res in all_results.items():
        lines.append(f"| {CASES[key].title} | " + " | ".join(f"{res[n].stat(stat):.3g}" for n in names) + " |")
    others = [n for n in names if n not in PLAIN]
    lines += ["", "Ratio to plain eager / to the best plain variant (lower is better):", ""]
    lines.append("| model | " + " | ".join(others) + " |")
    lines.append("|---|" + "---|" * len(others))
    for key, res in all_results.items():
        eager = res["plain eager"].stat(stat) if "plain eager" in res else math.nan
        best = min((res[n].stat(stat) for n in PLAIN if n in res), default=math.nan)
        cells = [f"{res[n].stat(stat) / eager:.2f}× / {res[n].stat(stat) / best:.2f}×" for n in others]
        lines.append(f"| {CASES[key].title} | " + " | ".join(cells) + " |")
    compiled = [n for n in names if any(m in n for m in COMPILED_MARKERS)]
    if compiled:
        lines += ["", "First call (compile, inductor caches disabled), s:", ""]
        lines.append("| model | " + " | ".join(compiled) + " |")
        lines.append("|---|" + "---|" * len(compiled))
        for key, res in all_results.items():
            lines.append(f"| {CASES[key].title} | " + " | ".join(f"{res[n].first_call_s:.1f}" for n in compiled) + " |")
    lines += ["", f"Targets ({what.lower()} step times; first call: wall clock):", ""]
    lines += targets_table(all_results, stat)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3, help="steps after the first call, before timing")
    parser.add_argument("--round-seconds", type=float, default=0.1, help="target time of one variant's turn in a round")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up step")
    parser.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="statistic over rounds for the tables (min: the least disturbed round, for a busy machine)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, robust to other load)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--autocast",
        choices=("none", "bf16"),
        default="none",
        help="bf16: forward and loss under torch.autocast(device, bfloat16) (mixed precision)",
    )
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables (Markdown) to PATH")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(
                f"--device {args.device}: no CUDA device is available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda}; torch.cuda.is_available() is False)"
            )
        if args.clock == "cpu":
            parser.error("--clock cpu measures this process's CPU time, not the GPU's work: use --clock wall on CUDA")
    if args.quick:
        args.rounds, args.warmup, args.round_seconds = 3, 1, 0.02
    variants = {name: VARIANTS[name] for name in args.variants}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if any(m in name for name in variants for m in COMPILED_MARKERS):
        # Inductor's one-time process start-up (imports, compile workers) off the first model's clock,
        # so that every compiled variant's first call measures its own compile.
        torch.compile(lambda t: t * 2)(torch.ones(2, device=device))
        synchronize(args.device)

    load_before = _load()
    print(machine_info(args.device, args.autocast), load_before, flush=True)
    all_results: dict[str, dict[str, Result]] = {}
    cache_root = tempfile.mkdtemp(prefix="step_overhead_inductor_")
    try:
        for key in args.models:
            print(f"{CASES[key].title}:", flush=True)
            all_results[key] = res = bench_case(
                CASES[key], variants, args.rounds, args.warmup, args.round_seconds, clock, args.device, args.autocast,
                cache_root,
            )
            for name, r in res.items():
                spread = f"{min(r.per_round_ms):.3g}-{max(r.per_round_ms):.3g}"
                print(f"  {name:<28} median {r.median_ms:8.3f} ms  (range {spread})", flush=True)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    table = markdown(
        all_results, args.rounds, args.stat, f"{load_before} before, {_load()[13:]} after", args.clock, args.device,
        args.autocast,
    )
    print()
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
