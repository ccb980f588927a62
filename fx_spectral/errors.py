"""The error a projection raises when it cannot be computed (ground floor: imports nothing).

Shared by :mod:`fx_spectral.constraint` (one process) and :mod:`fx_spectral.distributed_projection` (every
rank raises the same one), so neither has to import the other for it.
"""

from __future__ import annotations

__all__ = ["ProjectionError", "projection_error"]


class ProjectionError(RuntimeError):
    """A projection could not be computed (e.g. a non-finite weight); no weight was written."""


def projection_error(name: str, method: object, when: str, why: str) -> ProjectionError:
    """The error for weight ``name`` whose projection by ``method`` (a method config) failed ``when``.

    Args:
        name: the weight's name (``fqn`` or ``fqn[key]``).
        method: the method config (its class name is shown).
        when: ``"after the optimizer step"`` (the step already happened) or e.g. ``"in project()"``.
        why: the cause, e.g. ``"it holds NaN or inf"``.

    Example::

        raise projection_error("4.weight", HardCap(), "in project()", "it holds NaN or inf")
    """
    step = (
        "The optimizer step itself already happened (every weight is as the optimizer left it, unprojected); "
        if when == "after the optimizer step"
        else "No weight was changed; "
    )
    return ProjectionError(
        f"constrain: cannot project {name!r} {when} ({type(method).__name__}): {why}. {step}"
        "fix the cause (e.g. a diverged loss or a too-large learning rate) before stepping again."
    )
