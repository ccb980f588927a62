"""Old names that still work for one release: a module ``__getattr__`` that warns and forwards.

Torch-free (layer 0). A module that renamed a public name keeps the old one like this::

    from fx_spectral.deprecation import renamed

    __getattr__ = renamed(__name__, {"SpectralConfig": "TransformConfig"}, globals())

``module.SpectralConfig`` then raises a :class:`DeprecationWarning` (attributed to the caller)
and returns ``module.TransformConfig``, the same object. Names not in the table raise the usual
:class:`AttributeError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["renamed"]


def renamed(
    module: str, names: Mapping[str, str], resolve: Mapping[str, Any] | Callable[[str], Any]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for renamed attributes.

    Args:
        module: the module's ``__name__`` (it prefixes the warning and the AttributeError).
        names: old name -> new name.
        resolve: where the new name is looked up: the module's ``globals()`` (read at access time,
            so names defined later in the module work), or a function ``new_name -> object``
            (e.g. one that imports a submodule lazily).

    Example::

        >>> __getattr__ = renamed(__name__, {"SpectralBackendConfig": "BackendConfig"}, globals())
    """
    table = dict(names)

    def __getattr__(name: str) -> Any:
        new = table.get(name)
        if new is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"{module}.{name} is deprecated: use {module}.{new} (the same object)", DeprecationWarning, stacklevel=2
        )
        return resolve(new) if callable(resolve) else resolve[new]

    return __getattr__
