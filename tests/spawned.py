"""Run a test body on several gloo ranks in spawned processes, and leave them safely.

``run_on_ranks(body, world, *args)`` spawns ``world`` processes; each joins a gloo process group
(file rendezvous in a temporary folder), runs ``body(rank, world, *args)`` with one CPU thread,
and rank 0's return value (JSON-serializable) is what ``run_on_ranks`` returns. A failing rank
prints its traceback and exits 1, which fails the spawn.

Why the exit is unusual: with torch 2.13 + gloo a spawned rank sometimes aborts at interpreter
exit ("terminate called without an active exception", SIGABRT) even after
``destroy_process_group()``. So every rank waits at a barrier, destroys the group, and then leaves
with ``os._exit`` without the interpreter's teardown (the result is on disk by then).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(body: Callable[..., Any], world: int, *args: Any) -> Any:
    """``body(rank, world, *args)`` on ``world`` spawned gloo ranks; returns rank 0's (JSON) result.

    ``body`` must be a module-level function (the spawned processes import it by name).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_entry, args=(world, os.path.join(tmp, "pg"), out, body, args), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def _entry(rank: int, world: int, init_file: str, out_file: str, body: Callable[..., Any], args: tuple) -> None:
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(minutes=5),
        )
        torch.set_num_threads(1)
        result = body(rank, world, *args)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(result, f)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
