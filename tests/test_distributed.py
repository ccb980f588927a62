"""constrain() on DTensor-sharded weights (FSDP2 / HSDP / TP placements) against a single process.

Each test spawns gloo CPU ranks once (module-scoped fixture) that run every scenario and write
their measurements to a JSON file; the tests then check them. The single-process reference runs
inside the same workers on an unsharded copy of the model with the same data, so "equal" means
what a user would see: the same weights after the same training steps, within 1e-4 (float32).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from spawned import run_on_ranks
from torch import nn

from fx_spectral.constraint import constrain

METHODS = {
    "spectral_normalize": {"n_iter": 2},
    "spectral_hammer": {},
    "spectral_weight_decay": {"wd": 0.2},
    "hard_cap": {},
    "soft_cap": {"alpha": 0.05},
    "pure_svd": {},
    "orthogonalize": {"steps": 5},
}
STEPS = 3
TOL = 1e-4

N_KV, HEADS_PER_KV, HEAD_DIM, DIM = 2, 2, 4, 16


def qkv_split(fqn, param):
    """Q / K / V blocks of a fused (n_kv · (heads_per_kv + 2) · head_dim, dim) projection."""
    if not fqn.endswith("wqkv.weight"):
        return None
    w = param.view(N_KV, HEADS_PER_KV + 2, HEAD_DIM, param.shape[-1])
    return {"q": w[:, :HEADS_PER_KV], "k": w[:, HEADS_PER_KV], "v": w[:, HEADS_PER_KV + 1]}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.wqkv = nn.Linear(DIM, N_KV * (HEADS_PER_KV + 2) * HEAD_DIM, bias=False)
        self.up = nn.Linear(N_KV * (HEADS_PER_KV + 2) * HEAD_DIM, 22)  # 22 rows: uneven shards on 4 ranks
        self.down = nn.Linear(22, DIM)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(torch.tanh(self.wqkv(x)))))


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(Block(), Block())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # large enough that every cap engages
    return model


def _train(model, opt, data, steps):
    for x, y in data[:steps]:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def _compare(model, ref) -> float:
    err = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        err = max(err, (_full(p) - q.detach()).abs().max().item())
    return err


def _scenario_fsdp(rank, world, mesh, method, options, results, key, opt_cls=torch.optim.AdamW, **shard_kw):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(100)
    data = [(torch.randn(4 * world, DIM), torch.randn(4 * world, DIM)) for _ in range(STEPS)]
    ref = _model(1)
    model = _model(1)
    for block in model:
        fully_shard(block, mesh=mesh, **shard_kw)
    fully_shard(model, mesh=mesh, **shard_kw)
    # (AdamW's m/sqrt(v) turns rounding-level gradients into lr-sized steps: SGD where the weights
    # start small, after the initial projection)
    kw = {"weight_decay": 0.0} if opt_cls is torch.optim.AdamW else {}
    opt_ref = opt_cls(ref.parameters(), lr=0.05, **kw)
    opt = opt_cls(model.parameters(), lr=0.05, **kw)
    h_ref = constrain(ref, opt_ref, method, w_max=1.5, split=qkv_split, **options)
    h = constrain(model, opt, method, w_max=1.5, split=qkv_split, **options)
    fresh, fresh_ref = h.report(exact=False), h_ref.report(exact=False)  # no stored vectors yet
    _train(ref, opt_ref, data, STEPS)
    # Each rank trains on its slice of the batch; FSDP averages the gradients, as the mean loss
    # over the whole batch does for the reference.
    local = [(x.chunk(world)[rank % world], y.chunk(world)[rank % world]) for x, y in data]
    _train(model, opt, local, STEPS)
    rep, rep_ref = h.report(), h_ref.report()
    results[key] = {
        "weights": _compare(model, ref),
        "sigma": max(abs(rep[n]["sigma"] - rep_ref[n]["sigma"]) for n in rep_ref),
        "max_sigma": max(r["sigma"] for r in rep.values()),
        "names": sorted(rep) == sorted(rep_ref),
        "placements": str(next(model.parameters()).placements),
    }
    est, est_ref = h.report(exact=False), h_ref.report(exact=False)  # (stored vectors where the method keeps them)
    results[key]["estimate_fresh"] = max(abs(fresh[n]["sigma"] - fresh_ref[n]["sigma"]) for n in fresh_ref)
    results[key]["estimate"] = max(abs(est[n]["sigma"] - est_ref[n]["sigma"]) for n in est_ref)
    vec = []
    for t in h._targets:
        for k in t.w_max:
            got, want = h._get_vectors(t, k), h_ref._get_vectors([r for r in h_ref._targets if r.fqn == t.fqn][0], k)
            if got is not None and want is not None:
                vec.append(max((got[0] - want[0]).abs().max().item(), (got[1] - want[1]).abs().max().item()))
    results[key]["vectors"] = max(vec) if vec else None


def _scenario_placements(rank, world, results):
    """Ops on weights distributed by hand (TP-style Shard(1), 2-D blocks) against the full matrix."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    layouts = {"shard1": ((world,), [Shard(1)])}
    if world == 4:
        layouts.update(
            {
                "2d_s0s1": ((2, 2), [Shard(0), Shard(1)]),
                "2d_s1s0": ((2, 2), [Shard(1), Shard(0)]),
                "2d_rs0": ((2, 2), [Replicate(), Shard(0)]),
            }
        )
    for name, (shape, placements) in layouts.items():
        mesh = init_device_mesh("cpu", shape)
        for method, options in METHODS.items():
            ref, model = _model(2), _model(2)
            for mod in model.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight = nn.Parameter(distribute_tensor(mod.weight.detach().clone(), mesh, placements))
                    if mod.bias is not None:
                        mod.bias = nn.Parameter(
                            distribute_tensor(mod.bias.detach().clone(), mesh, [Replicate()] * len(shape))
                        )
            opt_ref = torch.optim.SGD(ref.parameters(), lr=0.0)
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            h_ref = constrain(ref, opt_ref, method, w_max=1.5, split=qkv_split, **options)
            h = constrain(model, opt, method, w_max=1.5, split=qkv_split, **options)
            for _ in range(2):
                h_ref.project()
                h.project()
            results[f"{name}/{method}"] = {"weights": _compare(model, ref)}


