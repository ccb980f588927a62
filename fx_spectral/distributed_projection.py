r"""``constrain()`` on DTensor weights: the one dispatch point for sharded parameters (collective).

:meth:`fx_spectral.constraint.Constraint._project_all` hands every DTensor target of a step here
(:func:`prepare_dtensors`), and ``report()`` its DTensor entries (:func:`report_dtensors`). This
module reads the handle only through its public interface (``handle.pieces`` / ``views`` /
``vectors`` / ``context`` / ``cache``) and does the sharded math with :mod:`fx_spectral.distributed`:

* the layout of each target (its matrices as :class:`~fx_spectral.distributed.ShardedMatrix`,
  built once per handle and parameter: a collective);
* rank-one methods: the distributed power iteration from the stored vectors (or a seeded fresh
  start, :func:`fx_spectral.power.start_vectors`), then each rank updates its own block;
* full-spectrum methods: each matrix is assembled on its owner rank and projected there with
  :func:`fx_spectral.methods.project_matrix`;
* all or nothing, as on one process: every rank agrees on a failure before anything is written.

Every function here is a collective: all ranks call it with the same targets in the same order.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fx_spectral import power as P
from fx_spectral.distributed import (
    ShardedMatrix,
    apply_full_,
    assign_owners,
    full_matrix,
    groups_of,
    power_iterate_,
    rank_one_block,
    sharded_matrices,
)
from fx_spectral.errors import projection_error
from fx_spectral.kinds import module_rms_scale

__all__ = ["prepare_dtensors", "project_dtensors_", "report_dtensors"]


def _layouts(handle, t) -> tuple[list[str | None], list[ShardedMatrix]]:
    # Cached per handle and parameter (building one is a collective: all ranks build the same ones).
    cache = handle.cache("distributed.layouts")
    key = (id(t.param), tuple(t.param.placements), tuple(t.param.shape))
    if key not in cache:
        keys = [piece.key for piece in handle.pieces(t)]
        if keys == [None]:  # the whole weight is one matrix
            mats = sharded_matrices(t.param, dim=t.dim)
        else:
            mats = sharded_matrices(t.param, lambda index: dict(handle.views(t, index)))
        cache[key] = (keys, mats)
    return cache[key]


def _start_vectors(handle, t, key, mat: ShardedMatrix, dtype, device):
    # (u, v, extra steps): the stored vectors, or a fresh start seeded by the weight's name, exactly
    # as the single-process path (methods._estimate): the one rule, power.start_vectors.
    m, n = mat.shape
    seed = zlib.crc32(t.name(key).encode())
    return P.start_vectors(handle.vectors.get(t, key), m, n, seed, dtype=dtype, device=device)


@torch.no_grad()
def project_dtensors_(handle, targets: Sequence, method) -> None:
    """Project the DTensor targets of a :func:`fx_spectral.constrain` handle, in place (collective).

    Same result as the single-process path (``methods.project_matrix`` on the whole matrix) up
    to float rounding: rank-one methods use the distributed power iteration and update local blocks;
    full-spectrum methods assemble each matrix on its owner rank and run ``project_matrix`` there.
    The persistent vectors go through the handle (``handle.vectors.get`` / ``.put``), so they
    live where the single-process path keeps them (the optimizer state), replicated on every rank.
    All or nothing: see :func:`prepare_dtensors`.
    """
    for write in prepare_dtensors(handle, targets, method):
        write()


def _agree_bad(entries, bad: list[bool]) -> list[bool]:
    # Every rank of each matrix's group learns whether any rank saw a problem with it (one small
    # all-reduce per process group, in first-appearance order: the same on every rank).
    flags = torch.tensor([1 if b else 0 for b in bad], dtype=torch.int32)
    for idx in groups_of([mat for _, _, mat in entries]).values():
        sub = flags[idx].clone()
        dist.all_reduce(sub, op=dist.ReduceOp.MAX, group=entries[idx[0]][2].group)
        flags[idx] = sub
    return [bool(f) for f in flags.tolist()]


def _raise_if_bad(entries, bad: list[bool], method, when: str, why: str) -> None:
    bad = _agree_bad(entries, bad)
    for (t, key, _), b in zip(entries, bad):
        if b:  # raised identically on every rank, after the same collectives: nobody hangs
            raise projection_error(t.name(key), method, when, why)


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


@torch.no_grad()
def prepare_dtensors(handle, targets: Sequence, method, *, when: str = "in project()") -> list[Callable[[], None]]:
    """Validate and compute the projection of DTensor targets; return the writes (collective).

    Phases, as on one process: every rank checks its local blocks are finite, and the ranks agree
    (a ``ProjectionError`` naming the weight is raised on every rank alike); the new blocks are
    computed (a failing op on an owner rank yields NaN there, which every rank then sees after the
    broadcast, so no rank is left waiting in a collective); the results are checked finite and
    agreed on; only then does the caller run the returned writes (local blocks, persistent
    vectors), so a failure leaves every shard as it was.
    """
    from fx_spectral import methods as K

    reg = K.registration(method)  # its kind decides the path; a rank-one method brings its op
    entries = []  # (target, key, mat)
    for t in targets:
        keys, mats = _layouts(handle, t)
        entries.extend((t, key, mat) for key, mat in zip(keys, mats))
    if not entries:
        return []
    _raise_if_bad(entries, [not _finite(mat.read()) for _, _, mat in entries], method, when, "it holds NaN or inf")
    writes: list[Callable[[], None]] = []
    if reg.kind == "rank_one" and not getattr(method, "exact", False):  # exact: the full path (an eigh)
        op = reg.rank_one_op
        starts = []
        for t, key, mat in entries:
            dtype = P.compute_dtype(t.param.dtype, method.dtype)
            starts.append(_start_vectors(handle, t, key, mat, dtype, mat.local.device))
        # Fresh and warm vectors need different iteration counts: one batched call per count.
        by_count: dict[int, list[int]] = {}
        for i, (_, _, warm) in enumerate(starts):
            by_count.setdefault(method.n_iter + (warm or 0), []).append(i)
        sigmas: list[Tensor | None] = [None] * len(entries)
        for count, idx in by_count.items():
            sig = power_iterate_(
                [entries[i][2] for i in idx],
                [starts[i][0] for i in idx],
                [starts[i][1] for i in idx],
                count,
                dtype=starts[idx[0]][0].dtype,
            )
            for i, s in zip(idx, sig):
                sigmas[i] = s
        bad = []
        for (t, key, mat), (u, v, _), sigma in zip(entries, starts, sigmas):
            scale = module_rms_scale(t.module, mat.shape[0], mat.shape[1])
            est = (u, sigma / scale, v)
            w_max = t.w_max[key]
            dtype = u.dtype
            fn = lambda B, e, dtype=dtype, scale=scale, w_max=w_max: op(B.to(dtype) / scale, method, w_max, e) * scale
            block = rank_one_block(mat, fn, est)
            bad.append(block is not None and not _finite(block))
            if block is not None:
                writes.append(lambda mat=mat, block=block: mat.write_(block))
            writes.append(lambda t=t, key=key, u=u, v=v: handle.vectors.put(t, key, u, v))
        _raise_if_bad(entries, bad, method, when, f"{type(method).__name__} gave a non-finite result")
        return writes
    mats = [mat for _, _, mat in entries]
    assign_owners(mats)

    def full_op(X, t, key, scale):
        ctx = handle.context(t, key, scale)
        ctx.put_vectors = lambda u, v: None  # computed on the owner only: vectors stay replicated as they are
        return K.project_matrix(X, method, ctx, scale=scale)

    fns = []
    for t, key, mat in entries:
        scale = module_rms_scale(t.module, mat.shape[0], mat.shape[1])
        fns.append(lambda X, t=t, key=key, scale=scale: full_op(X, t, key, scale))
    blocks = apply_full_(mats, fns, write=False)
    bad = [b is not None and not _finite(b) for b in blocks]
    _raise_if_bad(entries, bad, method, when, f"{type(method).__name__} gave a non-finite result or failed")
    return [lambda mat=mat, block=block: mat.write_(block) for mat, block in zip(mats, blocks) if block is not None]


@torch.no_grad()
def report_dtensors(handle, targets: Sequence, *, exact: bool = True) -> dict[str, dict[str, float]]:
    """``Constraint.report()`` entries for DTensor targets (collective: call on every rank).

    ``exact=True``: each matrix is assembled on every rank and measured with
    ``torch.linalg.matrix_norm(ord=2)``; ``exact=False``: :data:`fx_spectral.power.N_REPORT`
    distributed power iterations from the stored vectors (not written back), or from
    :func:`fx_spectral.power.start_vectors`' seeded fresh start plus its warm-up where none fit:
    the same start and step count as the single-process ``report(exact=False)``.
    """
    out: dict[str, dict[str, float]] = {}
    for t in targets:
        keys, mats = _layouts(handle, t)
        for key, mat in zip(keys, mats):
            scale = module_rms_scale(t.module, mat.shape[0], mat.shape[1])
            if exact:
                full = full_matrix(mat, torch.float64 if t.param.dtype == torch.float64 else torch.float32)
                raw = float(torch.linalg.matrix_norm(full, ord=2))
            else:
                # the one rule of the single-process report: power.start_vectors, N_REPORT (+ warm-up) steps
                dtype = torch.float64 if t.param.dtype == torch.float64 else torch.float32
                u, v, warm = _start_vectors(handle, t, key, mat, dtype, mat.local.device)
                raw = float(power_iterate_([mat], [u], [v], P.N_REPORT + warm, dtype=dtype)[0])
            out[t.name(key)] = {"sigma": raw / scale, "sigma_raw": raw, "w_max": t.w_max[key], "scale": scale}
    return out
