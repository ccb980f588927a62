"""The table of weight kinds (fx_spectral.kinds): consistency, the Embedding entry, and that a kind is one entry."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import fx_spectral
from fx_spectral import kinds
from fx_spectral.constraint import constrain, default_names
from fx_spectral.graph import ops as graph_ops
from fx_spectral.graph import transform
from fx_spectral.graph.backend import prepare
from fx_spectral.kinds import (
    CONV,
    CONV_TRANSPOSE,
    EMBEDDING,
    KINDS,
    LINEAR,
    WEIGHT_OPS,
    WeightKind,
    default_dim,
    kind_of,
    kind_of_op,
    stock_kind,
)
from fx_spectral.nn import SUPPORTED_MODULES

TOL = dict(atol=1e-6, rtol=1e-6)
aten = torch.ops.aten

# (module, input) for every kind that has a lowering: the functional op must reproduce the module.
LOWERED = [
    (lambda: nn.Linear(5, 3), (2, 5)),
    (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1), (2, 2, 9)),
    (lambda: nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", groups=2), (2, 2, 6, 5)),
    (lambda: nn.Conv3d(2, 2, 2, dilation=1), (1, 2, 3, 3, 3)),
    (lambda: nn.ConvTranspose1d(2, 4, 3, stride=2, output_padding=1), (2, 2, 5)),
    (lambda: nn.ConvTranspose2d(4, 2, 3, groups=2, dilation=2), (1, 4, 4, 4)),
    (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 2, 2, 2)),
]


def test_the_table_is_consistent():
    assert KINDS[:3] == (LINEAR, CONV, CONV_TRANSPOSE) and EMBEDDING in KINDS
    seen: dict[object, WeightKind] = {}
    for kind in KINDS:
        for target, arg in kind.ops.items():
            assert target not in seen, f"{target} is claimed by {seen[target].name} and {kind.name}"
            seen[target] = kind
            assert kind_of_op(target) is kind
            # the declared weight index is the op's `weight` argument
            if isinstance(target, torch._ops.OpOverload):
                assert target._schema.arguments[arg.index].name == arg.kwarg, target
            elif inspect.isfunction(target):
                assert list(inspect.signature(target).parameters)[arg.index] == arg.kwarg, target
            if kind.in_graph:
                op = WEIGHT_OPS[target]
                assert (op.kind, op.dim, op.index, op.kwarg) == (kind.name, kind.dim, arg.index, arg.kwarg)
            else:
                assert target not in WEIGHT_OPS  # the graph pass and the backend leave it alone
        for cls in kind.module_types:
            assert kind_of(cls.__new__(cls)) is kind
    # the only table entry without a kind: aten.convolution (conv or transposed by its argument)
    assert set(WEIGHT_OPS) - set(seen) == {aten.convolution.default}
    assert kind_of_op(aten.convolution.default) is None and kind_of_op(torch.relu) is None
    # ConvTranspose weights are (in, out / groups, *k): dim 1; the rest 0
    assert [k.dim for k in KINDS] == [0, 0, 1, 0]
    assert default_dim(nn.LazyConvTranspose2d(3, 3)) == 1 and default_dim(nn.LazyLinear(3)) == 0
    # the default-selected module types are exactly the ones the eager API always picked
    expected = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    assert SUPPORTED_MODULES == kinds.MODULE_TYPES == graph_ops.MODULE_TYPES == expected
    assert graph_ops.WEIGHT_OPS is WEIGHT_OPS


@pytest.mark.parametrize("factory,shape", LOWERED)
def test_lowering_reproduces_the_module(factory, shape):
    module = factory()
    kind = stock_kind(module)
    assert kind is kind_of(module) and kind.lowering_blocker(module) is None
    low = kind.lower(module)
    x = torch.randn(shape)
    if low.pre is not None:
        fn, args, kw = low.pre
        x_in = fn(x, *args, **kw)
    else:
        x_in = x
    torch.testing.assert_close(low.op(x_in, module.weight, module.bias, *low.args), module(x), **TOL)
    assert low.op in kind.ops  # what the graph pass emits is an op of the kind itself


def test_stock_kind_and_blockers():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert kind_of(Custom(2, 2)) is LINEAR and stock_kind(Custom(2, 2)) is None
    assert stock_kind(nn.LazyConv2d(3, 3)) is CONV and stock_kind(nn.Embedding) is EMBEDDING
    assert CONV_TRANSPOSE.lowering_blocker(nn.ConvTranspose1d(2, 2, 3)) is None
    convt = nn.ConvTranspose1d(2, 2, 3)
    convt.padding_mode = "reflect"  # (the constructor refuses it; a loaded model may carry it)
    assert "padding_mode='zeros'" in CONV_TRANSPOSE.lowering_blocker(convt)


# --------------------------------------------------------------------------------------------
# The Embedding entry
# --------------------------------------------------------------------------------------------


def test_eager_spectral_norm_of_embedding_matches_torch():
    torch.manual_seed(0)
    base = nn.Embedding(11, 6)
    ref = torch_spectral_norm(copy.deepcopy(base))
    ours = fx_spectral.spectral_norm(copy.deepcopy(base))
    assert ours._sn_params["weight"].dim == 0 == EMBEDDING.dim
    sn = ref.parametrizations.weight[0]
    with torch.no_grad():
        ours.weight_u.copy_(sn._u)
        ours.weight_v.copy_(sn._v)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    for step in range(3):
        idx = torch.randint(0, 11, (4, 5))
        y_r, y_o = ref(idx), ours(idx)
        torch.testing.assert_close(y_o, y_r, **TOL, msg=f"step {step}")
        torch.testing.assert_close(ours.weight_u, sn._u, **TOL)
        torch.testing.assert_close(ours.weight_v, sn._v, **TOL)
        w = torch.linspace(-1, 1, y_r.numel()).view_as(y_r)
        (y_r * w + y_r.square()).sum().backward()
        (y_o * w + y_o.square()).sum().backward()
        torch.testing.assert_close(ours.weight.grad, ref.parametrizations.weight.original.grad, **TOL)
        opt_r.step(), opt_o.step(), opt_r.zero_grad(), opt_o.zero_grad()
    # sigma estimates ||W||_2, which bounds every looked-up row: ||W[i]|| <= ||W||_2
    exact = torch.linalg.matrix_norm(ours.weight.detach().double(), ord=2)
    assert float(fx_spectral.spectral_sigma(ours)) == pytest.approx(float(exact), rel=0.05)


def test_embedding_has_no_operator_norm_and_no_operator_mode():
    emb = nn.Embedding(5, 3)
    with pytest.raises(TypeError, match="operator_norm: expected"):
        fx_spectral.operator_norm(emb, (1,))
    with pytest.raises(TypeError, match="no Lipschitz constant known"):
        fx_spectral.lipschitz_bound(nn.Sequential(emb, nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="mode='operator' needs"):
        fx_spectral.spectral_norm(nn.Embedding(5, 3), mode="operator")


class _EmbLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, idx):
        return self.fc(self.emb(idx).tanh())


def _steps(model, idxs, opt_params=None):
    opt = torch.optim.SGD(model.parameters() if opt_params is None else opt_params, lr=0.1)
    outs = []
    for idx in idxs:
        y = model(idx)
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()
        outs.append(y.detach())
    return outs


def test_defaults_leave_embedding_alone_and_graph_equals_eager():
    torch.manual_seed(1)
    base = _EmbLinear()
    idxs = [torch.randint(0, 7, (2, 3)) for _ in range(2)]
    eager = copy.deepcopy(base)
    assert fx_spectral.apply_spectral_norm(eager) == ["fc.weight"]  # default targets unchanged
    u0, v0 = eager.fc.weight_u.clone(), eager.fc.weight_v.clone()

    model = copy.deepcopy(base)
    gm = transform(model)
    assert any(n.op == "call_module" and n.target == "emb" for n in gm.graph.nodes)  # left as a leaf
    assert not hasattr(model.emb, "weight_u") and hasattr(model.fc, "weight_u")
    with torch.no_grad():
        model.fc.weight_u.copy_(u0)
        model.fc.weight_v.copy_(v0)

    compiled_model = prepare(copy.deepcopy(base))
    assert not hasattr(compiled_model.emb, "weight_u")
    with torch.no_grad():
        compiled_model.fc.weight_u.copy_(u0)
        compiled_model.fc.weight_v.copy_(v0)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="spectral", options={"inner": "eager"})

    out_e = _steps(eager, idxs)
    out_g = _steps(gm, idxs)
    out_c = _steps(compiled, idxs, compiled_model.parameters())
    for a, b, c in zip(out_e, out_g, out_c):
        torch.testing.assert_close(b, a, **TOL)
        torch.testing.assert_close(c, a, **TOL)
    torch.testing.assert_close(compiled_model.emb.weight, eager.emb.weight, **TOL)
    assert not hasattr(compiled_model.emb, "weight_u")  # the backend did not normalize the embedding
    torch._dynamo.reset()


def test_constrain_default_selection_unchanged_with_an_embedding():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 8), "body": nn.Linear(8, 8), "head": nn.Linear(8, 10)})
    assert default_names(model) == ["body.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = constrain(model, opt, "pure_svd")
    assert handle.names == ["body.weight"]
    handle.remove()
    # an explicitly included embedding keeps the matrix-view scale sqrt(rows / cols) it always had
    handle = constrain(model, opt, "pure_svd", include="emb.weight")
    assert handle.report()["emb.weight"]["scale"] == pytest.approx((10 / 8) ** 0.5, rel=1e-12)
    handle.remove()
    # tied embedding / head: the weight's owner (backend tie-break) is the Linear, and no default picks it
    tied = nn.ModuleDict({"emb": nn.Embedding(10, 8), "proj": nn.Linear(8, 10, bias=False)})
    tied.proj.weight = tied.emb.weight
    assert kinds.owner_priority(tied.proj) > kinds.owner_priority(tied.emb) == kinds.owner_priority(nn.ReLU())
    assert default_names(tied) == []


def test_a_new_kind_is_one_entry(monkeypatch):
    """A test-local kind for nn.Bilinear (weight (out, in1, in2)), added as one entry of KINDS."""
    bilinear = WeightKind(
        name="bilinear", module_types=(nn.Bilinear,), ops={F.bilinear: kinds.WeightArg(2)}, dim=0,
        default_selected=True, lazy_deferrable=False, owner_priority=1, operator_norm=None,
    )
    model = nn.ModuleDict({"bi": nn.Bilinear(3, 4, 5), "fc": nn.Linear(5, 2)})
    assert kind_of(model.bi) is None and default_names(model) == ["fc.weight"]
    monkeypatch.setattr(kinds, "KINDS", (*KINDS, bilinear))
    assert kind_of(model.bi) is bilinear and kind_of_op(F.bilinear) is bilinear
    assert default_names(model) == ["bi.weight", "fc.weight"]
    handle = constrain(model, torch.optim.SGD(model.parameters(), lr=0.1), "pure_svd")
    assert handle.names == ["bi.weight", "fc.weight"]
    handle.remove()
