"""Op tables of the graph pass: a re-export of :mod:`fx_spectral.kinds`, where they now live.

Which graph ops consume a weight, where the weight sits among their arguments and its ``dim`` are
declared once per kind in :mod:`fx_spectral.kinds`; this module keeps the old import path working.
"""

from __future__ import annotations

from fx_spectral.kinds import (
    MODULE_TYPES,
    WEIGHT_OPS,
    WeightOp,
    is_aten_op,
    module_dim,
    weight_arg,
    weight_dim,
    weight_op,
)

__all__ = [
    "WeightOp", "WEIGHT_OPS", "MODULE_TYPES", "weight_op", "weight_arg", "weight_dim", "is_aten_op", "module_dim",
]
