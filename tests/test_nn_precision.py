"""Precision: u/v/sigma in float32 for fp16/bf16 weights and under CPU autocast; float64 gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_spectral
from fx_spectral.nn import normalize_weight, spectral_norm, weight_matrix


def ref_power_iteration(w_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n: int):
    """Plain float32 (or float64) power iteration, torch's order."""
    for _ in range(n):
        u = F.normalize(torch.mv(w_mat, v), dim=0)
        v = F.normalize(torch.mv(w_mat.t(), u), dim=0)
    return u, v


FACTORIES = {
    "linear": (lambda: nn.Linear(48, 32), (4, 48)),
    "conv2d": (lambda: nn.Conv2d(8, 16, 3, stride=2), (2, 8, 9, 9)),
    "convT2d": (lambda: nn.ConvTranspose2d(16, 8, 3, groups=2), (2, 16, 5, 5)),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_low_precision_weights_update_uv_in_float32(kind, dtype):
    factory, shape = FACTORIES[kind]
    m = spectral_norm(factory(), n_power_iterations=2).to(dtype)
    assert m.weight.dtype == dtype and m.weight_u.dtype == torch.float32 and m.weight_v.dtype == torch.float32
    dim = m._sn_params["weight"].dim
    for _ in range(3):
        u0, v0 = m.weight_u.clone(), m.weight_v.clone()
        x = torch.randn(shape, dtype=dtype)
        y = m(x)
        assert y.dtype == dtype
        u_ref, v_ref = ref_power_iteration(weight_matrix(m.weight.detach().float(), dim), u0, v0, 2)
        torch.testing.assert_close(m.weight_u, u_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.weight_v, v_ref, atol=1e-5, rtol=0)
        y.float().square().mean().backward()
        assert m.weight.grad.dtype == dtype and torch.isfinite(m.weight.grad).all()
        with torch.no_grad():
            m.weight.sub_(0.05 * m.weight.grad)
        m.weight.grad = None
    # the low-precision computation would be visibly different: the test can fail
    w_lp = weight_matrix(m.weight.detach(), dim)
    u_lp = F.normalize(torch.mv(w_lp, m.weight_v.to(dtype)).float(), dim=0)
    assert not torch.allclose(u_lp, F.normalize(torch.mv(w_lp.float(), m.weight_v), dim=0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_normalized_weight_is_fp32_division_cast_back(dtype):
    w = (torch.randn(32, 24) * 3).to(dtype).requires_grad_()
    u = F.normalize(torch.randn(32), dim=0)
    v = F.normalize(torch.randn(24), dim=0)
    u_ref, v_ref = ref_power_iteration(w.detach().float(), u.clone(), v.clone(), 1)
    out = normalize_weight(w, u, v)
    assert out.dtype == dtype and u.dtype == torch.float32
    sigma32 = torch.dot(u_ref, w.detach().float() @ v_ref)
    torch.testing.assert_close(out, (w.detach().float() / sigma32).to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(u, u_ref, atol=1e-5, rtol=0)
    # gradient: the float32 formula cast back to the weight dtype
    g = torch.randn(32, 24)
    out.backward(g.to(dtype))
    w32 = w.detach().float().requires_grad_()
    (w32 / torch.dot(u_ref, w32 @ v_ref)).backward(g.to(dtype).float())
    torch.testing.assert_close(w.grad.float(), w32.grad, atol=2e-2 if dtype == torch.bfloat16 else 2e-3, rtol=1e-2)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_fp32_weights_under_cpu_autocast(kind):
    factory, shape = FACTORIES[kind]
    m = spectral_norm(factory(), n_power_iterations=3)
    dim = m._sn_params["weight"].dim
    for _ in range(2):
        u0, v0 = m.weight_u.clone(), m.weight_v.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(torch.randn(shape))
            w_bar = normalize_weight(m.weight, m.weight_u.clone(), m.weight_v.clone(), dim=dim, training=False)
        assert y.dtype == torch.bfloat16, "the op itself still runs under autocast"
        assert w_bar.dtype == torch.float32, "the normalized weight keeps the weight dtype"
        u_ref, v_ref = ref_power_iteration(weight_matrix(m.weight.detach(), dim), u0, v0, 3)
        torch.testing.assert_close(m.weight_u, u_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.weight_v, v_ref, atol=1e-5, rtol=0)
        assert m.weight_u.dtype == torch.float32
        y.float().mean().backward()
        assert m.weight.grad.dtype == torch.float32
    # same numbers as without autocast
    m.eval()
    sigma = fx_spectral.spectral_sigma(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sigma_ac = fx_spectral.spectral_sigma(m)
    assert sigma_ac.dtype == torch.float32
    torch.testing.assert_close(sigma_ac, sigma, atol=0, rtol=1e-6)


def test_fp16_sigma_is_float32_estimate_of_true_norm():
    """DESIGN §3: an fp16 estimate drifts (0.632 vs 0.642); ours is float32 and converges."""
    m = spectral_norm(nn.Linear(64, 64), n_power_iterations=100).half()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(2, 64, dtype=torch.float16))
    exact = torch.linalg.matrix_norm(m.weight.double(), ord=2)
    sigma = fx_spectral.spectral_sigma(m)
    assert sigma.dtype == torch.float32
    torch.testing.assert_close(sigma.double(), exact, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("shape,dim", [((5, 4), 0), ((3, 2, 3), 0), ((4, 3, 2, 2), 1), ((2, 3, 2), 2), ((3, 5), -1)])
def test_gradcheck_normalize_weight_float64(shape, dim):
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w_mat = weight_matrix(w.detach(), dim % len(shape))
    u, v = ref_power_iteration(w_mat, F.normalize(torch.randn(w_mat.shape[0], dtype=torch.float64), dim=0),
                               F.normalize(torch.randn(w_mat.shape[1], dtype=torch.float64), dim=0), 30)
    # u/v are float32 buffers: held fixed (training=False)
    u32, v32 = u.float(), v.float()
    fn = lambda w: normalize_weight(w, u32, v32, dim=dim % len(shape), training=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w,))
    # the gradient flows through sigma: it differs from the "sigma is a constant" gradient
    g = torch.randn(shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(fn(w), w, g)
    sigma = torch.dot(u32.double(), weight_matrix(w.detach(), dim % len(shape)) @ v32.double())
    assert not torch.allclose(grad, g / sigma, atol=1e-6)
    # and equals autograd through the plain formula
    w2 = w.detach().clone().requires_grad_()
    (w2 / torch.dot(u32.double(), weight_matrix(w2, dim % len(shape)) @ v32.double())).backward(g)
    torch.testing.assert_close(grad, w2.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("factory,shape", [
    (lambda: nn.Linear(4, 3), (2, 4)),
    (lambda: nn.Conv1d(2, 4, 3, groups=2, stride=2), (1, 2, 7)),
    (lambda: nn.ConvTranspose2d(2, 3, 2, stride=2), (1, 2, 2, 2)),
], ids=["linear", "conv1d", "convT2d"])
def test_gradcheck_module_forward_eval_float64(factory, shape):
    m = spectral_norm(factory()).double()
    assert m.weight_u.dtype == torch.float32
    m.eval()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = m.weight
    u = m.weight_u.clone()

    def fn(x, w):
        return torch.func.functional_call(m, {"weight": w}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.equal(m.weight_u, u)
    # functional_call really feeds w in (the test would pass vacuously otherwise)
    assert not torch.allclose(fn(x, w + torch.randn_like(w)), fn(x, w))
