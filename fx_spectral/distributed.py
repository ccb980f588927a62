r"""Spectral constraints on DTensor-sharded weights (FSDP2 ``Shard(0)``/``Shard(1)``, 2-D with TP).

:func:`fx_spectral.constrain` hands every DTensor parameter to
:mod:`fx_spectral.distributed_projection`, which works with the sharded math here. Nothing gathers a
weight for the power iteration or for the rank-one methods; only the full-spectrum methods need
whole matrices, and each of those is assembled on one owner rank (matrices spread round-robin).

How a sharded matrix is seen
    A parameter's matrix view (``weight_matrix`` or a named sub-view from ``split=``, e.g. the
    Q/K/V blocks of a fused ``wqkv``) is worked out once, on an index tensor of the parameter's
    global shape. Each rank then knows the global rows ``R`` and columns ``C`` of the matrix that its
    local shard holds (a rectangle ``W[R][:, C]``; an empty one is fine) and where those entries sit
    in its local tensor. Ranks that hold a *replica* of another rank's block (``Replicate()``
    placements on some mesh dimension) contribute zeros to every reduction.

Power iteration, distributed (u, v are full float32 vectors, identical on every rank)
    Rows-only sharding (FSDP2 ``Shard(0)``, TP colwise; the local block has every column):
    :math:`a_r = W_{R_r} v` locally, then **one** all-reduce of the vector
    :math:`[\,\mathrm{scatter}_{R_r}(a_r),\; W_{R_r}^\top a_r\,]` gives :math:`a = Wv` and
    :math:`W^\top a`; then :math:`u = a/\|a\|`, :math:`v = W^\top a/\|W^\top a\|` and
    :math:`\hat\sigma = \|W^\top u\| = u^\top W v` — the same numbers as the single-process
    iteration (torch's spectral_norm order). Other layouts (``Shard(1)``, 2-D blocks) use two all-reduces per
    iteration (one of an ``m``-vector for :math:`Wv`, one of an ``n``-vector for :math:`W^\top u`).
    All matrices of a step share each all-reduce (one flat buffer), so a step costs ``n_iter``
    (or ``2·n_iter``) collectives whatever the number of weights.

Rank-one methods (spectral normalize, hammer, spectral weight decay)
    are separable given the estimate: the result's block ``R×C`` only needs ``W[R][:, C]``,
    ``u[R]``, ``σ̂``, ``v[C]``. Each rank applies the op to its own block, locally.

Full-spectrum methods (soft cap, hard cap, SVD cap, orthogonalize)
    The matrix is summed onto its owner rank from zero-padded blocks (``reduce``), the owner applies
    the op, and the result is broadcast; every rank writes back its own block. Matrices are
    processed in buckets of ``world_size`` (one per owner), so the projections run in parallel
    across ranks and each rank holds at most ``world_size`` full matrices at a time.

Every function here is a collective: all ranks must call it with the same matrices in the same
order (``constrain``'s optimizer hook does, since every rank steps the same optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fx_spectral import power as P

__all__ = [
    "ShardedMatrix",
    "is_dtensor",
    "sharded_matrices",
    "power_iterate_",
    "apply_rank_one_",
    "apply_full_",
    "rank_one_block",
    "full_matrix",
    "groups_of",
]


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (also an ``nn.Parameter`` wrapping one)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


# --------------------------------------------------------------------------------------------
# Layout: which rectangle of each matrix lives on this rank, and where
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ShardedMatrix:
    """The local part of one matrix view of a DTensor parameter (built by :func:`sharded_matrices`).

    Attributes:
        param: the DTensor parameter.
        name: the view's name (``""`` for the whole-parameter matrix, else a ``split=`` key).
        shape: the global matrix shape ``(m, n)``.
        rows, cols: global row / column indices (int64) of the local block ``W[rows][:, cols]``.
        rows_only: every rank's block has all columns (one all-reduce per power iteration).
        contributes: False on ranks whose block is a replica of another rank's (they add zeros).
        group: the process group spanning the parameter's device mesh.
        owner: the global rank that assembles the full matrix for full-spectrum methods.
    """

    param: Tensor
    name: str
    shape: tuple[int, int]
    rows: Tensor
    cols: Tensor
    rows_only: bool
    contributes: bool
    group: object
    group_ranks: tuple[int, ...]
    owner: int = 0
    _start: int | None = None  # contiguous block: local flat offset
    _row_base: Tensor | None = None  # general block: local flat index = row_base[:, None] + col_off
    _col_off: Tensor | None = None

    @property
    def local(self) -> Tensor:
        """The rank's local shard of the parameter (writes go through to the parameter)."""
        return self.param.to_local()

    def read(self) -> Tensor:
        """The local block ``W[rows][:, cols]`` (a view when contiguous, else a copy)."""
        flat = self.local.reshape(-1)
        r, c = self.rows.numel(), self.cols.numel()
        if r == 0 or c == 0:
            return flat.new_zeros(r, c)
        if self._start is not None:
            return flat[self._start : self._start + r * c].view(r, c)
        return flat[self._row_base[:, None] + self._col_off[None, :]]

    def write_(self, block: Tensor) -> None:
        """Write ``block`` (``len(rows) × len(cols)``) back into the local shard, in place."""
        local = self.local
        if not local.is_contiguous():  # pragma: no cover - FSDP2/TP shards are contiguous
            raise RuntimeError(f"fx_spectral.distributed: local shard of {self.name!r} is not contiguous")
        flat = local.view(-1)
        block = block.to(local.dtype)
        r, c = self.rows.numel(), self.cols.numel()
        # NB: the parameter's local storage is updated in place.
        if self._start is not None:
            flat[self._start : self._start + r * c].copy_(block.reshape(-1))
        else:
            flat[(self._row_base[:, None] + self._col_off[None, :]).reshape(-1)] = block.reshape(-1)


