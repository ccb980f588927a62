"""Training-step overhead of operator-mode spectral normalization against matrix mode and plain training.

Operator mode (``fx_spectral.apply_spectral_norm(model, mode="operator")``) divides each convolution's
weight by a power-iteration estimate of the convolution's operator norm, run on the functional conv
and its adjoint with one example's input shape; matrix mode (the default, torch's) divides by the
norm of the reshaped kernel. This script measures what that costs per training step (forward + loss
+ backward + SGD step) on the DCGAN discriminator and generator of ``step_overhead.py``, whose model
builders, step and interleaved-round timing it reuses: every variant starts from the same weights,
each round runs every variant once in a rotating order, and the table reports medians over rounds.

Time is this process's CPU time at one torch thread (``torch.set_num_threads(1)``), which other load
on a shared machine disturbs far less than wall clock does.

Run::

    python benchmarks/operator_mode.py            # 21 rounds
    python benchmarks/operator_mode.py --quick    # smoke run (3 rounds)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from step_overhead import CASES, bench_case, machine_info  # noqa: E402
from torch import nn  # noqa: E402

import fx_spectral  # noqa: E402

MODELS = ("dcgan_d", "dcgan_g")


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def _normalized(mode: str):
    def build(model: nn.Module) -> nn.Module:
        fx_spectral.apply_spectral_norm(model, mode=mode)
        return model

    return build


VARIANTS = {
    "plain": lambda m: m,
    "matrix mode": _normalized("matrix"),
    "operator mode": _normalized("operator"),
}


def markdown(all_results: dict, rounds: int, load: str) -> str:
    """Median ms per step of each variant and the ratios operator/plain, matrix/plain, operator/matrix."""
    lines = [
        f"Machine: {machine_info()}; {load}.",
        "",
        f"Median of {rounds} interleaved rounds, process CPU time in ms per training step "
        "(forward + backward + SGD step), 1 torch thread:",
        "",
        "| model | plain | matrix mode | operator mode | matrix / plain | operator / plain | operator / matrix |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, res in all_results.items():
        p, m, o = (res[n].median_ms for n in ("plain", "matrix mode", "operator mode"))
        ratios = f"{m / p:.2f}× | {o / p:.2f}× | {o / m:.2f}×"
        lines.append(f"| {CASES[key].title} | {p:.3g} | {m:.3g} | {o:.3g} | {ratios} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3, help="steps after the first call, before timing")
    parser.add_argument("--round-seconds", type=float, default=0.2, help="target CPU time of one variant's turn")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up step")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table (Markdown) to PATH")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.round_seconds = 3, 1, 0.05
    torch.set_num_threads(1)

    load_before = _load()
    print(machine_info(), load_before, flush=True)
    all_results = {}
    for key in MODELS:
        print(f"{CASES[key].title}:", flush=True)
        res = bench_case(CASES[key], VARIANTS, args.rounds, args.warmup, args.round_seconds, time.process_time)
        all_results[key] = res
        for name, r in res.items():
            spread = f"{min(r.per_round_ms):.3g}-{max(r.per_round_ms):.3g}"
            print(f"  {name:<14} median {r.median_ms:8.3f} ms  (range {spread})", flush=True)
    table = markdown(all_results, args.rounds, f"{load_before} before, {_load()[13:]} after")
    print()
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