def _scenario_all_or_nothing(rank, world, mesh, results):
    """A NaN in one rank's shard of the second block: every rank raises the same ProjectionError
    (naming that weight, none hanging in a collective) and no shard anywhere is written."""
    from torch.distributed.fsdp import fully_shard

    from fx_spectral.constraint import ProjectionError

    for method in ("spectral_normalize", "hard_cap"):
        model = _model(3)
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        h = constrain(model, opt, method, w_max=1.5, split=qkv_split)
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().mul_(10.0)  # outside the ball again: a projection would change every weight
            if rank == world - 1:
                model[1].up.weight.to_local()[0, 0] = float("nan")
        before = {n: _full(p).clone() for n, p in model.named_parameters()}
        try:
            h.project()
            message = None
        except ProjectionError as e:
            message = str(e)
        after = {n: _full(p) for n, p in model.named_parameters()}
        unchanged = all(torch.equal(before[n], after[n]) or n == "1.up.weight" for n in before)
        unchanged &= torch.equal(before["1.up.weight"].isnan(), after["1.up.weight"].isnan())
        results[f"atomic/{method}/{rank}"] = {"message": message, "unchanged": bool(unchanged)}


def _scenario_refuse_twice(rank, world, mesh, results):
    from torch.distributed.fsdp import fully_shard

    model = _model(4)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    constrain(model, opt, "hard_cap", w_max=1.5)
    try:
        constrain(model, opt, "soft_cap", alpha=0.1)
        results[f"twice/{rank}"] = None
    except ValueError as e:
        results[f"twice/{rank}"] = str(e)


