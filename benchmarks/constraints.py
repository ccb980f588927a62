"""Cost of the constraint ops against SVD capping, their own matrix products, and a Muon step.

For each weight shape and dtype this times, in interleaved rounds (every variant once per round,
in a rotating order, so machine noise hits all variants alike; medians over rounds):

* ``4 matmuls``: the four matrix products a soft cap is made of (X Xᵀ, A X, twice), as plain
  ``torch.mm`` on the cheaper Gram side: the floor for :func:`fx_spectral.projections.soft_cap`;
* every op of :mod:`fx_spectral.projections` (rank-one ops warm-started from stored vectors, one
  power iteration, as ``constrain()`` runs them);
* ``svd cap``: ``torch.linalg.svd`` + clip + reconstruct (the exact reference; = ``pure_svd``);
* ``muon step``: one ``torch.optim.Muon`` step on the same weight (a random gradient);
* ``constrain(soft_cap)``: the whole per-step projection machinery of
  :func:`fx_spectral.constrain` with Muon coupling on a one-Linear model (what the step post-hook
  runs): by default (float32 weight arithmetic, bf16 products, as Muon) and with float32 products
  (``matmul_dtype=None``).

Targets (issue 4): soft_cap ≤ 1.2 × its four matrix products; constrain(soft_cap) < 0.5 × a Muon step.

Run::

    python benchmarks/constraints.py                       # 256², 1024², 1024×4096; fp32 + bf16
    python benchmarks/constraints.py --quick               # 256² and 1024², 3 rounds
    python benchmarks/constraints.py --markdown out.md     # also write the table
    python benchmarks/constraints.py --threads 2           # default 1 thread (stable on a busy CPU)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from fx_spectral import projections as C
from fx_spectral.constraint import constrain

SHAPES = [(256, 256), (1024, 1024), (1024, 4096)]


def _timed(fn: Callable[[], object], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def _four_matmuls(X: torch.Tensor) -> Callable[[], object]:
    Xw = X if X.shape[0] <= X.shape[1] else X.T.contiguous()

    def run():
        A = torch.mm(Xw, Xw.T)
        Y = torch.mm(A, Xw)
        A2 = torch.mm(Y, Y.T)
        return torch.mm(A2, Y)

    return run


def _svd_cap(X: torch.Tensor) -> Callable[[], object]:
    def run():
        U, S, Vh = torch.linalg.svd(X.float(), full_matrices=False)
        return ((U * S.clamp_max(1.0)) @ Vh).to(X.dtype)

    return run


def variants(m: int, n: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    # a weight near the cap, in RMS→RMS units (what the projections see after a step)
    X = C.orthogonalize(torch.randn(m, n, generator=g), exact=True).mul_(1.02).to(dtype)
    u, _, v = C.power_iterate(X, 20)
    est = lambda: C.power_iterate(X, 1, u=u, v=v)  # noqa: E731

    model = nn.Linear(n, m, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(X * (m / n) ** 0.5)
    model.weight.grad = torch.randn(m, n, generator=g).to(dtype)
    muon = torch.optim.Muon([model.weight], lr=1e-3)  # small: weights stay near the cap
    handles = {
        "constrain(soft_cap)": constrain(model, muon, "soft_cap"),  # Muon: bf16 products (auto)
        "constrain(soft_cap, fp32 products)": constrain(model, muon, "soft_cap", matmul_dtype=None),
    }
    for h in handles.values():
        h.remove()  # time the projections alone: handle.project() is what the hook runs

    out = {
        "4 matmuls": _four_matmuls(X),
        "soft_cap": lambda: C.soft_cap(X, 0.1),
        "soft_cap bf16 products": lambda: C.soft_cap(X, 0.1, matmul_dtype=torch.bfloat16),
        "hard_cap": lambda: C.hard_cap(X),
        "hard_cap exact": lambda: C.hard_cap(X, exact=True),
        "spectral_normalize": lambda: C.spectral_normalize(X, estimate=est()),
        "spectral_hammer": lambda: C.spectral_hammer(X, estimate=est()),
        "spectral_weight_decay": lambda: C.spectral_weight_decay(X, 0.1, estimate=est()),
        "orthogonalize": lambda: C.orthogonalize(X),
        "svd cap": _svd_cap(X),
        "muon step": muon.step,
        **{k: h.project for k, h in handles.items()},
    }
    return out


def run(shapes, dtypes, rounds: int) -> list[dict]:
    rows = []
    for m, n in shapes:
        for dtype in dtypes:
            vs = variants(m, n, dtype)
            names = list(vs)
            for fn in vs.values():  # warm-up (lazy init, allocator)
                fn()
            # reps per timing: about 100 ms of work per timing (at most 200 calls)
            reps = {k: min(200, max(1, int(0.1 / max(_timed(fn, 1), 1e-6)))) for k, fn in vs.items()}
            times: dict[str, list[float]] = {k: [] for k in names}
            for r in range(rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for k in order:
                    times[k].append(_timed(vs[k], reps[k]))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append(
                {
                    "shape": f"{m}×{n}",
                    "dtype": str(dtype).replace("torch.", ""),
                    "ms": {k: 1e3 * v for k, v in med.items()},
                }
            )
            print(_format_row(rows[-1]), flush=True)
    return rows


def _format_row(row: dict) -> str:
    ms = row["ms"]
    return f"{row['shape']:>10} {row['dtype']:>9} " + " ".join(f"{k}={v:.2f}ms" for k, v in ms.items())


def markdown(rows: list[dict], rounds: int) -> str:
    ops = list(rows[0]["ms"])
    lines = [
        f"Median ms over {rounds} interleaved rounds; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.date.today()}.",
        "",
        "| shape | dtype | " + " | ".join(ops) + " |",
        "|---|---|" + "---:|" * len(ops),
    ]
    for row in rows:
        lines.append(f"| {row['shape']} | {row['dtype']} | " + " | ".join(f"{row['ms'][k]:.2f}" for k in ops) + " |")
    lines += [
        "",
        "Ratios (targets: soft_cap / 4 matmuls ≤ 1.2; constrain(soft_cap) / muon step < 0.5):",
        "",
        "| shape | dtype | soft_cap / 4 matmuls | svd cap / soft_cap | constrain(soft_cap) / muon step "
        "| constrain(soft_cap, fp32 products) / muon step | hard_cap / soft_cap |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ms = row["ms"]
        lines.append(
            f"| {row['shape']} | {row['dtype']} | {ms['soft_cap'] / ms['4 matmuls']:.2f} | "
            f"{ms['svd cap'] / ms['soft_cap']:.1f} | {ms['constrain(soft_cap)'] / ms['muon step']:.2f} | "
            f"{ms['constrain(soft_cap, fp32 products)'] / ms['muon step']:.2f} | "
            f"{ms['hard_cap'] / ms['soft_cap']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="256² and 1024², 3 rounds")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--markdown", help="write the table to this file")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared, oversubscribed CPU, multi-threaded BLAS timings "
        "swing by 100x while one thread stays stable; the ratios are what the targets are about)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, rounds = (SHAPES[:2], 3) if args.quick else (SHAPES, args.rounds)
    rows = run(shapes, [getattr(torch, d) for d in args.dtypes], rounds)
    table = markdown(rows, rounds)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
