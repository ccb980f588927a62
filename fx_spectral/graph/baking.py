r"""``fx_spectral.bake``: fold ``1/sigma`` into the weights and drop u/v, for deployment.

.. math:: W \leftarrow W / \sigma(W) \quad (\text{current } u, v, \text{ no update})

The baked model computes what the normalized model computes in eval mode, with plain weights and
no spectral state, so it exports (``torch.export``) and loads anywhere without fx_spectral.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx import GraphModule

from fx_spectral import nn as sn
from fx_spectral.graph.spectral_module import SpectralGraphModule
from fx_spectral.graph.spectral_module import install_owners as _install_owners

__all__ = ["bake"]


def _bake_eager(model: nn.Module) -> None:
    # NB: in place: every module normalized by the eager API gets W/sigma and loses u/v.
    for module in model.modules():
        names = tuple(module.__dict__.get("_sn_params", ()))
        if names:
            sn.remove_spectral_norm(module, names, bake=True)


def _bake_graph_module(gm: SpectralGraphModule) -> GraphModule:
    # The plain graph (module leaves lowered, no normalization): each op takes the baked weight.
    graph = copy.deepcopy(gm._sn_plain_graph)
    with torch.no_grad():
        for w in gm._sn_weights:
            owner = gm.get_submodule(w.owner)
            weight = getattr(owner, w.attr)
            u, v = owner._buffers[w.attr + "_u"], owner._buffers[w.attr + "_v"]
            normalized = sn.normalize_weight(weight, u, v, dim=w.dim, eps=w.eps, training=False)
            # NB: in place, so the Parameter object (and the model sharing it) keeps its identity.
            weight.copy_(normalized)
            del owner._buffers[w.attr + "_u"], owner._buffers[w.attr + "_v"]
    baked = GraphModule(gm, graph, "BakedGraphModule")
    _install_owners(baked, gm, gm._sn_weights)
    baked.train(gm.training)
    return baked


def bake(model: nn.Module) -> nn.Module:
    r"""Fold ``1/sigma`` into every spectral-normalized weight and remove the u/v buffers.

    .. math:: W \leftarrow W / \sigma, \qquad \sigma = u^\top W_{mat} v \ (\text{current } u, v)

    The result computes what ``model`` computes in eval mode (no power-iteration update), as a
    plain model: no ``{name}_u`` / ``{name}_v`` in its ``state_dict``, no fx_spectral code in its
    forward. Export it with ``torch.export.export`` and save it with ``torch.export.save``: it loads
    and runs where fx_spectral is not installed.

    NB: the weights are overwritten in place (their Parameter objects survive) and the u/v buffers
    are deleted from their modules, so the model that was transformed (which shares its modules
    with the transformed one) is baked too.

    Args:
        model: a module returned by :func:`fx_spectral.transform`, or any module whose submodules
            are normalized by the eager API (:func:`fx_spectral.spectral_norm` /
            :func:`fx_spectral.apply_spectral_norm`), or a mix (Lazy leaves of a transform).

    Returns:
        a plain ``GraphModule`` (the eval graph with the normalization folded away) for a
        transformed module; ``model`` itself, baked in place, otherwise.

    Example::

        >>> gm = fx_spectral.transform(model)
        >>> ...  # train
        >>> plain = fx_spectral.bake(gm.eval())
        >>> torch.export.save(torch.export.export(plain, (x,)), "model.pt2")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bake: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, SpectralGraphModule):
        for w in model._sn_weights:
            owner = model.get_submodule(w.owner)
            if w.attr + "_u" not in owner._buffers:
                raise ValueError(f"bake: {w.target}_u is missing; was this module baked already?")
        _bake_eager(model)
        return _bake_graph_module(model)
    _bake_eager(model)
    return model
