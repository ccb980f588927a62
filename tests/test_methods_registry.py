"""The method registry (fx_spectral.methods.register / handles): what it refuses, what it derives."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import fx_spectral.methods as K
from fx_spectral import projections as C


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test vanish afterwards."""
    for name in ("_REGISTRY", "METHODS", "_HANDLERS"):
        monkeypatch.setattr(K, name, dict(getattr(K, name)))


def test_every_method_is_listed_once_everywhere():
    regs = list(K._REGISTRY.values())
    assert [r.name for r in regs] == list(K.METHODS)
    assert set(K._HANDLERS) == {r.config for r in regs}
    assert all(r.config.name == r.name for r in regs)
    assert {r.config.__name__ for r in regs} <= set(K.__all__)
    rank_one = {r.name for r in regs if r.kind == "rank_one"}
    assert rank_one == {"spectral_normalize", "spectral_hammer", "spectral_weight_decay"}
    assert all(r.rank_one_op is not None for r in regs if r.kind == "rank_one")


def test_rank_one_method_without_its_op_is_refused(scratch_registry):
    with pytest.raises(TypeError, match="rank_one_op"):

        @K.register("no_op", kind="rank_one")
        @dataclass(frozen=True, kw_only=True)
        class NoOp(K.SpectralNormalize):
            pass


def test_bad_kind_option_or_duplicate_is_refused(scratch_registry):
    with pytest.raises(ValueError, match="kind"):
        K.register("x", kind="low_rank")(dataclass(frozen=True, kw_only=True)(type("X", (K._Method,), {})))
    with pytest.raises(ValueError, match=r"options \['nope'\]"):
        K.register("y", kind="full_spectrum", options=("nope",))(
            dataclass(frozen=True, kw_only=True)(type("Y", (K._Method,), {}))
        )
    with pytest.raises(ValueError, match="already registered"):
        K.register("hard_cap", kind="full_spectrum")(dataclass(frozen=True, kw_only=True)(type("Z", (K._Method,), {})))


def test_an_unregistered_subclass_is_its_parents_method():
    """Dispatch walks the MRO: a subclass without its own registration projects as its parent."""

    @dataclass(frozen=True, kw_only=True)
    class MyNormalize(K.SpectralNormalize):
        pass

    assert K.registration(MyNormalize()).name == "spectral_normalize"
    X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 3
    ctx = K.ProjectionContext(w_max=1.0, seed=1)
    got = K.project_matrix(X, MyNormalize(exact=True), ctx, scale=1.0)
    ref = K.project_matrix(X, K.SpectralNormalize(exact=True), ctx, scale=1.0)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert float(torch.linalg.matrix_norm(got, ord=2)) == pytest.approx(1.0, rel=1e-5)


def test_a_registered_rank_one_method_is_projected_with_its_op(scratch_registry):
    @K.register(
        "half_normalize",
        kind="rank_one",
        rank_one_op=lambda X, cfg, w_max, est: C.spectral_normalize(X, w_max / 2, estimate=est),
    )
    @dataclass(frozen=True, kw_only=True)
    class HalfNormalize(K._Method):
        n_iter: int = 1
        exact: bool = False

    assert K.METHODS["half_normalize"] is HalfNormalize
    X = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)) * 4
    Y = K.project_matrix(X, dataclasses.replace(HalfNormalize(), exact=True), K.ProjectionContext(w_max=2.0), scale=1.0)
    assert float(torch.linalg.matrix_norm(Y, ord=2)) == pytest.approx(1.0, rel=1e-5)


def test_torchtitan_section_is_derived_from_the_registry():
    pytest.importorskip("torchtitan")
    from fx_spectral.integrations.torchtitan import config as T

    assert T.METHOD_NAMES == tuple(K.METHODS)
    for name, cls in K.METHODS.items():
        options = T.SpectralConfig(method=name).method_options()
        assert set(options) == set(K.registration(cls).options) <= {f.name for f in dataclasses.fields(cls)}
        cls(**options)  # every option is accepted by the config
    # the section's exact=True is for the caps: the rank-one methods never receive it
    assert T.SpectralConfig(method="spectral_normalize").method_options() == {"n_iter": 1}
