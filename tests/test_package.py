"""The package root: the public names, loaded lazily, and no submodule shadowing them."""

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


def _run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr


def test_public_names_are_the_functions():
    importlib.import_module("fx_spectral.constrain")  # a later submodule import must not shadow the function
    for name in PUBLIC:
        obj = getattr(fx_spectral, name)
        assert callable(obj) and not isinstance(obj, type(fx_spectral)), name
    for name in CONSTRAINT_OPS:
        assert callable(getattr(fx_spectral.constraints, name)), name


def test_all_and_dir_list_every_public_name():
    assert sorted(fx_spectral.__all__) == fx_spectral.__all__
    assert set(PUBLIC) | {"constraints", "lipschitz_bound", "spectral_sigma"} <= set(fx_spectral.__all__)
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
        "assert loaded == ['fx_spectral', 'fx_spectral.kinds', 'fx_spectral.nn', 'fx_spectral.power'], loaded\n"
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
