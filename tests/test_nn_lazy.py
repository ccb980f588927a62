"""Lazy modules: the seven Lazy variants against their materialized twins, apply_spectral_norm on a
model that has never run, state_dict keys before/after the first forward, loading into an un-run model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

import fx_spectral
from fx_spectral.nn import spectral_norm, weight_matrix

TOL = dict(atol=1e-6, rtol=1e-6)

# (id, lazy factory, eager twin factory, input shape)
CASES = [
    ("linear", lambda: nn.LazyLinear(5), lambda: nn.Linear(7, 5), (3, 7)),
    ("conv1d", lambda: nn.LazyConv1d(6, 3, stride=2, groups=2),
     lambda: nn.Conv1d(4, 6, 3, stride=2, groups=2), (2, 4, 9)),
    ("conv2d", lambda: nn.LazyConv2d(4, 3, padding=1), lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
    ("conv3d", lambda: nn.LazyConv3d(3, 2, bias=False), lambda: nn.Conv3d(2, 3, 2, bias=False), (1, 2, 4, 4, 4)),
    ("convT1d", lambda: nn.LazyConvTranspose1d(3, 3, stride=2),
     lambda: nn.ConvTranspose1d(4, 3, 3, stride=2), (2, 4, 5)),
    ("convT2d", lambda: nn.LazyConvTranspose2d(6, 3, groups=2, stride=2),
     lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2), (2, 4, 4, 4)),
    ("convT3d", lambda: nn.LazyConvTranspose3d(2, 2), lambda: nn.ConvTranspose3d(3, 2, 2), (1, 3, 3, 3, 3)),
]
IDS = [c[0] for c in CASES]


def _train_steps(m, shape, steps=3):
    """Outputs, grads and u/v over a few SGD steps, then one eval output (same inputs for twins)."""
    gen = torch.Generator().manual_seed(7)
    opt = None
    trace = []
    for _ in range(steps):
        x = torch.randn(shape, generator=gen)
        y = m(x)
        if opt is None:
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
        y.square().mean().backward()
        trace.append((y.detach(), m.weight.grad.clone(), m.weight_u.clone(), m.weight_v.clone()))
        opt.step()
        opt.zero_grad()
    m.eval()
    trace.append((m(torch.randn(shape, generator=gen)).detach(),))
    return trace


@pytest.mark.parametrize("lazy,eager,shape", [c[1:] for c in CASES], ids=IDS)
def test_lazy_matches_materialized_twin_same_seed(lazy, eager, shape):
    """Same seed: a Lazy module normalized before its first forward equals the eager module
    normalized at construction (same weights, same u/v draws), step by step."""
    torch.manual_seed(3)
    lz = spectral_norm(lazy())
    assert is_lazy(lz.weight) and is_lazy(lz.weight_u) and fx_spectral.is_spectral_normalized(lz)
    first = lz(torch.zeros(shape))  # materializes weight, then u/v
    assert not is_lazy(lz.weight_u) and lz.weight_u.dtype == torch.float32
    assert not isinstance(lz, LazyModuleMixin), "becomes its cls_to_become"
    assert type(lz)._sn_base is type(eager()) and isinstance(lz, type(eager()))
    torch.manual_seed(3)
    tw = spectral_norm(eager())
    tw(torch.zeros(shape))
    for k, v in tw.state_dict().items():
        torch.testing.assert_close(lz.state_dict()[k], v, atol=0, rtol=0, msg=k)
    assert list(lz.state_dict()) == list(tw.state_dict())
    assert first.shape == tw(torch.zeros(shape)).shape
    tw.weight_u.copy_(lz.weight_u), tw.weight_v.copy_(lz.weight_v)
    for a, b in zip(_train_steps(lz, shape), _train_steps(tw, shape)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("lazy,eager,shape", [c[1:] for c in CASES], ids=IDS)
def test_lazy_matches_twin_with_copied_state(lazy, eager, shape):
    """Copied weights and u/v after the lazy module's first forward -> identical training."""
    lz = spectral_norm(lazy(), n_power_iterations=2)
    lz.eval()
    lz(torch.randn(shape))  # eval: materializes, no update
    tw = spectral_norm(eager(), n_power_iterations=2)
    tw.load_state_dict(lz.state_dict())
    lz.train(), tw.train()
    assert tw._sn_params == lz._sn_params
    for a, b in zip(_train_steps(lz, shape), _train_steps(tw, shape)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("lazy,eager,shape", [c[1:] for c in CASES], ids=IDS)
def test_lazy_uv_initialized_from_materialized_weight(lazy, eager, shape):
    """u/v of a Lazy module are real warm-up estimates for its materialized weight."""
    lz = spectral_norm(lazy(), n_power_iterations=200)
    lz(torch.randn(shape))
    dim = lz._sn_params["weight"].dim
    w_mat = weight_matrix(lz.weight.detach().double(), dim)
    torch.testing.assert_close(fx_spectral.spectral_sigma(lz).double(), torch.linalg.matrix_norm(w_mat, ord=2),
                               rtol=1e-4, atol=0)


def _lazy_model():
    return nn.Sequential(
        nn.LazyConv2d(4, 3, stride=2), nn.ReLU(), nn.LazyConvTranspose2d(3, 2), nn.Flatten(),
        nn.LayerNorm(48), nn.LazyLinear(6),
    )


def test_apply_spectral_norm_on_never_run_model():
    model = _lazy_model()
    done = fx_spectral.apply_spectral_norm(model)
    assert done == ["0.weight", "2.weight", "5.weight"]
    assert not fx_spectral.is_spectral_normalized(model[4])
    keys_before = list(model.state_dict())
    assert keys_before == [
        "0.weight", "0.bias", "0.weight_u", "0.weight_v", "2.weight", "2.bias", "2.weight_u", "2.weight_v",
        "4.weight", "4.bias", "5.weight", "5.bias", "5.weight_u", "5.weight_v",
    ]
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    assert y.shape == (2, 6) and torch.isfinite(y).all()
    assert list(model.state_dict()) == keys_before, "state_dict keys must not change at the first forward"
    for i in (0, 2, 5):
        assert model[i].weight_u.dtype == torch.float32 and not is_lazy(model[i].weight_u)
        assert not isinstance(model[i], LazyModuleMixin)
    assert model[2]._sn_params["weight"].dim == 1
    # applying again skips everything, and the model still trains
    assert fx_spectral.apply_spectral_norm(model) == []
    y.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_load_state_dict_into_unrun_lazy_model():
    src = _lazy_model()
    fx_spectral.apply_spectral_norm(src)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        src(x)
    dst = _lazy_model()
    fx_spectral.apply_spectral_norm(dst)
    dst.load_state_dict(src.state_dict(), strict=True)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, atol=0, rtol=0, msg=k)
    # the loaded u/v are kept at the first forward (not re-initialized)
    y_dst, y_src = dst(x), src(x)
    torch.testing.assert_close(y_dst, y_src, **TOL)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, **TOL, msg=k)
    src.eval(), dst.eval()
    torch.testing.assert_close(dst(x), src(x), **TOL)


