"""The package root: the public names, loaded lazily, and no submodule shadowing them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import fx_spectral

PUBLIC = ["spectral_norm", "remove_spectral_norm", "apply_spectral_norm", "transform", "bake", "backend", "constrain"]
CONSTRAINT_OPS = [
    "power_iterate", "spectral_normalize", "hard_cap", "soft_cap", "spectral_hammer",
    "spectral_weight_decay", "pure_svd", "orthogonalize", "soft_cap_coupling",
]


def _run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr


def test_public_names_are_the_functions():
    importlib.import_module("fx_spectral.constraint")  # a later submodule import must not shadow the function
    for name in PUBLIC:
        obj = getattr(fx_spectral, name)
        assert callable(obj) and not isinstance(obj, type(fx_spectral)), name
    for name in CONSTRAINT_OPS:
        assert callable(getattr(fx_spectral.projections, name)), name


#: renamed module path (this branch's moves) -> (its new module(s), names it re-exports).
MOVED_MODULES = {
    "fx_spectral.constraints": (
        ["fx_spectral.projections", "fx_spectral.coupling"], CONSTRAINT_OPS + ["HARD_CAP_COEFFICIENTS", "_g"]
    ),
    "fx_spectral.constrain": (
        ["fx_spectral.constraint", "fx_spectral.selection"],
        ["constrain", "Constraint", "Target", "_Target", "Piece", "VectorStore", "ProjectionError", "SoftCap",
         "METHODS", "default_names", "HEAD_NAMES", "_ACTIVE", "_match", "_owners", "initial_projection_method"],
    ),
}


def test_moved_module_paths_warn_and_give_the_same_objects():
    import pytest

    for old, (news, names) in MOVED_MODULES.items():
        sys.modules.pop(old, None)  # a fresh import, so the warning fires here whatever ran before
        with pytest.warns(DeprecationWarning, match=news[0].replace(".", r"\.")):
            shim = importlib.import_module(old)
        for name in names:
            homes = [importlib.import_module(n) for n in news]
            found = [getattr(m, name) for m in homes if hasattr(m, name)]
            assert found and getattr(shim, name) is found[0], (old, name)
    import types

    assert isinstance(importlib.import_module("fx_spectral.constraint"), types.ModuleType)
    assert not isinstance(fx_spectral.constrain, types.ModuleType)  # the function, whatever was imported
    # the package attribute of the old ops namespace still works, with the warning
    _run(
        "import warnings, fx_spectral, fx_spectral.projections as P\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from fx_spectral import constraints as C\n"
        "assert C.soft_cap is P.soft_cap and C._DEFAULT_FRESH_ITERATIONS == P._DEFAULT_FRESH_ITERATIONS\n"
        "assert any(issubclass(x.category, DeprecationWarning) and 'projections' in str(x.message) for x in w)\n"
        "assert 'constraints' not in fx_spectral.__all__ and 'projections' in fx_spectral.__all__\n"
    )


def test_all_and_dir_list_every_public_name():
    assert sorted(fx_spectral.__all__) == fx_spectral.__all__
    assert set(PUBLIC) | {"projections", "lipschitz_bound", "spectral_sigma"} <= set(fx_spectral.__all__)
    for name in fx_spectral.__all__:
        assert name in dir(fx_spectral), name
        assert getattr(fx_spectral, name) is getattr(fx_spectral, name)
    assert not [n for n in dir(fx_spectral) if n.startswith("_") and not n.startswith("__")]
    try:
        fx_spectral.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


def test_constrain_is_the_function_whatever_the_import_order():
    _run(
        "import types, fx_spectral.constrain, fx_spectral\n"
        "assert not isinstance(fx_spectral.constrain, types.ModuleType)\n"
        "from fx_spectral import constrain\n"
        "assert callable(constrain) and not isinstance(constrain, types.ModuleType)\n"
        "import sys; assert sys.modules['fx_spectral.constrain'].constrain is constrain\n"
    )


def test_import_nn_loads_no_graph_machinery_and_registers_no_backend():
    """`import fx_spectral.nn` costs little more than torch: no graph modules, no dynamo backend
    registered (`list_backends()` names installed entry points without loading them, so the
    registry's loaded compiler functions are what to check)."""
    _run(
        "import sys, torch, fx_spectral.nn, fx_spectral\n"
        "from torch._dynamo.backends import registry\n"
        "fx_spectral.spectral_norm(torch.nn.Linear(3, 2))\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('fx_spectral'))\n"
        "assert loaded == ['fx_spectral', 'fx_spectral.kinds', 'fx_spectral.matrices', 'fx_spectral.nn',"
        " 'fx_spectral.power', 'fx_spectral.sn_autograd', 'fx_spectral.sn_modules',"
        " 'fx_spectral.sn_operator'], loaded\n"
        "assert 'spectral' not in registry._COMPILER_FNS\n"
    )


def test_compile_backend_resolves_without_importing_the_backend_module():
    """`torch.compile(m, backend="spectral")` after a bare `import fx_spectral` (entry point, or
    the package's lazy attribute) normalizes the weight."""
    _run(
        "import torch, fx_spectral\n"
        "m = torch.nn.Linear(4, 3)\n"
        "y = torch.compile(m, backend='spectral', options={'inner': 'eager'})(torch.randn(2, 4))\n"
        "assert 'weight_u' in dict(m.named_buffers()), 'the backend did not run'\n"
    )


#: deprecated module path -> (its new module, the public function named like the old path, names it re-exports).
SHIMS = {
    "fx_spectral.operator_norm": (
        "fx_spectral.operator_norms",
        "operator_norm",
        ["OperatorNorm", "operator_norm", "conv_operator_norm", "conv_upper_bound", "effective_weight",
         "padding_map_norm", "SVD_MARGIN"],
    ),
    "fx_spectral.certify": (
        "fx_spectral.certificates",
        "certify",
        ["CertRow", "Certificate", "attained_lower_bound", "certify"],
    ),
    "fx_spectral.graph.bake": ("fx_spectral.graph.baking", "bake", ["bake"]),
}


@pytest.mark.parametrize("old", sorted(SHIMS))
def test_old_module_path_warns_and_gives_the_same_objects(old):
    new, function, names = SHIMS[old]
    sys.modules.pop(old, None)  # a fresh import, so the warning fires here whatever ran before
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        shim = importlib.import_module(old)
    canonical = importlib.import_module(new)
    for name in names:
        assert getattr(shim, name) is getattr(canonical, name), name
    parent, _, leaf = old.rpartition(".")
    assert getattr(importlib.import_module(parent), leaf) is getattr(canonical, function)  # the function, still


def test_renamed_modules_are_modules_and_old_paths_are_the_functions():
    """`import <new> as m` gives the module; the old dotted path names the public function, even when
    the deprecated shim was imported first."""
    lines = ["import types, warnings", "warnings.simplefilter('ignore', DeprecationWarning)"]
    for old, (new, function, _) in SHIMS.items():
        parent, _, leaf = old.rpartition(".")
        lines += [
            f"import {old}",
            f"import {new} as m",
            "assert isinstance(m, types.ModuleType), m",
            f"import {old} as f",
            f"assert f is m.{function} and not isinstance(f, types.ModuleType), f",
            f"import {parent}",
            f"assert {parent}.{leaf} is m.{function}",
        ]
    _run("\n".join(lines) + "\n")


def test_old_transform_module_path_warns_and_graph_transform_is_the_function():
    """graph/transform.py became graph/tracing.py: `import fx_spectral.graph.tracing as t` gives the module,
    the old path warns and gives the same objects, and `fx_spectral.graph.transform` stays the function
    whatever was imported first (the deprecated shim included)."""
    _run(
        "import types, warnings, pytest\n"
        "import fx_spectral.graph.tracing as t\n"
        "assert isinstance(t, types.ModuleType) and t.__name__ == 'fx_spectral.graph.tracing'\n"
        "with pytest.warns(DeprecationWarning, match=r'fx_spectral\\.graph\\.tracing'):\n"
        "    import fx_spectral.graph.transform as shim\n"
        "import sys\n"
        "shim = sys.modules['fx_spectral.graph.transform']\n"
        "for name in ('transform', 'spectral_pass', 'SpectralGraphModule', 'TransformConfig', '_Weight'):\n"
        "    assert getattr(shim, name) is getattr(t, name), name\n"
        "import fx_spectral.graph.spectral_module as m\n"
        "assert shim._Weight is m.PlannedWeight and shim._unpickle is m._unpickle  # what older pickles name\n"
        "import fx_spectral, fx_spectral.graph\n"
        "assert fx_spectral.graph.transform is t.transform and fx_spectral.transform is t.transform\n"
        "assert not isinstance(fx_spectral.graph.transform, types.ModuleType)\n"
        "from fx_spectral.graph import transform\n"
        "assert transform is t.transform\n"
    )
