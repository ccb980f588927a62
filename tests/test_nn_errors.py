"""Bad input raises ValueError/TypeError naming the module path and parameter, and leaves the model
exactly as it was (class, __dict__ keys, parameters, buffers, state_dict)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import fx_spectral
from fx_spectral import apply_spectral_norm, remove_spectral_norm, spectral_norm, spectral_sigma


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.mat = nn.Parameter(torch.randn(4, 3))
        self.ints = nn.Parameter(torch.ones(3, 3, dtype=torch.int64), requires_grad=False)
        self.cplx = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
        self.vec = nn.Parameter(torch.randn(3))
        self.register_buffer("buf", torch.randn(3, 3))

    def forward(self, x):
        return x @ self.mat.t()


def expect_error(module, exc, *fragments, fn=spectral_norm, snapshot_pair=None, **kwargs):
    """Call fn(module, **kwargs), check the error type and that each fragment is in the message."""
    take, check = snapshot_pair
    before = take(module)
    with pytest.raises(exc) as info:
        fn(module, **kwargs)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in error message {msg!r}"
    check(before, take(module))
    return msg


@pytest.mark.parametrize("name,exc,what", [
    ("wieght", ValueError, "no parameter"),
    ("ints", TypeError, "torch.int64"),
    ("cplx", TypeError, "torch.complex64"),
    ("vec", ValueError, "(3,)"),
    ("buf", ValueError, "no parameter"),
])
def test_bad_parameter(module_snapshot, name, exc, what):
    msg = expect_error(Custom(), exc, "Custom", repr(name), what, name=name, snapshot_pair=module_snapshot)
    assert len(msg) > 40


@pytest.mark.parametrize("factory,name", [
    (lambda: nn.Linear(3, 4), "bias"),
    (lambda: nn.Conv2d(3, 4, 3), "bias"),
    (lambda: nn.LayerNorm(4), "weight"),
    (lambda: nn.Embedding(5, 3), "wieght"),
])
def test_bad_parameter_builtin_modules(module_snapshot, factory, name):
    m = factory()
    expect_error(m, ValueError, type(m).__name__, repr(name), name=name, snapshot_pair=module_snapshot)


@pytest.mark.parametrize("factory,dim", [
    (lambda: nn.Linear(3, 4), 2),
    (lambda: nn.Linear(3, 4), -3),
    (lambda: nn.Conv2d(3, 4, 3), 4),
    (lambda: nn.ConvTranspose3d(3, 4, 3), -6),
    (lambda: nn.LazyConv1d(4, 3), 3),
    (lambda: nn.LazyLinear(4), 2),
])
def test_dim_out_of_range(module_snapshot, factory, dim):
    m = factory()
    msg = expect_error(m, ValueError, type(m).__name__, "'weight'", str(dim), dim=dim, snapshot_pair=module_snapshot)
    assert "range" in msg


@pytest.mark.parametrize("kwargs,exc,fragment", [
    (dict(n_power_iterations=0), ValueError, "n_power_iterations"),
    (dict(n_power_iterations=-2), ValueError, "-2"),
    (dict(n_power_iterations=1.5), TypeError, "1.5"),
    (dict(n_power_iterations=True), TypeError, "n_power_iterations"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1e-3), ValueError, "-0.001"),
    (dict(eps=float("nan")), ValueError, "nan"),
    (dict(eps="1e-12"), TypeError, "eps"),
    (dict(dim=1.0), TypeError, "dim"),
    (dict(name=3), TypeError, "3"),
    (dict(name=("weight", "weight")), ValueError, "twice"),
    (dict(name=()), TypeError, "name"),
])
def test_bad_options(module_snapshot, kwargs, exc, fragment):
    expect_error(nn.Linear(3, 4), exc, "Linear", fragment, snapshot_pair=module_snapshot, **kwargs)


@pytest.mark.parametrize("factory", [lambda: nn.Linear(3, 4), lambda: nn.LazyConvTranspose2d(4, 3), Custom])
def test_normalizing_twice(module_snapshot, factory):
    m = factory()
    name = "mat" if isinstance(m, Custom) else "weight"
    spectral_norm(m, name)
    msg = expect_error(m, ValueError, repr(name), "already", name=name, snapshot_pair=module_snapshot)
    assert type(m)._sn_base.__name__ in msg or type(m).__name__ in msg
    # also inside a tuple, after a valid first name
    if isinstance(m, Custom):
        extra = nn.Parameter(torch.randn(2, 2))
        m.register_parameter("other", extra)
        expect_error(m, ValueError, "'mat'", name=("other", "mat"), snapshot_pair=module_snapshot)
        assert not fx_spectral.is_spectral_normalized(m, "other")


def test_tuple_with_bad_name_last_changes_nothing(module_snapshot):
    m = Custom()
    expect_error(m, TypeError, "'ints'", name=("mat", "ints"), snapshot_pair=module_snapshot)
    assert not fx_spectral.is_spectral_normalized(m, "mat")
    assert type(m) is Custom


def test_existing_attribute_named_like_uv(module_snapshot):
    """A module that already has an attribute `{name}_u`/`{name}_v` cannot take the buffers."""
    m = Custom()
    m.mat_v = 5  # plain attribute in the way of the second buffer
    take, check = module_snapshot
    before = take(m)
    with pytest.raises((ValueError, TypeError)) as info:
        spectral_norm(m, "mat")
    assert "mat_v" in str(info.value) and "Custom" in str(info.value)
    check(before, take(m))


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        spectral_norm(torch.randn(3, 3))


# ---------------------------------------------------------------------------- apply_spectral_norm


def _model():
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.Sequential(nn.Conv1d(1, 2, 3), nn.Embedding(5, 3)),
        nn.ModuleDict({"head": nn.Linear(8, 3), "norm": nn.LayerNorm(3)}),
        nn.LazyLinear(2),
    )


def test_apply_bad_module_midway_changes_nothing(module_snapshot):
    model = _model()
    # an integer weight in the middle of the model: the earlier Linear/Conv1d must stay untouched
    model[2]["head"].weight = nn.Parameter(torch.ones(3, 8, dtype=torch.int32), requires_grad=False)
    msg = expect_error(model, TypeError, "2.head.weight", "torch.int32", fn=apply_spectral_norm,
                       snapshot_pair=module_snapshot)
    assert "'weight'" in msg
    assert not any(fx_spectral.is_spectral_normalized(m) for m in model.modules())


def test_apply_torch_parametrized_module_midway(module_snapshot):
    model = _model()
    torch_spectral_norm(model[1][0])  # already normalized by torch: no plain `weight` parameter
    expect_error(model, ValueError, "1.0.weight", "'weight'", fn=apply_spectral_norm, snapshot_pair=module_snapshot)


def test_apply_bad_name_tuple_midway(module_snapshot):
    model = _model()
    # every module has a 1-D bias; the Lazy one cannot defer a bias: fails on the first module
    expect_error(model, ValueError, "0.bias", "(8,)", fn=apply_spectral_norm, name=("weight", "bias"),
                 snapshot_pair=module_snapshot)
    # filter to reach the Lazy module only after a valid one
    expect_error(model, ValueError, "3.bias", "uninitialized", fn=apply_spectral_norm, name=("weight", "bias"),
                 filter_fn=lambda m, fqn: fqn == "3", snapshot_pair=module_snapshot)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(n_power_iterations=0), ValueError),
    (dict(eps=0), ValueError),
    (dict(eps=None), TypeError),
    (dict(name=None), TypeError),
])
def test_apply_bad_options(module_snapshot, kwargs, exc):
    expect_error(_model(), exc, "apply_spectral_norm", fn=apply_spectral_norm, snapshot_pair=module_snapshot, **kwargs)


def test_apply_partially_normalized_model_then_bad_option_keeps_earlier_state(module_snapshot):
    model = _model()
    spectral_norm(model[0])
    model[2]["head"].weight = nn.Parameter(torch.ones(3, 8, dtype=torch.int8), requires_grad=False)
    expect_error(model, TypeError, "2.head.weight", fn=apply_spectral_norm, snapshot_pair=module_snapshot)
    assert fx_spectral.is_spectral_normalized(model[0])


# ---------------------------------------------------------------------------- remove / sigma


def test_remove_not_normalized(module_snapshot):
    m = nn.Linear(3, 4)
    expect_error(m, ValueError, "'weight'", "not spectral-normalized", fn=remove_spectral_norm,
                 snapshot_pair=module_snapshot)
    spectral_norm(m)
    expect_error(m, ValueError, "'bias'", fn=remove_spectral_norm, name=("weight", "bias"),
                 snapshot_pair=module_snapshot)
    assert fx_spectral.is_spectral_normalized(m)


def test_sigma_errors():
    with pytest.raises(ValueError, match=re.escape("'weight'")):
        spectral_sigma(nn.Linear(3, 4))
    lazy = spectral_norm(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="has not run"):
        spectral_sigma(lazy)