def test_lazy_to_dtype_before_first_forward_keeps_uv_float32():
    m = spectral_norm(nn.LazyLinear(4)).to(torch.float64)
    y = m(torch.randn(2, 3, dtype=torch.float64))
    assert y.dtype == torch.float64 and m.weight.dtype == torch.float64
    assert m.weight_u.dtype == torch.float32 and m.weight_v.dtype == torch.float32


def test_remove_from_unrun_lazy_module():
    m = spectral_norm(nn.LazyLinear(4))
    fx_spectral.remove_spectral_norm(m)
    assert type(m) is nn.LazyLinear and "weight_u" not in m._buffers
    m(torch.randn(2, 3))
    assert type(m) is nn.Linear


def test_deepcopy_and_save_unrun_lazy_module(tmp_path):
    """An un-run lazy model can be copied (e.g. an EMA generator) and saved, and each copy initializes on its own."""
    m = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.LazyLinear(2))
    fx_spectral.apply_spectral_norm(m)
    c = copy.deepcopy(m)
    torch.save(m, tmp_path / "m.pt")
    s = torch.load(tmp_path / "m.pt", weights_only=False)
    for mod in (m, c, s):
        assert mod(torch.randn(3, 5)).shape == (3, 2)
        assert type(mod[0])._sn_base is nn.Linear and not is_lazy(mod[0].weight_u)
    assert c[0].weight is not m[0].weight and c[0].weight_u is not m[0].weight_u
