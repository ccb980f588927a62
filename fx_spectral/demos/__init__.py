"""Demos run by the ``fx-spectral`` command line (see :mod:`fx_spectral.cli`).

Each demo module defines ``add_arguments(parser)`` and ``run_from_args(args) -> int``.
"""
