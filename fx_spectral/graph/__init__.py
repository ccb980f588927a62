"""The graph side of fx_spectral: the FX pass, :func:`transform`, :func:`bake` and the rewrite primitive.

- :mod:`fx_spectral.graph.ops`: op tables (which ops take a weight, at which argument, its ``dim``).
- :mod:`fx_spectral.graph.rewrite`: :func:`insert_normalization` / :func:`find_weight_uses`, the
  primitive shared by the transform and the torch.compile backend.
"""

from fx_spectral.graph.rewrite import find_weight_uses, insert_normalization, lower_module_call, rewrite_weight

__all__ = ["find_weight_uses", "insert_normalization", "lower_module_call", "rewrite_weight"]
