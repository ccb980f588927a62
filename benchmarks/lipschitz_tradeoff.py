"""Accuracy vs certified Lipschitz bound of the demo's transformer, for a few cap settings and seeds.

Trains the demo's constrained model (``fx_spectral.demos.lipschitz``, default budget) for every
cap setting and seed, and the unconstrained twin once per seed (the twin does not depend on the
caps), then writes ``tradeoff.json`` and ``tradeoff.png`` (validation accuracy against the
certified bound: one dot per run, the mean per setting, the twins' mean and spread as a band).

Each run is one demo's worth of CPU: a constrained run alone took 63-83 s of user CPU (one
thread, load 3.5-10.6 on 2 cores), a whole demo (both models) 97-100 s, so the full grid (4 settings
× 3 seeds + 3 twins) is ~15-17 CPU-minutes.

    python benchmarks/lipschitz_tradeoff.py --out /tmp/tradeoff             # the grid
    python benchmarks/lipschitz_tradeoff.py --settings default --seeds 0     # one point
    python benchmarks/lipschitz_tradeoff.py --plot-only /tmp/tradeoff        # re-plot saved runs
    python benchmarks/lipschitz_tradeoff.py --collect run1/ run2/ --out /tmp/t  # plot demo runs' metrics.json
    R=benchmarks/results/lipschitz_tradeoff   # docs/lipschitz.md's figure (/tmp/t/tradeoff.png) and table:
    python benchmarks/lipschitz_tradeoff.py --collect $R/*_seed* --min-seeds 3 --out /tmp/t \
        --twins-from $R/earlier_code/default_seed1 $R/earlier_code/softcap_noball_seed2

Every run also leaves the demo's own output directory (``<setting>_seed<N>/metrics.json``), so
runs made separately (``--no-twin`` for settings whose seeds already have a twin, or plain
``fx-spectral demo`` runs) can be combined with ``--collect``: a run whose caps and other options
match one of the settings below is labelled with its name, any other run by its method and caps.
A table of the mean and the min-max over seeds (constrained accuracy, the twin of the same seed,
their gap, the bound) is printed with every plot.

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


def run_grid(settings: list[str], seeds: list[int], steps: int, out: Path, twin: bool = True) -> dict:
    corpus = demo.load_stdlib_corpus()
    results: dict = {"steps": steps, "runs": []}
    for seed in seeds:
        for i, name in enumerate(settings):
            cfg = dataclasses.replace(demo.DemoConfig(steps=steps, seed=seed), **SETTINGS[name])
            r = _run(cfg, out / f"{name}_seed{seed}", corpus, twin=twin and i == 0)
            results["runs"].append({"setting": name, "seed": seed, **r["constrained"]})
            if "twin" in r:
                results["runs"].append({"setting": "twin", "seed": seed, **r["twin"]})
            print(f"seed {seed} {name:8} " + "  ".join(f"{k}: {v}" for k, v in r["constrained"].items()), flush=True)
            (out / "tradeoff.json").write_text(json.dumps(results, indent=2))
    return results


def _label(config: dict) -> str:
    """The name of the setting ``config`` (a demo's ``metrics.json`` config) matches, else a description."""
    base = dataclasses.asdict(demo.DemoConfig(steps=config["steps"], seed=config["seed"]))
    for name, caps in SETTINGS.items():
        if {k: config.get(k) for k in base} == base | caps:
            return name
    method = config["method"] + (f"/{config['cap_mode']}" if config.get("cap_mode") else "")
    ball = "ball" if config.get("attn_ball") else "no ball"
    caps = f"V/O {config['w_max']}, MLP {config['w_max_mlp']}, head {config['w_max_head']}"
    return f"{method}, {ball}; {caps}"


def collect(dirs: list[str], twin_dirs: list[str] = ()) -> dict:
    """Runs of ``fx-spectral demo`` (their ``metrics.json``), labelled by method, ball and caps;
    from ``twin_dirs`` only the twins are taken (the twin does not depend on the constrained
    model's settings or on the constraint code, so runs made with other settings or an earlier
    version of the library supply it)."""
    results: dict = {"steps": None, "runs": []}
    for d in [*dirs, *twin_dirs]:
        metrics = json.loads((Path(d) / "metrics.json").read_text())
        config = metrics["config"]
        if results["steps"] not in (None, config["steps"]):
            raise ValueError(f"{d}: {config['steps']} steps, the others {results['steps']}")
        results["steps"] = config["steps"]
        for name, m in metrics["models"].items():
            if d in twin_dirs and name != "twin":
                continue
            setting = "twin" if name == "twin" else _label(config)
            results["runs"].append(
                {"setting": setting, "seed": config["seed"], "source": str(d)}
                | {k: m[k] for k in ("val_accuracy", "lipschitz_bound")}
            )
    # one run per setting and seed, hence one twin per seed (the twin does not depend on the constrained
    # model's settings); repeats must agree (the demo is deterministic on one thread), or the plot would
    # hide a difference
    kept: dict = {}
    for r in results["runs"]:
        key = (r["setting"], r["seed"])
        if key in kept and (kept[key]["val_accuracy"], kept[key]["lipschitz_bound"]) != (
            r["val_accuracy"],
            r["lipschitz_bound"],
        ):
            raise ValueError(f"{r['source']} and {kept[key]['source']}: {key}, different results")
        kept.setdefault(key, r)
    results["runs"] = [r for k, r in kept.items() if k[0] != "twin"] + [r for k, r in kept.items() if k[0] == "twin"]
    return results


def summarize(results: dict, min_seeds: int = 1) -> list[dict]:
    """Per setting (at least ``min_seeds`` seeds): mean, min and max over seeds of the constrained
    accuracy, of the twin's accuracy at the same seeds, of their gap (per seed, twin minus
    constrained, in points) and of the certified bound. Accuracies in %."""
    runs = results["runs"]
    twins = {r["seed"]: r["val_accuracy"] * 100 for r in runs if r["setting"] == "twin"}
    rows = []
    for name in dict.fromkeys(r["setting"] for r in runs if r["setting"] != "twin"):
        pts = sorted((r for r in runs if r["setting"] == name), key=lambda r: r["seed"])
        if len(pts) < min_seeds:
            continue
        cols = {
            "acc": [r["val_accuracy"] * 100 for r in pts],
            "bound": [r["lipschitz_bound"] for r in pts],
            "twin": [twins[r["seed"]] for r in pts if r["seed"] in twins],
            "gap": [twins[r["seed"]] - r["val_accuracy"] * 100 for r in pts if r["seed"] in twins],
        }
        row: dict = {"setting": name, "seeds": [r["seed"] for r in pts]}
        for k, v in cols.items():
            row[k] = (statistics.fmean(v), min(v), max(v)) if v else None
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """``summarize``'s rows as a Markdown table: mean (min-max)."""

    def fmt(t, digits):
        return "-" if t is None else f"{t[0]:.{digits}f} ({t[1]:.{digits}f}-{t[2]:.{digits}f})"

    lines = [
        "| setting | seeds | constrained acc % | twin acc % | gap (points) | certified bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = ",".join(map(str, r["seeds"]))
        lines.append(
            f"| {r['setting']} | {seeds} | {fmt(r['acc'], 2)} | {fmt(r['twin'], 2)} | {fmt(r['gap'], 2)} "
            f"| {fmt(r['bound'], 3)} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path, min_seeds: int = 1) -> None:
    """Accuracy vs certified bound: one dot per run, per setting the mean with min-max bars over
    seeds, the twins' mean and min-max as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    twins = [r["val_accuracy"] * 100 for r in runs if r["setting"] == "twin"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if twins:
        mean = statistics.fmean(twins)
        ax.axhspan(
            min(twins),
            max(twins),
            color="grey",
            alpha=0.2,
            label=f"twin (AdamW, no constraint): {mean:.1f}% (n={len(twins)}, min-max)",
        )
        ax.axhline(mean, color="grey", lw=1)
        ax.axhline(mean - 4.0, color="grey", lw=1, ls=":", label="twin mean - 4 points")
    rows = sorted(summarize(results, min_seeds), key=lambda r: r["bound"][0])
    bounds = [b for r in rows for b in r["bound"][1:]]
    for i, r in enumerate(rows):
        color = f"C{i}"
        pts = [(x["lipschitz_bound"], x["val_accuracy"] * 100) for x in runs if x["setting"] == r["setting"]]
        ax.scatter(*zip(*pts), s=14, alpha=0.5, color=color)
        (mb, b0, b1), (ma, a0, a1) = r["bound"], r["acc"]
        ax.errorbar(
            [mb],
            [ma],
            xerr=[[mb - b0], [b1 - mb]],
            yerr=[[ma - a0], [a1 - ma]],
            fmt="D",
            ms=6,
            capsize=3,
            color=color,
            label=f"{r['setting']}: {ma:.1f}% at {mb:.2f} (n={len(pts)}, min-max)",
        )
    if len(rows) > 1:
        ax.plot([r["bound"][0] for r in rows], [r["acc"][0] for r in rows], color="k", lw=0.8, alpha=0.5)
    if bounds and max(bounds) > 3 * min(bounds):
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
    elif bounds:
        ax.set_xlim(0, 1.1 * max(bounds))
    ax.set(
        xlabel="certified Lipschitz bound (logits vs embedded tokens)",
        ylabel="validation accuracy (%)",
        title=f"fx-spectral demo, {results['steps']} steps: accuracy vs certified bound",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
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
    p.add_argument("--twins-from", nargs="+", default=[], metavar="RUN", help="--collect: take only the twins of RUN")
    p.add_argument("--no-twin", action="store_true", help="grid: no twin (the seeds' twins come from other runs)")
    p.add_argument("--min-seeds", type=int, default=1, help="plot and tabulate settings with at least this many seeds")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.collect:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results = collect(args.collect, args.twins_from)
        (out / "tradeoff.json").write_text(json.dumps(results, indent=2))
    elif args.plot_only:
        out = Path(args.plot_only)
        results = json.loads((out / "tradeoff.json").read_text())
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results = run_grid(args.settings, args.seeds, args.steps, out, twin=not args.no_twin)
    plot(results, out / "tradeoff.png", args.min_seeds)
    print(table(sorted(summarize(results, args.min_seeds), key=lambda r: r["bound"][0])))
    print(f"wrote {out / 'tradeoff.json'} and {out / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
