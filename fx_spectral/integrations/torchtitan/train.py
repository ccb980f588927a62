"""``torchrun -m fx_spectral.integrations.torchtitan.train [TorchTitan flags]``: TorchTitan's own ``main``.

What it does, in order, then nothing else:

1. :func:`fx_spectral.integrations.torchtitan.compat.apply`: the workarounds this machine needs
   (on CPU: the triton import shim, a CPU device module, ``set_timeout`` on torch 2.13, FSDP2 SUM
   reduction for gloo; each one is skipped where it is not needed) — before TorchTitan is imported;
2. on a machine without CUDA and without an explicit ``--parallelism.spmd_backend``, adds
   ``--parallelism.spmd_backend partial_dtensor``;
3. registers the ``python_stdlib`` datasets (:mod:`~fx_spectral.integrations.torchtitan.data`);
4. runs ``torchtitan.train.main()`` with the command line unchanged otherwise;
5. on a gloo process group (no CUDA) with more than one rank, after TorchTitan's ``main`` returns,
   flushes its output and leaves with ``os._exit(0)``: with torch 2.13.0 and gloo a rank aborts at
   interpreter exit (``terminate called without an active exception``, SIGABRT) in ~15–20 % of
   runs, even for plain FSDP2; TorchTitan has already destroyed the process group by then.
   A failing run still raises (exit status 1).

Examples::

    # CPU, 2 ranks, the Qwen3 debugmodel with SDPA attention and the default hard cap
    torchrun --nproc_per_node 2 -m fx_spectral.integrations.torchtitan.train \\
        --module fx_spectral.integrations.torchtitan --config qwen3_debugmodel_spectral_sdpa \\
        --training.steps 10 --training.seq_len 128 --training.local_batch_size 2

    # GPUs: identical, nothing is patched there (torch 2.13.0 still gets ``set_timeout``)
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Apply what this machine needs, then run ``torchtitan.train.main`` on ``argv`` (default: sys.argv[1:])."""
    from fx_spectral.integrations.torchtitan import compat

    applied = compat.apply()
    args = list(sys.argv[1:] if argv is None else argv)
    args += compat.extra_args(args)

    import torch
    import torchtitan.train

    from fx_spectral.integrations.torchtitan.data import register_dataset

    register_dataset()
    from torchtitan.tools.logging import init_logger, logger

    init_logger()
    logger.info(f"fx_spectral: TorchTitan workarounds applied: {applied or 'none'}; arguments: {' '.join(args)}")
    # NB: TorchTitan's ConfigManager reads sys.argv.
    sys.argv = [sys.argv[0], *args]
    torchtitan.train.main()
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
