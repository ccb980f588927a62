"""Renames for one release: the old class names warn and are the same class; constrain's filter_fn
moves its second argument to the module fqn without changing any selection silently."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from torch import nn

import fx_spectral
import fx_spectral.graph as G


@pytest.mark.parametrize(
    "module, old, new",
    [
        ("fx_spectral.graph", "SpectralConfig", "TransformConfig"),
        ("fx_spectral.graph", "SpectralBackendConfig", "BackendConfig"),
        ("fx_spectral.graph.tracing", "SpectralConfig", "TransformConfig"),
        ("fx_spectral.graph.backend", "SpectralBackendConfig", "BackendConfig"),
    ],
)
def test_old_config_names_warn_and_are_the_same_class(module, old, new):
    importlib.import_module(module)
    mod = sys.modules[module]  # fx_spectral.graph.tracing, the module
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated: use .*{new}"):
        alias = getattr(mod, old)
    assert alias is getattr(mod, new)
    assert alias is getattr(G, new) and alias.__name__ == new


def test_new_names_do_not_warn(recwarn):
    assert G.TransformConfig is sys.modules["fx_spectral.graph.tracing"].TransformConfig
    assert G.BackendConfig is importlib.import_module("fx_spectral.graph.backend").BackendConfig
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    with pytest.raises(AttributeError, match="no_such_name"):
        G.no_such_name  # noqa: B018


def test_torchtitan_keeps_its_spectral_config():
    pytest.importorskip("torchtitan")  # the [torchtitan] extra; the README's test command runs without it
    config = importlib.import_module("fx_spectral.integrations.torchtitan.config")
    assert config.SpectralConfig.__name__ == "SpectralConfig" and config.SpectralConfig is not G.TransformConfig


# --------------------------------------------------------------------------------------------
# constrain's filter_fn: its second argument moves from the parameter fqn to the module fqn
# --------------------------------------------------------------------------------------------


def _two_layers():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(6, 6))
    model.add_module("fc2", nn.Linear(6, 6))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _names_selected(filter_fn):
    model, opt = _two_layers()
    handle = fx_spectral.constrain(model, opt, "pure_svd", filter_fn=filter_fn)
    try:
        return sorted(handle.names)
    finally:
        handle.remove()


def test_filter_fn_gets_both_spellings_and_keeps_the_old_answer_where_they_differ():
    calls = []
    seen = _names_selected(lambda m, fqn: calls.append(fqn) or True)
    assert seen == ["fc1.weight", "fc2.weight"]
    assert {"fc1", "fc2", "fc1.weight", "fc2.weight"} <= set(calls)  # asked with the module and the parameter fqn

    # written for parameter paths: the module spelling would select fc2 too; the old answer stays
    with pytest.warns(DeprecationWarning, match=r"'fc2.weight' \(with 'fc2.weight': False, with module 'fc2': True\)"):
        assert _names_selected(lambda m, fqn: not fqn.endswith("fc2.weight")) == ["fc1.weight"]
    # a filter that parses parameter paths raises on module paths: warned, the old answer used
    with pytest.warns(DeprecationWarning, match="raises IndexError"):
        assert _names_selected(lambda m, fqn: fqn.rsplit(".", 1)[1] == "weight" and "fc1" in fqn) == ["fc1.weight"]


def test_filter_fn_that_reads_the_same_in_both_spellings_does_not_warn(recwarn):
    assert _names_selected(lambda m, fqn: fqn.startswith("fc2")) == ["fc2.weight"]
    assert _names_selected(lambda m, fqn: m.out_features == 6) == ["fc1.weight", "fc2.weight"]
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
