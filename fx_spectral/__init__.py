"""fx_spectral: control the spectral norm of PyTorch weights.

Three ways over one math core. Eager and graph share one state layout (the raw parameter keeps
its name; float32 buffers ``{name}_u`` / ``{name}_v`` on the owning module); constraints keep
their vectors in the optimizer's per-parameter state instead (``spectral_u`` / ``spectral_v``,
read and written through the handle's ``vectors``), so ``optimizer.state_dict()`` carries them:

- eager: :func:`spectral_norm`, :func:`apply_spectral_norm`, :func:`remove_spectral_norm`;
- graph: :func:`transform` (torch.fx), :func:`bake`, and the torch.compile backend ``"spectral"``
  (:func:`backend` makes a configured one);
- constraints: :func:`constrain` projects weights after every optimizer step
  (:mod:`fx_spectral.constraints` holds the math), :func:`lipschitz_bound` certifies the result;
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
    "bake": ("fx_spectral.graph.bake", "bake"),
    "backend": ("fx_spectral.graph.backend", "backend"),
    "constrain": ("fx_spectral.constrain", "constrain"),
    "constraints": ("fx_spectral.constraints", None),
    "lipschitz_bound": ("fx_spectral.lipschitz", "lipschitz_bound"),
    "operator_norm": ("fx_spectral.operator_norm", "operator_norm"),
    "OperatorNorm": ("fx_spectral.operator_norm", "OperatorNorm"),
    "certify": ("fx_spectral.certify", "certify"),
    "Certificate": ("fx_spectral.certify", "Certificate"),
}

__all__ = sorted(_EXPORTS)

# Public functions named like the submodule that defines them (``fx_spectral.constrain``): the
# package attribute is the function, never the submodule, whatever the import order.
_SHADOWING = frozenset(n for n, (mod, attr) in _EXPORTS.items() if attr is not None and mod == f"{__name__}.{n}")


def __getattr__(name: str):
    try:
        module_name, attr = _EXPORTS[name]
    except KeyError:
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
