"""The ``fx-spectral`` command line (also ``python -m fx_spectral``).

Subcommands live in :data:`COMMANDS`: a name maps to a :class:`Command` whose ``module`` defines
``add_arguments(parser)`` and ``run_from_args(args) -> int``. Adding a demo is one entry there.

Example::

    $ fx-spectral demo            # the main demo
    $ fx-spectral sn-demo --steps 100 --no-progress
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Command:
    """A subcommand: one-line help and the module that implements it (imported lazily)."""

    help: str
    module: str


COMMANDS: dict[str, Command] = {
    "demo": Command(
        help="train a Lipschitz transformer (Muon + soft cap) next to an unconstrained twin on Python's "
        "stdlib source; print accuracy, certified Lipschitz bounds, norms, activations; write a plot and JSON",
        module="fx_spectral.demos.lipschitz",
    ),
    "certify-demo": Command(
        help="train a CNN whose convs are projected to operator norm <= 1 next to a torch-style spectral-norm "
        "twin on the bundled 8x8 digits; print certified accuracy, per-layer operator norms; write a plot",
        module="fx_spectral.demos.certify",
    ),
    "sn-demo": Command(
        help="train a spectral-normalized MLP next to its plain twin; print sigmas and Lipschitz bounds",
        module="fx_spectral.demos.sn_mlp",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from fx_spectral import __version__

    parser = argparse.ArgumentParser(
        prog="fx-spectral",
        description="fx_spectral: control the spectral norm of PyTorch weights (eager, graph, constraints).",
    )
    parser.add_argument("--version", action="version", version=f"fx_spectral {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        impl = importlib.import_module(cmd.module)
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        impl.add_arguments(p)
        p.set_defaults(_run=impl.run_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fx-spectral`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
