"""msign / msign_clip (hard_cap(mode="msign")) against torch.linalg.svd, batched, bf16, extremes, DTensor."""

from __future__ import annotations

import pytest
import torch
from spawned import run_on_ranks
from torch import nn

from fx_spectral import projections as C
from fx_spectral.constraint import constrain
from fx_spectral.methods import HardCap
from fx_spectral.msign import MSIGN_RANGE, msign, msign_clip, polar_express_coefficients

# many tiny ops: a second intra-op thread only adds synchronisation (and crawls on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")


def _matrix(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """float64 ``U diag(s) Vᵀ`` with random orthogonal U, V (s has min(m, n) entries)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    k = min(m, n)
    return (U[:, :k] * s) @ V[:, :k].T


def _spectra(k: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    u = lambda n: torch.rand(n, dtype=torch.float64, generator=g)  # noqa: E731
    return {
        "uniform_0_3": 3 * u(k),
        # a cluster straddling the cap (the hardest case: sign(σ² - 1) of σ ≈ 1)
        "around_the_cap": torch.cat([1 + torch.linspace(-0.02, 0.02, k // 2, dtype=torch.float64), 3 * u(k // 2)]),
        "all_at_3": torch.full((k,), 3.0, dtype=torch.float64),
        "one_large": torch.cat([torch.tensor([3.0], dtype=torch.float64), 0.5 * u(k - 1)]),
        "all_below": 0.99 * u(k),
    }


def _errors(W: torch.Tensor, Y: torch.Tensor, w_max: float) -> tuple[float, float]:
    want = torch.linalg.svdvals(W.double()).clamp_max(w_max)
    got = torch.linalg.svdvals(Y.double())
    return (got - want).abs().max().item(), got.max().item()


def test_coefficients_are_minimax_and_converge():
    coefficients = polar_express_coefficients()
    assert len(coefficients) == 8 and coefficients[-1] == (15 / 8, -10 / 8, 3 / 8)
    x = torch.logspace(-3, 0, 4001, dtype=torch.float64)
    for a, b, c in coefficients:
        x = a * x + b * x**3 + c * x**5
    assert (x - 1).abs().max() < 1e-6  # every singular value in [1e-3, 1] lands on 1
    # the first quintic equioscillates on [1e-3, 1.05]: |1 - p| at its extremes are all equal
    a, b, c = coefficients[0]
    t = torch.linspace(1e-3, 1.05, 200_001, dtype=torch.float64)
    err = 1 - (a * t + b * t**3 + c * t**5)
    peak = err.abs().max()
    assert abs(err[0].item()) == pytest.approx(peak.item(), rel=1e-3)  # at the left end
    assert abs(err[-1].item()) == pytest.approx(peak.item(), rel=1e-3)  # at the right end
    with pytest.raises(ValueError, match="lower"):
        polar_express_coefficients(0.0)


@pytest.mark.parametrize("w_max", [1.0, 0.7])
def test_float32_matches_svd_within_1e_4(w_max):
    for name, s in _spectra().items():
        W = _matrix(256, 128, s * w_max, seed=len(name))
        err, top = _errors(W, msign_clip(W.float(), w_max), w_max)
        assert err <= 1e-4 * w_max, name
        assert top <= w_max * 1.0001, name
        assert err <= 1e-4 * w_max


@pytest.mark.parametrize("kind", ["bf16_weight", "bf16_dtype"])
def test_bf16_within_2e_2_and_never_above_the_cap(kind):
    w_max = 0.7
    for name, s in _spectra().items():
        W = _matrix(256, 128, s * w_max, seed=len(name)).float()
        if kind == "bf16_weight":
            W = W.bfloat16()
            Y = msign_clip(W, w_max)
            assert Y.dtype == torch.bfloat16
        else:  # float32 weight computed from its bf16 rounding
            Y = msign_clip(W, w_max, dtype=torch.bfloat16)
            assert Y.dtype == torch.float32
        err, top = _errors(W, Y, w_max)
        assert err <= 2e-2 * w_max, name
        assert top <= 1.001 * w_max, name


def test_clustered_small_weight_stays_under_the_cap():
    # an 8x8 weight as the demo's V after a Muon step (singular values just around the cap): with
    # bf16 products this came out 1% above the cap, hence float32 products only
    W = _matrix(8, 8, torch.tensor([0.5679, 0.5439, 0.5207, 0.4925, 0.4658, 0.3906, 0.3739, 0.3412]).double())
    for dtype in (torch.float32, torch.bfloat16):
        err, top = _errors(W.to(dtype), msign_clip(W.to(dtype), 0.5), 0.5)
        assert top <= 0.5 * 1.001
        assert err <= (1e-4 if dtype == torch.float32 else 2e-2)


def test_batched_tall_and_4d_equal_the_loop():
    s = _spectra(16)
    W = torch.stack([_matrix(24, 16, v, seed=i) for i, v in enumerate(s.values())]).float()  # tall (5, 24, 16)
    Y = msign_clip(W, 1.2)
    for i in range(W.shape[0]):
        torch.testing.assert_close(Y[i], msign_clip(W[i], 1.2), rtol=0, atol=1e-6)
        err, _ = _errors(W[i], Y[i], 1.2)
        assert err <= 1e-4
    W4 = W[:4].reshape(2, 2, 24, 16).mT.contiguous()  # wide (2, 2, 16, 24)
    torch.testing.assert_close(msign_clip(W4, 1.2), msign_clip(W[:4].mT, 1.2).reshape(2, 2, 16, 24))


def test_inside_the_ball_and_zero_are_returned_unchanged():
    W = _matrix(32, 16, torch.linspace(0.01, 0.2, 16, dtype=torch.float64)).float()
    assert torch.equal(msign_clip(W, 1.0), W)  # rho <= w_max: nothing to clip
    Z = torch.zeros(3, 8, 5)
    assert torch.equal(msign_clip(Z, 1.0), Z)
    # a zero matrix in a batch with one to clip
    batch = torch.stack([torch.zeros(16, 16), 3 * _matrix(16, 16, torch.ones(16, dtype=torch.float64)).float()])
    out = msign_clip(batch, 1.0)
    assert torch.equal(out[0], batch[0])
    assert torch.linalg.svdvals(out[1].double()).sub(1).abs().max() < 1e-5


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e15, 100.0])
def test_finite_and_under_the_cap_for_any_scale(scale):
    s = torch.linspace(0.0, 3.0, 16, dtype=torch.float64)
    W = (_matrix(24, 16, s) * scale).float()
    Y = msign_clip(W, 1.0)
    assert torch.isfinite(Y).all()
    got = torch.linalg.svdvals(Y.double())
    assert got.max() <= 1.0 + 1e-4
    if scale * 3 <= 1:  # nothing above the cap: unchanged
        assert torch.equal(Y, W)
    elif scale * 3 * 4 ** (1 / 32) <= MSIGN_RANGE:  # within the exact range
        assert (got - torch.linalg.svdvals(W.double()).clamp_max(1.0)).abs().max() < 1e-4
    else:  # scaled into range first: the top singular values still land on the cap
        assert got[0] == pytest.approx(1.0, abs=1e-4)
    huge = torch.full((8, 8), 3e38)  # near float32's largest: no overflow in the products
    assert torch.isfinite(msign_clip(huge, 1.0)).all()


def test_msign_is_the_polar_factor():
    W = _matrix(40, 24, torch.linspace(0.05, 2.0, 24, dtype=torch.float64)).float()
    U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    torch.testing.assert_close(msign(W).double(), U @ Vh, rtol=0, atol=1e-5)
    torch.testing.assert_close(msign(W.T).double(), (U @ Vh).T, rtol=0, atol=1e-5)
    assert torch.equal(msign(torch.zeros(4, 3)), torch.zeros(4, 3))


def test_hard_cap_modes_and_errors():
    W = _matrix(48, 32, 2 * torch.rand(32, dtype=torch.float64)).float()
    exact = C.hard_cap(W, 1.1, exact=True)
    torch.testing.assert_close(C.hard_cap(W, 1.1, mode="eigh"), exact)
    torch.testing.assert_close(C.hard_cap(W, 1.1, mode="msign"), exact, rtol=0, atol=1e-4)
    torch.testing.assert_close(C.hard_cap(W, 1.1, mode="polynomial"), C.hard_cap(W, 1.1))
    with pytest.raises(ValueError, match="mode must be one of"):
        C.hard_cap(W, mode="svd")
    with pytest.raises(ValueError, match="conflicts"):
        C.hard_cap(W, exact=True, mode="msign")
    with pytest.raises(ValueError, match="HardCap: mode"):
        HardCap(mode="fast")
    with pytest.raises(ValueError, match="HardCap: exact=True"):
        HardCap(exact=True, mode="polynomial")
    with pytest.raises(ValueError, match="float32 at least"):
        C.hard_cap(W, mode="msign", matmul_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 at least"):
        HardCap(mode="msign", matmul_dtype=torch.float16)
    with pytest.raises(ValueError, match="w_max"):
        msign_clip(W, 0.0)
    with pytest.raises(TypeError, match="floating"):
        msign_clip(torch.ones(3, 3, dtype=torch.long))


def test_constrain_with_msign_mode_caps_every_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    before = [m.weight.detach().clone() for m in (model[0], model[2])]
    opt = torch.optim.Muon([model[0].weight, model[2].weight], lr=0.0)  # "auto" products: float32 for msign
    handle = constrain(model, opt, "hard_cap", w_max=1.3, mode="msign")
    handle.project()
    for lin, W in zip((model[0], model[2]), before):
        scale = (W.shape[0] / W.shape[1]) ** 0.5  # constrain() caps RMS->RMS norms
        want = C.pure_svd(W / scale, 1.3) * scale
        torch.testing.assert_close(lin.weight.detach(), want, rtol=0, atol=2e-4 * scale)


# --------------------------------------------------------------------------------------------
# DTensor: the msign mode goes the full-spectrum way (matrix assembled on its owner rank)
# --------------------------------------------------------------------------------------------


def _dtensor_worker(rank, world):
    """Sharded hard cap (msign mode) vs one process, on every rank (tests/spawned.py runs it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Linear(12, 20, bias=False), nn.Linear(20, 6, bias=False))
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(5.0)
    model = nn.Sequential(nn.Linear(12, 20, bias=False), nn.Linear(20, 6, bias=False))
    for dim, (mod, src) in enumerate(zip(model, ref)):  # Shard(0) on the first, Shard(1) on the second
        mod.weight = nn.Parameter(distribute_tensor(src.weight.detach().clone(), mesh, [Shard(dim)]))
    h_ref = constrain(ref, torch.optim.SGD(ref.parameters(), lr=0.0), "hard_cap", w_max=0.8, mode="msign")
    h = constrain(model, torch.optim.SGD(model.parameters(), lr=0.0), "hard_cap", w_max=0.8, mode="msign")
    h_ref.project()
    h.project()
    err = max((m.weight.full_tensor() - r.weight.detach()).abs().max().item() for m, r in zip(model, ref))
    sig = max(v["sigma"] for v in h.report().values())
    return {"err": err, "sigma": sig, "placements": str(model[0].weight.placements)}


def test_dtensor_sharded_weights_match_single_process():
    r = run_on_ranks(_dtensor_worker, 2)
    assert "Shard(dim=0)" in r["placements"]
    assert r["err"] < 1e-5
    assert r["sigma"] <= 0.8 * (1 + 1e-4)
