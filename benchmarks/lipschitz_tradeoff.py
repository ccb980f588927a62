"""Accuracy vs certified Lipschitz bound of the demo's transformer, for a few cap settings and seeds.

Trains the demo's constrained model (``fx_spectral.demos.lipschitz``, default budget) for every
cap setting and seed, and the unconstrained twin once per seed (the twin does not depend on the
caps), then writes ``tradeoff.json`` and ``tradeoff.png`` (validation accuracy against the
certified bound: one dot per run, the mean per setting, the twins' mean and spread as a band).

Each run is one demo's worth of CPU (~70 s of one core for the constrained model, ~35 s for a
twin), so the full grid (4 settings × 3 seeds + 3 twins) is ~15 CPU-minutes.

    python benchmarks/lipschitz_tradeoff.py --out /tmp/tradeoff             # the grid
    python benchmarks/lipschitz_tradeoff.py --settings default --seeds 0     # one point
    python benchmarks/lipschitz_tradeoff.py --plot-only /tmp/tradeoff        # re-plot saved runs
    python benchmarks/lipschitz_tradeoff.py --collect run1/ run2/ --out /tmp/t  # plot demo runs' metrics.json

Settings (RMS->RMS caps of V/O, MLP; l2 cap of the head; Q/K stay at 0.3; caps at the bound's
formula: 2.0, 3.4, 5.4, 9.7):
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import sys
from pathlib import Path

import torch

from fx_spectral.demos import lipschitz as demo

SETTINGS = {
    "tight": {"w_max": 1.0, "w_max_mlp": 1.2, "w_max_head": 1.5},
    "low": {"w_max": 1.2, "w_max_mlp": 1.4, "w_max_head": 1.6},
    "mid": {"w_max": 1.3, "w_max_mlp": 1.6, "w_max_head": 1.8},
    "default": {},  # DemoConfig's defaults: V/O 1.5, MLP 1.8, head 2.0
}
__doc__ += "".join(f"\n    {k}: {v or 'the demo defaults'}" for k, v in SETTINGS.items())


def _run(cfg: demo.DemoConfig, out: Path, corpus, twin: bool) -> dict:
    metrics = demo.run(cfg, out=out, progress=False, corpus=corpus, twin=twin, stream=io.StringIO())
    return {name: {k: m[k] for k in ("val_accuracy", "lipschitz_bound")} for name, m in metrics["models"].items()}


def run_grid(settings: list[str], seeds: list[int], steps: int, out: Path) -> dict:
    corpus = demo.load_stdlib_corpus()
    results: dict = {"steps": steps, "runs": []}
    for seed in seeds:
        for i, name in enumerate(settings):
            cfg = dataclasses.replace(demo.DemoConfig(steps=steps, seed=seed), **SETTINGS[name])
            r = _run(cfg, out / f"{name}_seed{seed}", corpus, twin=(i == 0))
            results["runs"].append({"setting": name, "seed": seed, **r["constrained"]})
            if "twin" in r:
                results["runs"].append({"setting": "twin", "seed": seed, **r["twin"]})
            print(f"seed {seed} {name:8} " + "  ".join(f"{k}: {v}" for k, v in r["constrained"].items()), flush=True)
            (out / "tradeoff.json").write_text(json.dumps(results, indent=2))
    return results


def _label(config: dict) -> str:
    method = config["method"] + (f"/{config['cap_mode']}" if config.get("cap_mode") else "")
    ball = "ball" if config.get("attn_ball") else "no ball"
    caps = f"V/O {config['w_max']}, MLP {config['w_max_mlp']}, head {config['w_max_head']}"
    return f"{method}, {ball}; {caps}"


def collect(dirs: list[str]) -> dict:
    """Runs of ``fx-spectral demo`` (their ``metrics.json``), labelled by method, ball and caps."""
    results: dict = {"steps": None, "runs": []}
    for d in dirs:
        metrics = json.loads((Path(d) / "metrics.json").read_text())
        config = metrics["config"]
        if results["steps"] not in (None, config["steps"]):
            raise ValueError(f"{d}: {config['steps']} steps, the others {results['steps']}")
        results["steps"] = config["steps"]
        for name, m in metrics["models"].items():
            setting = "twin" if name == "twin" else _label(config)
            results["runs"].append(
                {"setting": setting, "seed": config["seed"], "source": str(d)}
                | {k: m[k] for k in ("val_accuracy", "lipschitz_bound")}
            )
    # one twin per seed (it does not depend on the constrained model's settings)
    twins = {r["seed"]: r for r in results["runs"] if r["setting"] == "twin"}
    results["runs"] = [r for r in results["runs"] if r["setting"] != "twin"] + list(twins.values())
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    twins = [r["val_accuracy"] * 100 for r in runs if r["setting"] == "twin"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if twins:
        mean = statistics.fmean(twins)
        ax.axhspan(min(twins), max(twins), color="grey", alpha=0.2, label=f"twin (AdamW, no constraint): {mean:.1f}%")
        ax.axhline(mean, color="grey", lw=1)
        ax.axhline(mean - 4.0, color="grey", lw=1, ls=":", label="twin mean - 4 points")
    names = [s for s in dict.fromkeys(r["setting"] for r in runs) if s != "twin"]
    bounds = [r["lipschitz_bound"] for r in runs if r["setting"] != "twin"]
    for i, name in enumerate(names):
        color = f"C{i}"
        pts = [(r["lipschitz_bound"], r["val_accuracy"] * 100) for r in runs if r["setting"] == name]
        ax.scatter(*zip(*pts), s=18, alpha=0.6, color=color)
        mb, ma = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
        ax.scatter([mb], [ma], marker="D", s=50, color=color, label=f"{name}: {ma:.1f}% at {mb:.2f} (n={len(pts)})")
    ax.set(
        xscale="log" if bounds and max(bounds) > 3 * min(bounds) else "linear",
        xlabel="certified Lipschitz bound (logits vs embedded tokens)",
        ylabel="validation accuracy (%)",
        title=f"fx-spectral demo, {results['steps']} steps: accuracy vs certified bound",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=demo.DemoConfig().steps)
    p.add_argument("--out", default="./lipschitz_tradeoff")
    p.add_argument("--plot-only", metavar="DIR", help="re-plot DIR/tradeoff.json")
    p.add_argument("--collect", nargs="+", metavar="RUN", help="plot these demo output directories instead")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.collect:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results = collect(args.collect)
        (out / "tradeoff.json").write_text(json.dumps(results, indent=2))
    elif args.plot_only:
        out = Path(args.plot_only)
        results = json.loads((out / "tradeoff.json").read_text())
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results = run_grid(args.settings, args.seeds, args.steps, out)
    plot(results, out / "tradeoff.png")
    print(f"wrote {out / 'tradeoff.json'} and {out / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