def _mesh_group(mesh) -> tuple[object, tuple[int, ...]]:
    ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
    if mesh.ndim == 1:
        return mesh.get_group(), ranks
    if len(ranks) == dist.get_world_size() and sorted(ranks) == list(range(len(ranks))):
        return dist.group.WORLD, ranks
    key = tuple(sorted(ranks))
    if key not in _GROUPS:  # NB: collective; every rank builds the same groups in the same order
        _GROUPS[key] = dist.new_group(list(key))
    return _GROUPS[key], ranks


_GROUPS: dict[tuple[int, ...], object] = {}


def _contributes(mesh, placements) -> bool:
    # A rank is the canonical holder of its block iff its coordinate is 0 on every mesh dim
    # along which the parameter is replicated.
    coord = mesh.get_coordinate()
    if coord is None:
        return False
    from torch.distributed.tensor import Shard

    return all(isinstance(p, Shard) or c == 0 for p, c in zip(placements, coord))


def sharded_matrices(
    param: Tensor,
    views: Callable[[Tensor], dict[str, Tensor]] | None = None,
    *,
    dim: int = 0,
) -> list[ShardedMatrix]:
    """Describe the matrix views of a DTensor parameter as seen by this rank.

    Args:
        param: a DTensor (placements ``Shard(d)`` / ``Replicate()`` on any mesh).
        views: ``tensor -> {name: view}`` giving sub-views of a tensor of the parameter's global shape
            (each read as ``view.reshape(-1, view.shape[-1])``), like ``constrain(split=...)``;
            ``None``: the whole parameter as ``weight_matrix(param, dim)``.
        dim: the output dimension for the whole-parameter matrix (0, or 1 for ConvTranspose).

    Returns:
        One :class:`ShardedMatrix` per view (in ``views``' order), owners not yet assigned.

    Raises:
        NotImplementedError: a ``Partial`` placement, or a view whose local part is not a rectangle.

    Example::

        mats = sharded_matrices(model.fc.weight)  # FSDP2 Shard(0): one matrix, rows-only
    """
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not is_dtensor(param):
        raise TypeError(f"fx_spectral.distributed.sharded_matrices: expected a DTensor, got {type(param).__name__}")
    mesh, placements = param.device_mesh, tuple(param.placements)
    if any(isinstance(p, Partial) for p in placements):
        raise NotImplementedError(f"fx_spectral.distributed: Partial placements are not supported (got {placements})")
    gshape = tuple(param.shape)
    lshape, offset = compute_local_shape_and_global_offset(gshape, mesh, placements)
    group, ranks = _mesh_group(mesh)
    contributes = _contributes(mesh, placements)
    if views is None and len(gshape) == 2 and dim == 0:
        # A plain 2-D weight: the local shard is the block (no index bookkeeping, any size).
        rows = torch.arange(offset[0], offset[0] + lshape[0])
        cols = torch.arange(offset[1], offset[1] + lshape[1])
        mat = ShardedMatrix(param, "", gshape, rows, cols, False, contributes, group, ranks, _start=0)
        return _agree_rows_only([mat], group)

    index = torch.arange(math.prod(gshape), dtype=torch.int64).view(gshape)
    if views is None:
        named = {"": index.movedim(dim, 0).flatten(1) if dim else index.flatten(1)}
    else:
        named = {k: v.reshape(-1, v.shape[-1]) for k, v in views(index).items()}
    lstrides = torch.tensor(_contiguous_strides(lshape), dtype=torch.int64)
    gstrides = torch.tensor(_contiguous_strides(gshape), dtype=torch.int64)
    off = torch.tensor(offset, dtype=torch.int64)
    lsz = torch.tensor(lshape, dtype=torch.int64)

    out = []
    for name, gidx in named.items():
        if gidx.dim() != 2 or gidx.numel() == 0:
            raise ValueError(
                f"fx_spectral.distributed: view {name!r} of a {list(gshape)} parameter is not a non-empty matrix"
            )
        m, n = gidx.shape
        coords = (gidx.unsqueeze(-1) // gstrides) % torch.tensor(gshape, dtype=torch.int64)  # (m, n, ndim)
        rel = coords - off
        inside = ((rel >= 0) & (rel < lsz)).all(-1)
        row_any, col_any = inside.any(1), inside.any(0)
        if not torch.equal(inside, row_any[:, None] & col_any[None, :]):
            raise NotImplementedError(
                f"fx_spectral.distributed: the local shard of a {list(gshape)} parameter with placements "
                f"{placements} does not cover a rectangle of view {name!r}"
            )
        rows = row_any.nonzero().flatten()
        cols = col_any.nonzero().flatten()
        mat = ShardedMatrix(param, name, (m, n), rows, cols, False, contributes, group, ranks)
        if rows.numel() and cols.numel():
            lidx = (rel[rows][:, cols] * lstrides).sum(-1)  # (r, c) local flat positions
            row_base, col_off = lidx[:, 0], lidx[0, :] - lidx[0, 0]
            if not torch.equal(lidx, row_base[:, None] + col_off[None, :]):  # pragma: no cover
                raise NotImplementedError(f"fx_spectral.distributed: view {name!r} is not a strided block")
            k = lidx.numel()
            if torch.equal(lidx.reshape(-1), torch.arange(k) + lidx[0, 0]):
                mat._start = int(lidx[0, 0])
            else:
                mat._row_base, mat._col_off = row_base, col_off
        out.append(mat)

    return _agree_rows_only(out, group)


def _agree_rows_only(out: list[ShardedMatrix], group) -> list[ShardedMatrix]:
    # Rows-only layout is a global property: agree on it (one small collective at setup).
    flags = [1 if (m.rows.numel() == 0 or m.cols.numel() == m.shape[1]) else 0 for m in out]
    flags = torch.tensor(flags, dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    for mat, f in zip(out, flags.tolist()):
        mat.rows_only = bool(f)
    return out


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return strides[::-1]


def assign_owners(mats: Sequence[ShardedMatrix]) -> None:
    """Spread full-spectrum work round-robin over each matrix's mesh ranks (deterministic)."""
    counters: dict[tuple[int, ...], int] = {}
    for mat in mats:
        i = counters.get(mat.group_ranks, 0)
        mat.owner = mat.group_ranks[i % len(mat.group_ranks)]
        counters[mat.group_ranks] = i + 1


# --------------------------------------------------------------------------------------------
# Power iteration
# --------------------------------------------------------------------------------------------


def _normalize_or_keep(t: Tensor, old: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # power.normalize_or_keep's plain rule on a full (replicated) vector.
    return P.normalize_or_keep(t, old, eps)


def groups_of(mats: Sequence[ShardedMatrix]) -> dict[int, list[int]]:
    """Indices of ``mats`` by process group (keyed by ``id(group)``), in first-appearance order:
    the same on every rank, so collectives per group line up."""
    out: dict[int, list[int]] = {}
    for i, mat in enumerate(mats):
        out.setdefault(id(mat.group), []).append(i)
    return out


@torch.no_grad()
def power_iterate_(
    mats: Sequence[ShardedMatrix],
    us: Sequence[Tensor],
    vs: Sequence[Tensor],
    n_iter: int = 1,
    *,
    eps: float = 1e-12,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    r"""Distributed power iteration on sharded matrices; updates ``us``/``vs`` in place.

    One step per matrix: :math:`u = \mathrm{normalize}(W v)`, :math:`v = \mathrm{normalize}(W^\top u)`;
    returns :math:`\hat\sigma = u^\top W v` per matrix (0-d tensors in ``dtype``, equal on every rank).
    All matrices of the call share one flat all-reduce buffer per phase.

    Args:
        mats: from :func:`sharded_matrices`.
        us, vs: full ``(m,)`` / ``(n,)`` vectors, identical on every rank (NB: overwritten).
        n_iter: iterations (``>= 1``).
        eps: a norm at or below ``eps`` keeps the previous vector (zero weights give sigma 0).
        dtype: compute dtype (float32 unless float64 is wanted).

    Example::

        sig = power_iterate_(mats, [u], [v], n_iter=2)
    """
    if n_iter < 1:
        raise ValueError(f"fx_spectral.distributed.power_iterate_: n_iter must be >= 1, got {n_iter}")
    sigmas: list[Tensor] = [torch.zeros((), dtype=dtype)] * len(mats)
    for idx in groups_of(mats).values():
        group = mats[idx[0]].group
        blocks = {i: mats[i].read().to(dtype) for i in idx}
        for _ in range(n_iter):
            _one_iteration(
                [mats[i] for i in idx],
                [blocks[i] for i in idx],
                [us[i] for i in idx],
                [vs[i] for i in idx],
                idx,
                sigmas,
                eps,
                dtype,
                group,
            )
    return sigmas


def _one_iteration(mats, blocks, us, vs, idx, sigmas, eps, dtype, group) -> None:
    device = blocks[0].device if blocks else torch.device("cpu")
    # Phase A: rows-only matrices send [scatter(W_R v), W_R^T W_R v]; the others send scatter(W_RC v_C).
    sizes = [m.shape[0] + (m.shape[1] if m.rows_only else 0) for m in mats]
    buf = torch.zeros(sum(sizes), dtype=dtype, device=device)
    pos = 0
    for mat, blk, v, size in zip(mats, blocks, vs, sizes):
        m = mat.shape[0]
        if mat.contributes and blk.numel():
            vd = v.to(dtype)
            a_loc = blk @ (vd if mat.cols.numel() == mat.shape[1] else vd[mat.cols])  # sorted: all == arange
            buf[pos : pos + m].index_copy_(0, mat.rows.to(device), a_loc)
            if mat.rows_only:
                buf[pos + m : pos + size] = blk.t() @ a_loc
        pos += size
    dist.all_reduce(buf, group=group)
    # Phase B (only for layouts with sharded columns, or a vanishing W v): W^T u.
    need_b = [(not m.rows_only) for m in mats]
    pos = 0
    new_u = []
    for k, (mat, u, size) in enumerate(zip(mats, us, sizes)):
        m = mat.shape[0]
        a = buf[pos : pos + m]
        u_new, a_norm = _normalize_or_keep(a, u.to(dtype), eps)
        new_u.append(u_new)
        if mat.rows_only and not bool(a_norm > eps):
            need_b[k] = True  # W v vanished: u kept its old value, so W^T u is not W^T a / |a|
        pos += size
    if any(need_b):  # every rank evaluates the same flags: need_b is globally consistent
        bsizes = [m.shape[1] if nb else 0 for m, nb in zip(mats, need_b)]
        bbuf = torch.zeros(sum(bsizes), dtype=dtype, device=device)
        pos = 0
        for mat, blk, u, nb, size in zip(mats, blocks, new_u, need_b, bsizes):
            if nb and mat.contributes and blk.numel():
                bbuf[pos : pos + size].index_copy_(0, mat.cols.to(device), blk.t() @ u[mat.rows])
            pos += size
        dist.all_reduce(bbuf, group=group)
    pos = bpos = 0
    for k, (mat, u, v, size) in enumerate(zip(mats, us, vs, sizes)):
        m = mat.shape[0]
        if need_b[k]:
            b = bbuf[bpos : bpos + mat.shape[1]]
        else:
            b = buf[pos + m : pos + size] / torch.linalg.vector_norm(buf[pos : pos + m])
        v_new, b_norm = _normalize_or_keep(b, v.to(dtype), eps)
        # NB: the caller's state vectors are updated in place.
        u.copy_(new_u[k])
        v.copy_(v_new)
        sigmas[idx[k]] = b_norm  # ||W^T u|| = u^T W v_new
        pos += size
        bpos += mat.shape[1] if need_b[k] else 0


# --------------------------------------------------------------------------------------------
# Applying a projection
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def apply_rank_one_(
    mat: ShardedMatrix,
    op: Callable[[Tensor, tuple[Tensor, Tensor, Tensor]], Tensor],
    estimate: tuple[Tensor, Tensor, Tensor],
) -> None:
    """Apply a rank-one / scaling op to the local block, in place (no communication).

    ``op(block, (u_block, sigma, v_block)) -> new block`` must act entrywise given the estimate,
    as ``spectral_normalize``, ``spectral_hammer`` and ``spectral_weight_decay`` do with ``estimate=``.
    """
    block = rank_one_block(mat, op, estimate)
    if block is not None:
        mat.write_(block)  # NB: the parameter's local shard is overwritten.


def rank_one_block(
    mat: ShardedMatrix,
    op: Callable[[Tensor, tuple[Tensor, Tensor, Tensor]], Tensor],
    estimate: tuple[Tensor, Tensor, Tensor],
) -> Tensor | None:
    """The new local block of :func:`apply_rank_one_`, not written (None for an empty block)."""
    if not (mat.rows.numel() and mat.cols.numel()):
        return None
    u, sigma, v = estimate
    return op(mat.read(), (u[mat.rows.to(u.device)], sigma, v[mat.cols.to(v.device)]))


@torch.no_grad()
def apply_full_(
    mats: Sequence[ShardedMatrix],
    ops: Sequence[Callable[[Tensor], Tensor]],
    *,
    dtype: torch.dtype | None = None,
    write: bool = True,
) -> list[Tensor | None]:
    """Apply full-matrix ops: assemble each matrix on its owner, project there, write back blocks.

    Matrices go in buckets of at most one per owner rank, so owners work in parallel. Owners come
    from :func:`assign_owners` (call it once on the full list). An op that raises on its owner
    gives a NaN matrix (broadcast like any result), so the other ranks never wait forever.

    Args:
        mats: sharded matrices (all ranks, same order).
        ops: one ``full_matrix -> new_full_matrix`` per matrix (run on the owner only).
        dtype: the dtype matrices are assembled and broadcast in (default: the parameter's).
        write: False: return the new local blocks without writing them (``write_`` them later).

    Returns:
        Each matrix's new local block (None where this rank holds none of it).
    """
    blocks: list[Tensor | None] = [None] * len(mats)
    pending = list(range(len(mats)))
    while pending:
        bucket, used, rest = [], set(), []
        for i in pending:
            key = (id(mats[i].group), mats[i].owner)
            (rest if key in used else bucket).append(i)
            used.add(key)
        pending = rest
        fulls, works = {}, []
        for i in bucket:
            mat = mats[i]
            full = _padded(mat, dtype)
            fulls[i] = full
            works.append(dist.reduce(full, dst=mat.owner, group=mat.group, async_op=True))
        for w in works:
            w.wait()
        me = dist.get_rank()
        for i in bucket:
            if mats[i].owner == me:
                try:
                    fulls[i].copy_(ops[i](fulls[i]))
                except (RuntimeError, ValueError):  # e.g. LinAlgError: reported as NaN on every rank
                    fulls[i].fill_(float("nan"))
        works = [dist.broadcast(fulls[i], src=mats[i].owner, group=mats[i].group, async_op=True) for i in bucket]
        for w in works:
            w.wait()
        for i in bucket:
            mat = mats[i]
            if mat.rows.numel() and mat.cols.numel():
                blocks[i] = fulls[i][mat.rows][:, mat.cols]
                if write:
                    mat.write_(blocks[i])
    return blocks


def _padded(mat: ShardedMatrix, dtype: torch.dtype | None) -> Tensor:
    local = mat.local
    full = torch.zeros(mat.shape, dtype=dtype or local.dtype, device=local.device)
    if mat.contributes and mat.rows.numel() and mat.cols.numel():
        rows, cols = mat.rows.to(local.device), mat.cols.to(local.device)
        full[rows[:, None], cols[None, :]] = mat.read().to(full.dtype)
    return full


@torch.no_grad()
def full_matrix(mat: ShardedMatrix, dtype: torch.dtype | None = None) -> Tensor:
    """The whole matrix on every rank (an all-reduce of zero-padded blocks; for tests and reports)."""
    full = _padded(mat, dtype)
    dist.all_reduce(full, group=mat.group)
    return full
