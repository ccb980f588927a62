"""fx_spectral: control the spectral norm of PyTorch weights.

Three ways over one math core. Eager and graph share one state layout (the raw parameter keeps
its name; float32 buffers ``{name}_u`` / ``{name}_v`` on the owning module); constraints keep
their vectors in the optimizer's per-parameter state instead (``spectral_u`` / ``spectral_v``,
read and written through the handle's ``vectors``), so ``optimizer.state_dict()`` carries them:

- eager: :func:`spectral_norm`, :func:`apply_spectral_norm`, :func:`remove_spectral_norm`;
- graph: :func:`transform` (torch.fx), :func:`bake`, and the torch.compile backend ``"spectral"``
  (:func:`backend` makes a configured one);
- constraints: :func:`constrain` projects weights after every optimizer step
  (:mod:`fx_spectral.projections` holds the math), :func:`lipschitz_bound` certifies the result;
- certificates: :func:`operator_norm` brackets a convolution's true operator norm, :func:`certify`
  reads a Lipschitz bound off any traceable model.

The public names load lazily (PEP 562): ``import fx_spectral`` or ``import fx_spectral.nn`` costs
little more than ``import torch``, and neither imports the graph machinery nor registers the
backend (``torch.compile(model, backend="spectral")`` finds it through the package's
``torch_dynamo_backends`` entry point). To export a new name, add one line to :data:`_EXPORTS`.
"""

import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

#: public name -> (module that defines it, attribute in that module; None for the module itself).
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "apply_spectral_norm": ("fx_spectral.nn", "apply_spectral_norm"),
    "is_spectral_normalized": ("fx_spectral.nn", "is_spectral_normalized"),
    "remove_spectral_norm": ("fx_spectral.nn", "remove_spectral_norm"),
    "spectral_norm": ("fx_spectral.nn", "spectral_norm"),
    "spectral_sigma": ("fx_spectral.nn", "spectral_sigma"),
    "transform": ("fx_spectral.graph.tracing", "transform"),
    "bake": ("fx_spectral.graph.baking", "bake"),
    "backend": ("fx_spectral.graph.backend", "backend"),
    "constrain": ("fx_spectral.constraint", "constrain"),
    "projections": ("fx_spectral.projections", None),
    "lipschitz_bound": ("fx_spectral.lipschitz", "lipschitz_bound"),
    "operator_norm": ("fx_spectral.operator_norms", "operator_norm"),
    "OperatorNorm": ("fx_spectral.operator_norms", "OperatorNorm"),
    "certify": ("fx_spectral.certificates", "certify"),
    "Certificate": ("fx_spectral.certificates", "Certificate"),
}

__all__ = sorted(_EXPORTS)

#: renamed submodules: old package attribute -> its shim module (importing it warns, DeprecationWarning).
_MOVED_MODULES: dict[str, str] = {"constraints": "fx_spectral.constraints"}

# Public functions named like a submodule (``fx_spectral.constrain``, or a deprecated shim such as
# ``fx_spectral.operator_norm``): the package attribute is the function, never the submodule,
# whatever the import order. Every exported attribute is guarded, so a shim needs no entry here.
_SHADOWING = frozenset(n for n, (_, attr) in _EXPORTS.items() if attr is not None)


def __getattr__(name: str):
    try:
        module_name, attr = _EXPORTS[name]
    except KeyError:
        if name in _MOVED_MODULES:  # not cached: the import binds the shim on the package itself
            return _importlib.import_module(_MOVED_MODULES[name])
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = _importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # cached: later lookups do not come here
    return value


def __dir__() -> list[str]:
    # the public names (loaded or not), loaded submodules and the dunders; not the private helpers
    return sorted({n for n in globals() if not n.startswith("_") or n.startswith("__")} | set(__all__))


class _Package(_types.ModuleType):
    """The package's module type: the import system's binding of a submodule on its package
    (``import fx_spectral.constrain``) does not hide the public function of the same name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWING and isinstance(value, _types.ModuleType):
            return  # NB: the submodule stays reachable as sys.modules["fx_spectral.<name>"]
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
