"""Renamed public classes: the old names still work for one release, warn, and are the same class."""

from __future__ import annotations

import importlib
import sys

import pytest

import fx_spectral.graph as G


@pytest.mark.parametrize(
    "module, old, new",
    [
        ("fx_spectral.graph", "SpectralConfig", "TransformConfig"),
        ("fx_spectral.graph", "SpectralBackendConfig", "BackendConfig"),
        ("fx_spectral.graph.transform", "SpectralConfig", "TransformConfig"),
        ("fx_spectral.graph.backend", "SpectralBackendConfig", "BackendConfig"),
    ],
)
def test_old_config_names_warn_and_are_the_same_class(module, old, new):
    importlib.import_module(module)
    mod = sys.modules[module]  # fx_spectral.graph.transform the module, not the function
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated: use .*{new}"):
        alias = getattr(mod, old)
    assert alias is getattr(mod, new)
    assert alias is getattr(G, new) and alias.__name__ == new


def test_new_names_do_not_warn_and_torchtitan_keeps_its_spectral_config(recwarn):
    assert G.TransformConfig is sys.modules["fx_spectral.graph.transform"].TransformConfig
    assert G.BackendConfig is importlib.import_module("fx_spectral.graph.backend").BackendConfig
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    with pytest.raises(AttributeError, match="no_such_name"):
        G.no_such_name  # noqa: B018
    config = importlib.import_module("fx_spectral.integrations.torchtitan.config")
    assert config.SpectralConfig.__name__ == "SpectralConfig" and config.SpectralConfig is not G.TransformConfig