def _worker(rank, world):
    """One rank's scenarios; rank 0 returns everyone's results (tests/spawned.py runs it)."""
    from torch.distributed.device_mesh import init_device_mesh

    results: dict = {}
    mesh = init_device_mesh("cpu", (world,))
    for method, options in METHODS.items():  # (from the same start: weights outside the ball)
        _scenario_fsdp(
            rank, world, mesh, method, {**options, "initial_projection": False}, results, f"fsdp/{method}"
        )
    # with the initial projection (the default): it runs on the owner ranks, exactly
    sgd = torch.optim.SGD
    _scenario_fsdp(rank, world, mesh, "spectral_normalize", {"exact": True}, results, "fsdp/exact_normalize", sgd)
    _scenario_fsdp(rank, world, mesh, "hard_cap", {}, results, "fsdp/initial_hard_cap", sgd)
    if world == 4:
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for method in ("spectral_hammer", "soft_cap"):
            options = {**METHODS[method], "initial_projection": False}
            _scenario_fsdp(rank, world, hsdp, method, options, results, f"hsdp/{method}")
    _scenario_placements(rank, world, results)
    if world == 2:
        _scenario_all_or_nothing(rank, world, mesh, results)
        _scenario_refuse_twice(rank, world, mesh, results)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    return {k: v for r in gathered for k, v in r.items()}


def _run(world: int) -> dict:
    return run_on_ranks(_worker, world)


@pytest.fixture(scope="module")
def two_ranks():
    return _run(2)


@pytest.fixture(scope="module")
def four_ranks():
    return _run(4)


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_two_ranks_matches_single_process(two_ranks, method):
    r = two_ranks[f"fsdp/{method}"]
    assert "Shard(dim=0)" in r["placements"]
    assert r["names"]
    assert r["weights"] < TOL, r
    assert r["sigma"] < TOL, r
    if r["vectors"] is not None:
        assert r["vectors"] < TOL, r


@pytest.mark.parametrize("method", list(METHODS))
def test_inexact_report_matches_single_process(two_ranks, method):
    """report(exact=False) starts and iterates as on one process (power.start_vectors, N_REPORT steps)."""
    r = two_ranks[f"fsdp/{method}"]
    assert r["estimate_fresh"] < TOL, r
    assert r["estimate"] < TOL, r


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_four_ranks_matches_single_process(four_ranks, method):
    r = four_ranks[f"fsdp/{method}"]
    assert r["weights"] < TOL, r
    assert r["sigma"] < TOL, r


@pytest.mark.parametrize("method", ["spectral_hammer", "soft_cap"])
def test_hsdp_replicate_shard_four_ranks(four_ranks, method):
    r = four_ranks[f"hsdp/{method}"]
    assert "Replicate" in r["placements"] and "Shard(dim=0)" in r["placements"]
    assert r["weights"] < TOL, r


@pytest.mark.parametrize("layout", ["shard1", "2d_s0s1", "2d_s1s0", "2d_rs0"])
@pytest.mark.parametrize("method", list(METHODS))
def test_tp_style_placements(two_ranks, four_ranks, layout, method):
    results = two_ranks if layout == "shard1" else four_ranks
    assert results[f"{layout}/{method}"]["weights"] < TOL


@pytest.mark.parametrize("world", [2, 4])
def test_initial_projection_and_exact_normalize_match_single_process(two_ranks, four_ranks, world):
    results = two_ranks if world == 2 else four_ranks
    r = results["fsdp/exact_normalize"]
    assert r["weights"] < TOL, r
    assert r["max_sigma"] <= 1.5 * (1 + 1e-5), r  # exact: the cap holds (no estimate to under-read)
    r = results["fsdp/initial_hard_cap"]
    assert r["weights"] < TOL, r
    assert r["max_sigma"] <= 1.5 * 1.0109 * (1 + 1e-5), r


def test_projection_is_all_or_nothing_on_every_rank(two_ranks):
    for method in ("spectral_normalize", "hard_cap"):
        entries = [two_ranks[f"atomic/{method}/{rank}"] for rank in range(2)]
        for r in entries:
            assert r["message"] is not None and "'1.up.weight'" in r["message"] and "NaN" in r["message"], r
            assert r["unchanged"], r
        assert entries[0]["message"] == entries[1]["message"]


def test_second_constrain_is_refused_on_every_rank(two_ranks):
    for rank in range(2):
        assert "already constrained" in two_ranks[f"twice/{rank}"]
