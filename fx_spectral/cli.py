"""The ``fx-spectral`` command line (also ``python -m fx_spectral``).

Subcommands live in :data:`COMMANDS`: a name maps to a :class:`Command` whose ``module`` defines
``add_arguments(parser)`` and ``run_from_args(args) -> int``, and optionally
``check_args(args)``, which raises ``ValueError`` for arguments it refuses (the command line then
prints argparse's usage error and exits with status 2, before any work starts). Adding a demo is
one entry there.

A subcommand's module (and so torch) is imported only when that subcommand is parsed:
``fx-spectral --help`` and ``fx-spectral --version`` import neither.

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
        help="train a Lipschitz transformer (Muon + exact hard cap) next to an unconstrained twin on Python's "
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


def positive_int(text: str) -> int:
    """An argparse ``type``: an int >= 1 (else argparse's usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its module is imported and its arguments added on first use
    (parsing, ``--help``, usage), so building the top-level parser imports nothing heavy."""

    command: Command | None = None  # set by build_parser; None: a plain parser

    def _load(self) -> None:
        command, self.command = self.command, None
        if command is None:
            return
        impl = importlib.import_module(command.module)
        impl.add_arguments(self)
        self.set_defaults(_run=impl.run_from_args, _check=getattr(impl, "check_args", None), _parser=self)

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._load()
        return super().format_help()

    def format_usage(self) -> str:
        self._load()
        return super().format_usage()


def build_parser() -> argparse.ArgumentParser:
    from fx_spectral import __version__

    parser = argparse.ArgumentParser(
        prog="fx-spectral",
        description="fx_spectral: control the spectral norm of PyTorch weights (eager, graph, constraints).",
    )
    parser.add_argument("--version", action="version", version=f"fx_spectral {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.command = cmd
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fx-spectral`` console script; returns the exit status.

    Arguments a subcommand refuses give argparse's usage error (``SystemExit(2)``), not a traceback.
    """
    args = build_parser().parse_args(argv)
    if args._check is not None:
        try:
            args._check(args)
        except ValueError as e:
            args._parser.error(str(e))
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
