"""fx_spectral.coupling: the coupling math in one place, and its old names still importable."""

from __future__ import annotations

import pytest
import torch

from fx_spectral import coupling
from fx_spectral import methods as K
from fx_spectral import projections as C

MUON_GROUP = {"lr": 0.02, "weight_decay": 0.1, "ns_coefficients": (3.4445, -4.7750, 2.0315), "ns_steps": 5,
              "adjust_lr_fn": None}


def test_old_homes_give_the_same_objects():
    assert C.soft_cap_coupling is coupling.soft_cap_coupling
    assert K.muon_update_norm is coupling.muon_update_norm
    assert K.MUON_SAFETY == coupling.MUON_SAFETY
    assert K._decay is coupling.decay and K._is_muon_group is coupling.is_muon_group
    assert K._ns_peak is coupling.ns_peak and K._muon_lr_ratio is coupling.muon_lr_ratio
    assert K._Method is K.Method and K._method_config is K.method_config


def test_muon_group_terms():
    assert coupling.is_muon_group(MUON_GROUP) and not coupling.is_muon_group({"lr": 0.1, "weight_decay": 0.1})
    assert coupling.decay(MUON_GROUP) == pytest.approx(0.002)
    assert coupling.decay({"lr": 0.1, "weight_decay": 0.1}) == 0.0  # not Muon: no decay assumed (the safe side)
    assert coupling.ns_peak(tuple(MUON_GROUP["ns_coefficients"]), 5) == pytest.approx(1.2024, abs=1e-4)
    eta = coupling.muon_update_norm(MUON_GROUP, torch.Size([64, 128]))  # wide: Muon's ratio is 1
    assert eta == pytest.approx(0.02 * coupling.ns_peak((3.4445, -4.7750, 2.0315), 5) * coupling.MUON_SAFETY)


@pytest.mark.parametrize("wd, eta", [(0.0, 0.05), (0.002, 0.0245), (0.0, 0.5)])
def test_coupled_soft_cap_keeps_the_post_step_bound_under_w_max(wd, eta):
    k = coupling.post_step_bound(1.0, wd, eta)
    alpha = coupling.soft_cap_coupling(1.0, wd, eta)
    assert coupling.cached_soft_cap_coupling(1.0, wd, eta) == alpha
    sigma = torch.linspace(0, k, 100_001, dtype=torch.float64)
    assert float(C.soft_cap_polynomial(sigma, alpha).max()) <= 1.0 + 1e-12
