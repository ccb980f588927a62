"""Hypothesis property tests over module kinds, shapes, kernel sizes, strides, groups and dtypes."""

from __future__ import annotations

import copy

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from fx_spectral.nn import normalize_weight, spectral_norm, spectral_sigma, weight_matrix

KINDS = {
    "linear": (nn.Linear, 0),
    "conv1d": (nn.Conv1d, 1), "conv2d": (nn.Conv2d, 2), "conv3d": (nn.Conv3d, 3),
    "convT1d": (nn.ConvTranspose1d, 1), "convT2d": (nn.ConvTranspose2d, 2), "convT3d": (nn.ConvTranspose3d, 3),
}


@st.composite
def modules(draw):
    """(module, input shape) for a random supported module configuration."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    cls, nd = KINDS[kind]
    batch = draw(st.integers(1, 2))
    if nd == 0:
        fin, fout = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        return cls(fin, fout, bias=draw(st.booleans())), (batch, fin)
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd)) if nd > 1 and draw(st.booleans()) else draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    m = cls(cin, cout, k, stride=stride, groups=groups, dilation=dilation, bias=draw(st.booleans()))
    ks = m.kernel_size
    spatial = tuple(dilation * (kk - 1) + 1 + draw(st.integers(0, 3)) for kk in ks)
    return m, (batch, cin, *spatial)


def _torch_uv(ref):
    sn = ref.parametrizations.weight[0]
    return sn._u, sn._v


@given(modules(), st.sampled_from([torch.float32, torch.float64]), st.integers(1, 3))
def test_matches_torch_for_the_same_uv(case, dtype, n_iter):
    base, shape = case
    base = base.to(dtype)
    ref = torch_spectral_norm(copy.deepcopy(base), n_power_iterations=n_iter)
    ours = spectral_norm(copy.deepcopy(base), n_power_iterations=n_iter)
    assert ours.weight_u.dtype == torch.float32
    u, v = _torch_uv(ref)
    # float32 buffers: start both from the same (float32-representable) vectors
    with torch.no_grad():
        u.copy_(u.float()), v.copy_(v.float())
        ours.weight_u.copy_(u), ours.weight_v.copy_(v)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-6, rtol=1e-6)
    for _ in range(2):
        x = torch.randn(shape, dtype=dtype)
        y_ref, y_ours = ref(x), ours(x)
        assert y_ours.dtype == dtype
        torch.testing.assert_close(y_ours, y_ref, **tol)
        u, v = _torch_uv(ref)
        torch.testing.assert_close(ours.weight_u, u.float(), **tol)
        torch.testing.assert_close(ours.weight_v, v.float(), **tol)
        g = torch.randn_like(y_ref)
        y_ref.backward(g), y_ours.backward(g)
        torch.testing.assert_close(ours.weight.grad, ref.parametrizations.weight.original.grad, **tol)
        ref.zero_grad(), ours.zero_grad()
    ref.eval(), ours.eval()
    x = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(ours(x), ref(x), **tol)


@given(modules(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_normalized_weight_has_unit_spectral_norm(case, dtype):
    m, shape = case
    spectral_norm(m, n_power_iterations=300).to(dtype)
    assert m.weight_u.dtype == torch.float32 and m.weight_v.dtype == torch.float32
    y = m(torch.randn(shape, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    dim = m._sn_params["weight"].dim
    w64 = weight_matrix(m.weight.detach().double(), dim)
    exact = torch.linalg.matrix_norm(w64, ord=2).item()
    sigma = spectral_sigma(m).item()
    # the estimate u^T W v never exceeds the true norm, and has converged to it
    assert sigma <= exact * (1 + 1e-5) + 1e-7
    assert sigma >= exact * (1 - 1e-4)
    w_bar = normalize_weight(m.weight.detach(), m.weight_u, m.weight_v, dim=dim, training=False)
    assert w_bar.dtype == dtype
    got = torch.linalg.matrix_norm(weight_matrix(w_bar.double(), dim), ord=2).item()
    rtol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert abs(got - 1) <= rtol, (got, exact, sigma)


@given(
    st.lists(st.integers(1, 4), min_size=2, max_size=4),
    st.data(),
    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_normalize_weight_formula_and_gradient(shape, data, dtype):
    """Any >=2-D weight, any dim: eval output is W / (u^T W_mat v) and the gradient includes sigma's."""
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    w = torch.randn(shape, dtype=torch.float64)
    w_mat = weight_matrix(w, dim % len(shape))
    u = torch.nn.functional.normalize(torch.randn(w_mat.shape[0]), dim=0)
    v = torch.nn.functional.normalize(torch.randn(w_mat.shape[1]), dim=0)
    wl = w.to(dtype).requires_grad_()
    out = normalize_weight(wl, u, v, dim=dim % len(shape), training=False)
    assert out.dtype == dtype
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w_ref = wl.detach().to(cdtype).requires_grad_()
    sigma = torch.dot(u.to(cdtype), weight_matrix(w_ref, dim % len(shape)) @ v.to(cdtype))
    assume(abs(sigma.item()) >= 1e-2)  # sigma ~ 0 (stale random u/v) makes W/sigma meaningless
    ref = w_ref / sigma
    torch.testing.assert_close(out, ref.detach().to(dtype), atol=1e-6, rtol=1e-5 if dtype != torch.float64 else 1e-12)
    g = torch.randn(shape, dtype=cdtype)
    out.backward(g.to(dtype))
    ref.backward(g.to(dtype).to(cdtype))
    scale = w_ref.grad.abs().max().item() + 1
    atol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype] * scale
    torch.testing.assert_close(wl.grad.to(cdtype), w_ref.grad, atol=atol, rtol=0)
