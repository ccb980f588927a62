"""The public interface of a constrain() handle: targets, pieces/views, vectors, context, cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fx_spectral.constraint import Piece, Target, constrain


@pytest.fixture
def handles():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.ConvTranspose2d(4, 6, 3), nn.Linear(6, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    whole = constrain(model, opt, "spectral_normalize", w_max=0.5, include=["2.weight", "3.weight"])
    split = constrain(
        model,
        opt,
        "spectral_normalize",
        include=["0.weight"],
        split=lambda fqn, p: {"q": p[:8], "kv": p[8:]},
        w_max={"*[q]": 0.3, "*": 0.6},
    )
    return model, opt, whole, split


def test_targets_and_pieces_give_the_projected_matrices(handles):
    model, _, whole, split = handles
    assert [t.fqn for t in whole.targets] == ["2.weight", "3.weight"]
    assert all(isinstance(t, Target) for t in whole.targets)
    conv_t, linear = whole.targets
    # ConvTranspose2d(4, 6, 3): weight (4, 6, 3, 3), output dim 1 -> a 6 x 36 matrix
    assert whole.pieces(conv_t) == [Piece(None, (6, 36))]
    assert whole.pieces(linear) == [Piece(None, (5, 6))]
    assert whole.views(linear, linear.param) is None
    (t,) = split.targets
    assert split.pieces(t) == [Piece("q", (8, 16)), Piece("kv", (16, 16))]
    views = split.views(t, model[0].weight)
    assert views["q"].data_ptr() == model[0].weight.data_ptr()  # views, not copies
    assert {t.name(k): w for k, w in t.w_max.items()} == {"0.weight[q]": 0.3, "0.weight[kv]": 0.6}


def test_vectors_context_and_cache(handles):
    model, opt, whole, split = handles
    t = whole.targets[1]
    assert whole.vectors.get(t, None) is None  # none before the first step (the initial projection is exact)
    u, v = torch.ones(5) / 5**0.5, torch.ones(6) / 6**0.5
    whole.vectors.put(t, None, u, v)
    assert whole.vectors.get(t, None)[0] is u and whole._get_vectors(t, None)[1] is v  # the alias reads the same
    ctx = whole.context(t, None, scale=(5 / 6) ** 0.5)
    assert ctx.w_max == 0.5 and ctx.get_vectors()[0] is u
    assert whole.cache("x") is whole.cache("x") and whole.cache("x") is not split.cache("x")
    # after a step the vectors live in the optimizer state (optimizer.state_dict() carries them)
    model[3](torch.randn(3, 6)).sum().backward()
    opt.step()
    assert "spectral_u" in opt.state[model[3].weight]
    assert whole.vectors.get(t, None)[0] is opt.state[model[3].weight]["spectral_u"]
