"""fx_spectral.projections: every op checked against an SVD of its input (float64 references)."""

from __future__ import annotations

import pytest
import torch

from fx_spectral import coupling
from fx_spectral import projections as C


def with_spectrum(s, m, n, *, batch=(), seed=0, dtype=torch.float64):
    """A random (..., m, n) matrix with prescribed singular values ``s`` (length min(m, n))."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))[0]
    S = torch.as_tensor(s, dtype=torch.float64).expand(*batch, k)
    return ((U * S.unsqueeze(-2)) @ V.mT).to(dtype)


def svals(W):
    return torch.linalg.svdvals(W.double())


def spectrum(k, lo=0.05, hi=2.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(k, generator=g, dtype=torch.float64) * (hi - lo) + lo
    return s.sort(descending=True).values


SHAPES = [(24, 16), (16, 24), (20, 20)]


@pytest.mark.parametrize("m,n", SHAPES)
def test_soft_cap_maps_every_singular_value(m, n):
    s = spectrum(min(m, n), hi=1.4)
    W = with_spectrum(s, m, n, batch=(2, 3))
    alpha = 0.4
    Y = C.soft_cap(W, alpha)
    expected = C.soft_cap_polynomial(s, alpha).abs().sort(descending=True).values
    torch.testing.assert_close(svals(Y), expected.expand(2, 3, -1), rtol=0, atol=1e-10)
    # singular vectors are kept: Y = U f(S) Vᵀ
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(Y, (U * C.soft_cap_polynomial(S, alpha).unsqueeze(-2)) @ Vh, rtol=0, atol=1e-10)


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("w_max", [1.0, 2.5])
def test_hard_cap_polynomial_and_exact(m, n, w_max):
    s = spectrum(min(m, n), hi=2.2 * w_max)
    W = with_spectrum(s, m, n, batch=(2,))
    poly = C.hard_cap_polynomial(s, w_max).abs().sort(descending=True).values
    torch.testing.assert_close(svals(C.hard_cap(W, w_max)), poly.expand(2, -1), rtol=0, atol=1e-9)
    exact = s.clamp_max(w_max).sort(descending=True).values
    torch.testing.assert_close(svals(C.hard_cap(W, w_max, exact=True)), exact.expand(2, -1), rtol=0, atol=1e-9)


def test_hard_cap_polynomial_values_from_the_paper():
    got = C.hard_cap_polynomial(torch.tensor([0.5, 1.0, 1.185, 2.0], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([0.498, 0.966, 1.0109, 1.002], dtype=torch.float64), atol=6e-4, rtol=0)
    x = torch.linspace(0, 2.5, 100001, dtype=torch.float64)
    assert C.hard_cap_polynomial(x).max() < 1.011


@pytest.mark.parametrize("m,n", SHAPES)
def test_pure_svd_clips_exactly(m, n):
    s = spectrum(min(m, n))
    W = with_spectrum(s, m, n)
    Y = C.pure_svd(W, 1.3)
    torch.testing.assert_close(svals(Y), s.clamp_max(1.3).sort(descending=True).values, rtol=0, atol=1e-10)
    # below the cap nothing moves
    small = with_spectrum(spectrum(min(m, n), hi=1.0), m, n)
    torch.testing.assert_close(C.pure_svd(small, 1.3), small, rtol=0, atol=1e-10)


@pytest.mark.parametrize("m,n", SHAPES)
def test_hammer_and_weight_decay_change_only_the_top_singular_value(m, n):
    s = torch.linspace(2.0, 0.1, min(m, n), dtype=torch.float64)
    s[0] = 3.0  # a clear gap: power iteration converges fast
    W = with_spectrum(s, m, n, batch=(2,))
    est = C.power_iterate(W, n_iter=100)
    torch.testing.assert_close(est[1], torch.full((2,), 3.0, dtype=torch.float64))
    hammered = svals(C.spectral_hammer(W, 1.5, estimate=est))
    expected_hammer = torch.cat([torch.tensor([1.5], dtype=torch.float64), s[1:]]).sort(descending=True).values
    torch.testing.assert_close(hammered, expected_hammer.expand(2, -1), rtol=0, atol=1e-9)
    decayed = svals(C.spectral_weight_decay(W, 0.25, estimate=est))
    expected = torch.cat([torch.tensor([2.25], dtype=torch.float64), s[1:]]).sort(descending=True).values
    torch.testing.assert_close(decayed, expected.expand(2, -1), rtol=0, atol=1e-9)
    # without an estimate the op runs its own (fresh, 15 iterations from random): close, not exact
    fresh = svals(C.spectral_hammer(W, 1.5, n_iter=60))
    torch.testing.assert_close(fresh, expected_hammer.expand(2, -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("m,n", SHAPES)
def test_spectral_normalize(m, n):
    s = spectrum(min(m, n))
    W = with_spectrum(s, m, n, batch=(3,))
    Y = C.spectral_normalize(W, 0.7, n_iter=200)
    torch.testing.assert_close(svals(Y), (s * 0.7 / s[0]).expand(3, -1), rtol=0, atol=1e-8)
    small = with_spectrum(spectrum(min(m, n), hi=0.6), m, n)
    torch.testing.assert_close(C.spectral_normalize(small, 0.7, n_iter=50), small)


@pytest.mark.parametrize("m,n", SHAPES)
def test_orthogonalize_is_muons_polynomial_on_the_normalized_spectrum(m, n):
    s = spectrum(min(m, n), lo=0.01)
    W = with_spectrum(s, m, n, dtype=torch.float32)
    x = s / torch.linalg.vector_norm(s)  # W / ||W||_F
    a, b, c = C.NS_COEFFICIENTS
    for _ in range(5):
        x = x * (a + b * x**2 + c * x**4)
    torch.testing.assert_close(svals(C.orthogonalize(W)), x.sort(descending=True).values, rtol=0, atol=1e-4)
    torch.testing.assert_close(svals(C.orthogonalize(W, exact=True)), torch.ones_like(s), rtol=0, atol=1e-5)


def test_orthogonalize_agrees_with_torch_muon_helper():
    from torch.optim._muon import _zeropower_via_newtonschulz

    W = torch.randn(48, 32)
    ours = C.orthogonalize(W, dtype=torch.bfloat16)
    theirs = _zeropower_via_newtonschulz(W, C.NS_COEFFICIENTS, 5, 1e-7).to(W.dtype)
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max() < 0.05  # both bf16, different rounding order


def test_power_iterate_batched_warm_start_and_zero():
    W = torch.randn(4, 30, 20, dtype=torch.float64)
    u, sigma, v = C.power_iterate(W, n_iter=300)
    torch.testing.assert_close(sigma, svals(W)[..., 0])
    assert u.shape == (4, 30) and v.shape == (4, 20) and sigma.shape == (4,)
    # warm start from converged vectors: one step stays converged
    _, sigma1, _ = C.power_iterate(W, u=u, v=v)
    torch.testing.assert_close(sigma1, sigma)
    # low precision input: vectors and sigma in float32 by default
    u16, s16, v16 = C.power_iterate(W.bfloat16(), n_iter=50)
    assert s16.dtype == u16.dtype == torch.float32
    # a zero weight gives sigma 0, never NaN
    u0, s0, v0 = C.power_iterate(torch.zeros(5, 3))
    assert s0.item() == 0 and torch.isfinite(u0).all() and torch.isfinite(v0).all()
    assert torch.equal(C.spectral_normalize(torch.zeros(5, 3)), torch.zeros(5, 3))


def _ops():
    est_iters = 80
    return {
        "soft_cap": lambda W: C.soft_cap(W, 0.3),
        "hard_cap": lambda W: C.hard_cap(W, 1.2),
        "hard_cap_exact": lambda W: C.hard_cap(W, 1.2, exact=True),
        "pure_svd": lambda W: C.pure_svd(W, 1.2),
        "orthogonalize": C.orthogonalize,
        "spectral_normalize": lambda W: C.spectral_normalize(W, 1.0, n_iter=est_iters),
        "spectral_hammer": lambda W: C.spectral_hammer(W, 1.0, n_iter=est_iters),
        "spectral_weight_decay": lambda W: C.spectral_weight_decay(W, 0.1, n_iter=est_iters),
    }


@pytest.mark.parametrize("name", list(_ops()))
def test_batched_equals_loop_and_input_untouched(name):
    op = _ops()[name]
    s = torch.linspace(2.0, 0.1, 12)
    s[0] = 3.5  # a gap, so that power iteration from different random starts agrees
    W = with_spectrum(s, 12, 20, batch=(2, 3), dtype=torch.float64)
    before = W.clone()
    batched = op(W)
    assert torch.equal(W, before)
    loop = torch.stack([op(w) for w in W.reshape(-1, 12, 20)]).reshape(W.shape)
    torch.testing.assert_close(batched, loop, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(_ops()))
def test_bf16(name):
    op = _ops()[name]
    W = torch.randn(32, 48) / 6
    Y16 = op(W.bfloat16())
    assert Y16.dtype == torch.bfloat16
    Y32 = op(W)
    assert (Y16.float() - Y32).abs().max() < 0.06 * Y32.abs().max()


def test_dtype_argument():
    W = torch.randn(16, 32).bfloat16()
    Y = C.soft_cap(W, 0.2, dtype=torch.float32)
    assert Y.dtype == torch.bfloat16
    torch.testing.assert_close(Y, C.soft_cap(W.float(), 0.2).bfloat16())


def test_gradcheck_float64():
    W = (torch.randn(5, 4, dtype=torch.float64) / 2).requires_grad_()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.autograd.gradcheck(lambda w: C.soft_cap(w, 0.3), (W,))
    torch.autograd.gradcheck(lambda w: C.hard_cap(w, 0.5), (W,))
    torch.autograd.gradcheck(lambda w: C.pure_svd(w, 0.3), (W,))
    torch.autograd.gradcheck(lambda w: C.orthogonalize(w), (W,))
    torch.autograd.gradcheck(lambda w: C.power_iterate(w, 200, generator=gen())[1], (W,))
    torch.autograd.gradcheck(lambda w: C.spectral_normalize(w, 0.1, n_iter=200, generator=gen()), (W,))
    # (the rank-one ops treat u, v as constants, like spectral_norm: no full-Jacobian gradcheck)
    # d sigma / dW = u vᵀ
    u, sigma, v = C.power_iterate(W, 200)
    (g,) = torch.autograd.grad(sigma, W)
    torch.testing.assert_close(g, torch.outer(u, v))


@pytest.mark.parametrize("w_max,wd,eta", [(1.0, 0.0, 0.024), (1.0, 0.01, 0.1), (2.0, 0.001, 0.3), (1.0, 0.0, 0.5)])
def test_soft_cap_coupling(w_max, wd, eta):
    alpha = C.soft_cap_coupling(w_max, wd, eta)
    k = w_max * (1 - wd) + eta
    x = torch.linspace(0, k, 200001, dtype=torch.float64)
    f = C.soft_cap_polynomial(x, alpha)
    assert abs(f.max().item() - w_max) < 1e-9 * w_max  # max of f on [0, k] is w_max
    assert f.min().item() >= -1e-12
    if k <= w_max / coupling._g(coupling._t_peak()):  # the usual regime: f(k) = w_max (quartic root)
        fk = C.soft_cap_polynomial(torch.tensor(k, dtype=torch.float64), alpha).item()
        assert abs(fk - w_max) < 1e-9
        quartic = -(k**9) * alpha**4 + 3 * k**7 * alpha**3 - 3 * k**5 * alpha**2 + (k - w_max)
        assert abs(quartic) < 1e-9
        # the smallest non-negative root: smaller alphas leave f(k) above w_max
        assert C.soft_cap_polynomial(torch.tensor(k, dtype=torch.float64), alpha * 0.999).item() > w_max


def test_soft_cap_coupling_edge_cases():
    assert C.soft_cap_coupling(1.0, 0.1, 0.05) == 0.0  # k <= w_max: nothing to cap
    with pytest.raises(ValueError, match="w_max"):
        C.soft_cap_coupling(0.0, 0.0, 0.1)
    with pytest.raises(ValueError, match="max_update_norm"):
        C.soft_cap_coupling(1.0, 0.0, -0.1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch of matrices"):
        C.soft_cap(torch.randn(5), 0.1)
    with pytest.raises(TypeError, match="floating"):
        C.hard_cap(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha"):
        C.soft_cap(torch.randn(3, 3), -1.0)
    with pytest.raises(ValueError, match="w_max"):
        C.pure_svd(torch.randn(3, 3), 0.0)
    with pytest.raises(ValueError, match="wd"):
        C.spectral_weight_decay(torch.randn(3, 3), 1.5)


@pytest.mark.parametrize("name", ["soft_cap", "hard_cap", "orthogonalize"])
def test_bf16_products_keep_the_weight_precision(name):
    op = {"soft_cap": lambda W, **k: C.soft_cap(W, 0.3, **k), "hard_cap": C.hard_cap, "orthogonalize": C.orthogonalize}
    W = with_spectrum(spectrum(24, hi=1.2), 24, 40, dtype=torch.float32)
    ref = op[name](W.double())
    Y = op[name](W, matmul_dtype=torch.bfloat16)
    assert Y.dtype == torch.float32
    err = (Y.double() - ref).abs().max().item()
    assert err < 0.03
    if name != "orthogonalize":  # only the correction term is rounded: better than computing in bf16
        all_bf16 = (op[name](W, dtype=torch.bfloat16).double() - ref).abs().max().item()
        assert err < 0.5 * all_bf16


@pytest.mark.parametrize("top", [5.0, 80.0])
def test_hard_cap_polynomial_survives_spectra_beyond_its_range(top):
    # The polynomial alone turns sigma = 5 into garbage (and diverges further out); hard_cap scales
    # such matrices into range first, so the result is finite and capped at the polynomial's peak.
    assert not abs(C.hard_cap_polynomial(torch.tensor(top, dtype=torch.float64)).item() - 1.0) < 0.02
    W = with_spectrum(spectrum(16, hi=top), 16, 24, batch=(2,))
    Y = C.hard_cap(W, w_max=1.0)
    s = svals(Y)
    assert torch.isfinite(Y).all()
    assert s.max() <= 1.0109 + 1e-3
    assert s.max() >= 0.99  # the top direction still lands at the cap, not far below it
    assert torch.equal(W, with_spectrum(spectrum(16, hi=top), 16, 24, batch=(2,)))  # input untouched


# --------------------------------------------------------------------------------------------
# The hard-cap coefficients, pinned; every op finite for every finite input
# --------------------------------------------------------------------------------------------

# arXiv 2507.13338's four odd steps x <- x (a + b x^2 + c x^4), written out independently here.
PAPER_HARD_CAP = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)


def _paper_hard_cap(x: float) -> float:
    for a, b, c in PAPER_HARD_CAP:
        x = x * (a + b * x * x + c * x**4)
    return x


@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.5, 0.8, 1.0, 1.185, 1.5, 2.0, 2.7, 2.95])
def test_hard_cap_coefficients_are_pinned(sigma):
    """A change in the 3rd decimal of any coefficient moves these values by far more than 1e-6."""
    assert C.HARD_CAP_COEFFICIENTS == PAPER_HARD_CAP
    expected = _paper_hard_cap(sigma)
    assert float(C.hard_cap_polynomial(torch.tensor(sigma, dtype=torch.float64))) == pytest.approx(expected, abs=1e-6)
    # the matrix op maps a singular value sigma (times w_max) exactly so
    W = with_spectrum([2.0 * sigma, 0.1], 2, 3)
    assert float(svals(C.hard_cap(W, 2.0))[0]) == pytest.approx(2.0 * expected, abs=2e-6)


OPS = {  # name -> (op on W, bound on sigma(output) for a huge input, or None)
    "hard_cap": (lambda W: C.hard_cap(W, 1.0), 1.0109),
    "hard_cap_exact": (lambda W: C.hard_cap(W, 1.0, exact=True), 1.0 + 1e-5),
    "soft_cap": (lambda W: C.soft_cap(W, 0.1), C.soft_cap_polynomial((1 / 3 / 0.1) ** 0.5, 0.1) + 1e-5),  # its peak
    "spectral_normalize": (lambda W: C.spectral_normalize(W, 1.0, n_iter=30), 1.0 + 1e-3),
    "spectral_hammer": (lambda W: C.spectral_hammer(W, 1.0, n_iter=30), None),
    "spectral_weight_decay": (lambda W: C.spectral_weight_decay(W, 0.1, n_iter=30), None),
    "pure_svd": (lambda W: C.pure_svd(W, 1.0), 1.0 + 1e-5),
    "orthogonalize": (lambda W: C.orthogonalize(W), 1.21),
    "orthogonalize_exact": (lambda W: C.orthogonalize(W, exact=True), 1.0 + 1e-5),
}


@pytest.mark.parametrize("scale", [1e30, 1e20, 1e-30, 0.0])
@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_is_finite_for_huge_tiny_and_zero_inputs(name, scale):
    op, bound = OPS[name]
    g = torch.Generator().manual_seed(3)
    W = torch.randn(2, 24, 16, generator=g) * scale  # float32, sigma up to ~1e31
    Y = op(W)
    assert Y.dtype == torch.float32 and Y.shape == W.shape
    assert torch.isfinite(Y).all(), name
    s_out = svals(Y)
    if scale == 0.0:
        assert torch.equal(Y, torch.zeros_like(Y))
    elif scale > 1 and bound is not None:
        assert float(s_out.max()) <= bound, (name, float(s_out.max()))
    elif scale < 1:
        if name.startswith("orthogonalize"):  # scale-free: singular values near 1 whatever the input
            assert 0.5 < float(s_out.max()) <= 1.21
        else:  # far inside every cap: (nearly) unchanged, in particular not blown up
            assert float(s_out.max()) <= float(svals(W).max()) * 1.001


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_power_iterate_on_huge_and_tiny_matrices(scale):
    W = with_spectrum([3.0, 1.0, 0.5, 0.2], 5, 4, dtype=torch.float32) * scale
    _, sigma, _ = C.power_iterate(W, 30)
    assert torch.isfinite(sigma)
    if scale > 1:
        assert float(sigma) == pytest.approx(3.0 * scale, rel=1e-4, abs=0)
    else:  # norms below eps (1e-12) keep the previous vector: a lower bound (0), never NaN
        assert 0.0 <= float(sigma) <= 3.0 * scale * (1 + 1e-4)


def test_soft_cap_guards_spectra_beyond_its_range():
    alpha = 0.1  # f(sigma) = 0 at 1/sqrt(alpha) ≈ 3.16, negative and diverging beyond
    s = torch.tensor([40.0, 8.0, 3.0, 1.0], dtype=torch.float64)
    W = with_spectrum(s, 6, 4)
    Y = C.soft_cap(W, alpha)
    peak = float(C.soft_cap_polynomial(torch.tensor((1 / 3 / alpha) ** 0.5, dtype=torch.float64), alpha))
    assert torch.isfinite(Y).all() and float(svals(Y).max()) <= peak * (1 + 1e-9)
    # in range, the polynomial itself (the guard does nothing)
    W2 = with_spectrum(torch.tensor([3.0, 1.0, 0.5, 0.1], dtype=torch.float64), 6, 4)
    expected = C.soft_cap_polynomial(svals(W2), alpha).abs().sort(descending=True).values
    torch.testing.assert_close(svals(C.soft_cap(W2, alpha)), expected, rtol=0, atol=1e-10)
    # an explicit limit (the coupling's k): the top singular value is scaled to it first
    Y3 = C.soft_cap(W, alpha, limit=1.2)
    assert float(svals(Y3).max()) == pytest.approx(float(C.soft_cap_polynomial(torch.tensor(1.2), alpha)), rel=1e-3)
    with pytest.raises(ValueError, match="limit"):
        C.soft_cap(W, alpha, limit=0.0)


def test_exact_hard_cap_returns_a_matrix_inside_unchanged_and_handles_huge_ranges():
    W = with_spectrum([0.9, 0.5, 0.1], 3, 5, dtype=torch.float32)
    assert torch.equal(C.hard_cap(W, 1.0, exact=True), W)
    # one direction 1e7 times the cap next to directions below it (a huge update on a capped
    # weight). In float32 one eigh pass leaves an error of about eps * 1e7 ≈ 1 (the input's own
    # rounding is that large: its small singular values are not even defined to that accuracy);
    # the passes still bring every singular value under the cap.
    W = with_spectrum([1e7, 0.8, 0.3], 3, 5, dtype=torch.float32)
    assert float(svals(C.hard_cap(W, 1.0, exact=True)).max()) <= 1.0 + 1e-5
    W = with_spectrum([1e7, 0.8, 0.3], 3, 5)  # float64: exact
    s = svals(C.hard_cap(W, 1.0, exact=True))
    torch.testing.assert_close(s, torch.tensor([1.0, 0.8, 0.3], dtype=torch.float64), rtol=0, atol=1e-7)
