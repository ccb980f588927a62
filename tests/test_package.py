"""The package root: the public names of DESIGN §2, and no submodule shadowing them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import fx_spectral

PUBLIC = ["spectral_norm", "remove_spectral_norm", "apply_spectral_norm", "transform", "bake", "backend", "constrain"]
CONSTRAINT_OPS = [
    "power_iterate", "spectral_normalize", "hard_cap", "soft_cap", "spectral_hammer",
    "spectral_weight_decay", "pure_svd", "orthogonalize", "soft_cap_coupling",
]


def test_public_names_are_the_functions():
    importlib.import_module("fx_spectral.constrain")  # a later submodule import must not shadow the function
    for name in PUBLIC:
        obj = getattr(fx_spectral, name)
        assert callable(obj) and not isinstance(obj, type(fx_spectral)), name
    for name in CONSTRAINT_OPS:
        assert callable(getattr(fx_spectral.constraints, name)), name


def test_constrain_is_the_function_whatever_the_import_order():
    code = (
        "import types, fx_spectral.constrain, fx_spectral; "
        "assert not isinstance(fx_spectral.constrain, types.ModuleType)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
