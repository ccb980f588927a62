"""Operator mode in the graph: ``transform(model, mode="operator")`` and ``backend(mode="operator")``.

References: the dense Jacobian's exact SVD (float64) for the true operator norm, and the eager
``spectral_norm(..., mode="operator")`` on an identical copy with the same u/v.
"""

from __future__ import annotations

import copy

import pytest
import torch
from expecttest import TestCase
from torch import nn

import fx_spectral
from fx_spectral import spectral_norm
from fx_spectral.graph import transform
from tests.test_graph_golden import code
from tests.test_nn_operator_mode import CASES, true_operator_norm

NORM_CASES = ["conv2d", "stride2", "transposed", "circular", "reflect", "conv1d", "same_even"]


def _sgd(model: nn.Module, x: torch.Tensor, steps: int, lr: float = 0.01) -> list[tuple]:
    """SGD on a regression to fixed random targets; returns (output, grads) of every step."""
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with torch.no_grad():  # the target's shape from an eval call (no u/v update)
        y = 3 * torch.randn_like(model.eval()(x))
    model.train()
    trace = []
    for _ in range(steps):
        out = model(x)
        (out - y).square().mean().backward()
        trace.append((out.detach().clone(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
        opt.zero_grad()
    return trace


def _uv(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("_u", "_v"))}


def _mixed_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), nn.Flatten(), nn.Linear(3 * 16 * 16, 5),
    )


def _eager_twin(model: nn.Sequential) -> nn.Sequential:
    e = copy.deepcopy(model)
    spectral_norm(e[0], mode="operator", input_shape=(3, 8, 8))
    spectral_norm(e[2], mode="operator", input_shape=(4, 8, 8))
    spectral_norm(e[4], mode="operator")  # a Linear: matrix mode
    return e


# --------------------------------------------------------------------------------------------
# transform
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", NORM_CASES)
def test_transform_operator_mode_is_1_lipschitz_after_training(case):
    factory, shape = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(4, *shape)
    gm = transform(nn.Sequential(factory()), mode="operator", example_inputs=(x,))
    _sgd(gm, x, steps=4)
    norm = true_operator_norm(gm, shape)
    print(f"transform operator-mode true norm after 4 SGD steps ({case}): {norm:.5f}")
    assert 0.99 <= norm <= 1.01, norm


def test_transform_matches_eager_operator_mode_and_loads_its_state_dict():
    torch.manual_seed(0)
    model = _mixed_model()
    eager = _eager_twin(model)
    x = torch.randn(2, 3, 8, 8)
    gm = transform(model, mode="operator", example_inputs=(x,))
    assert {k: tuple(v.shape) for k, v in _uv(gm).items()} == {k: tuple(v.shape) for k, v in _uv(eager).items()}
    gm.load_state_dict(eager.state_dict(), strict=True)  # eager operator mode -> transform, same u/v
    for (out_g, grads_g), (out_e, grads_e) in zip(_sgd(gm, x, 3), _sgd(eager, x, 3)):
        torch.testing.assert_close(out_g, out_e, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads_g, grads_e):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    uv_g, uv_e = _uv(gm), _uv(eager)
    for k in uv_e:
        torch.testing.assert_close(uv_g[k], uv_e[k], rtol=1e-5, atol=1e-5)
    # and back: the transformed model's state loads strictly into the eager twin
    eager.load_state_dict(gm.state_dict(), strict=True)


def test_transform_eval_does_not_update_and_gradient_flows_through_sigma():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 6, 6)
    gm = transform(nn.Sequential(conv), mode="operator", example_inputs=(x,)).eval()
    before = _uv(gm)
    gm(x).sum().backward()
    for k, v in _uv(gm).items():
        assert torch.equal(v, before[k]), k
    # the gradient includes d sigma / dW: with u, v fixed, sigma = <u, A(W) v> is linear in W
    u, v = conv.weight_u.double(), conv.weight_v.double()
    w = conv.weight.detach().double().requires_grad_()
    sigma = (u * torch.nn.functional.conv2d(v[None], w, padding=1)[0]).sum()
    torch.nn.functional.conv2d(x.double(), w / sigma, conv.bias.double(), padding=1).sum().backward()
    torch.testing.assert_close(conv.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-6)


def test_transform_changed_input_shape_raises_naming_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv1d(1, 2, 3, padding=1)))
    gm = transform(model, mode="operator", example_inputs=(torch.randn(3, 1, 4),))
    gm(torch.randn(5, 1, 4))  # another batch size is fine
    before = _uv(gm)
    with pytest.raises(ValueError, match=r"^0\.0: .*\(1, 4\).*\(5, 1, 6\)"):
        gm(torch.randn(5, 1, 6))
    with pytest.raises(ValueError, match=r"^0\.0: "):
        gm.eval()(torch.randn(5, 1, 6))
    for k, v in _uv(gm).items():
        assert torch.equal(v, before[k]), k


def test_transform_without_shapes_raises_and_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=r"needs the input shape of '0' \(Conv2d\).*example_inputs"):
        transform(model, mode="operator")
    assert set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="example_inputs is only used with mode='operator'"):
        transform(model, example_inputs=(torch.randn(1, 2, 4, 4),))
    with pytest.raises(ValueError, match="expected mode 'matrix'"):
        transform(model, mode="spectral")


def test_transform_reuses_operator_uv_already_on_the_model():
    # no example_inputs needed once the model holds operator-mode u/v (e.g. after a first transform)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(1, 2, 5, 5)
    first = transform(model, mode="operator", example_inputs=(x,))
    again = transform(model, mode="operator")
    assert again.get_submodule("0").weight_v.shape == (2, 5, 5)
    torch.testing.assert_close(again.eval()(x), first.eval()(x))
    with pytest.raises(ValueError, match=r"expects float32 buffers shaped like one output / input example"):
        transform(model, mode="operator", example_inputs=(torch.randn(1, 2, 6, 6),))


def test_transform_operator_graph_is_one_node_per_conv_weight():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    gm = transform(model, mode="operator", example_inputs=(torch.randn(1, 2, 4, 4),))
    from fx_spectral.graph.operator import operator_weight

    for graph, training in ((gm.train_graph, True), (gm.eval_graph, False)):
        nodes = [n for n in graph.nodes if n.target is operator_weight]
        assert len(nodes) == 1
        assert nodes[0].args[-1] is training and nodes[0].args[5] == "0"
        assert [u.target for u in nodes[0].users] == [torch.conv2d]
    assert torch.mv in {n.target for n in gm.train_graph.nodes}  # the Linear: matrix mode's nodes


def test_transform_low_precision_and_more_power_iterations_match_eager():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    eager = copy.deepcopy(conv)
    spectral_norm(eager, n_power_iterations=3, mode="operator", input_shape=(2, 6, 6))
    x = torch.randn(2, 2, 6, 6)
    gm = transform(nn.Sequential(conv), mode="operator", n_power_iterations=3, example_inputs=(x,))
    gm.get_submodule("0").load_state_dict(eager.state_dict(), strict=True)
    gm, eager = gm.to(torch.bfloat16), eager.to(torch.bfloat16)
    assert conv.weight_u.dtype == torch.float32  # u/v stay float32; the estimate runs in float32
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(gm(xb), eager(xb), rtol=0, atol=0)
    torch.testing.assert_close(conv.weight_u, eager.weight_u, rtol=0, atol=0)
    torch.testing.assert_close(gm.eval()(xb), eager.eval()(xb), rtol=0, atol=0)


def test_transform_operator_mode_round_trips_through_deepcopy():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = transform(_mixed_model(), mode="operator", example_inputs=(x,)).eval()
    twin = copy.deepcopy(gm)
    torch.testing.assert_close(twin(x), gm(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# backend
# --------------------------------------------------------------------------------------------


def _compiled(model: nn.Module, inner: str = "aot_eager", **kwargs):
    torch._dynamo.reset()
    return torch.compile(model, backend=fx_spectral.backend(mode="operator", inner=inner), **kwargs)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_backend_matches_eager_operator_mode_and_loads_its_state_dict(inner):
    torch.manual_seed(0)
    model = _mixed_model()
    eager = _eager_twin(model)
    x = torch.randn(2, 3, 8, 8)
    compiled = _compiled(model, inner)
    compiled.eval()(x)  # creates u/v (eval: no update), shaped by the input the graph sees
    model.load_state_dict(eager.state_dict(), strict=True)  # eager operator mode -> backend, same u/v
    for (out_c, grads_c), (out_e, grads_e) in zip(_sgd(compiled, x, 3), _sgd(eager, x, 3)):
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads_c, grads_e):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    uv_c, uv_e = _uv(model), _uv(eager)
    assert set(uv_c) == set(uv_e)
    for k in uv_e:
        torch.testing.assert_close(uv_c[k], uv_e[k], rtol=1e-5, atol=1e-5)
    eager.load_state_dict(model.state_dict(), strict=True)


def test_backend_operator_mode_is_1_lipschitz_after_training():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1),
    )
    x = torch.randn(4, 3, 8, 8)
    # the weight the graph uses is W / <u, A(W) v> with the model's u/v: the eager twin's eval weight
    twin = copy.deepcopy(model)
    spectral_norm(twin[0], mode="operator", input_shape=(3, 8, 8))
    spectral_norm(twin[2], mode="operator", input_shape=(4, 4, 4))
    compiled = _compiled(model)
    _sgd(compiled, x, steps=4)
    twin.load_state_dict(model.state_dict(), strict=True)
    norms = [true_operator_norm(twin[0], (3, 8, 8)), true_operator_norm(twin[2], (4, 4, 4))]
    print("backend operator-mode true norms after 4 SGD steps:", norms)
    assert all(0.99 <= n <= 1.01 for n in norms), norms


def test_backend_eval_no_update_and_changed_shape_raises_naming_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
    compiled = _compiled(model, "eager", dynamic=False)
    compiled(torch.randn(2, 2, 6, 6))
    before = _uv(model)
    compiled.eval()(torch.randn(2, 2, 6, 6))
    for k, v in _uv(model).items():
        assert torch.equal(v, before[k]), k
    assert model[0].weight_v.shape == (2, 6, 6)
    with pytest.raises(Exception, match=r"0\.weight.*\(2, 7, 7\)"):
        compiled(torch.randn(2, 2, 7, 7))


def test_backend_operator_mode_with_activation_checkpointing_matches_eager():
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 3, 3, padding=1)
            self.b = nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")

        def forward(self, x):
            return self.b(checkpoint(lambda t: torch.relu(self.a(t)), x, use_reentrant=False))

    torch.manual_seed(0)
    model = Net()
    eager = copy.deepcopy(model)
    spectral_norm(eager.a, mode="operator", input_shape=(2, 5, 5))
    spectral_norm(eager.b, mode="operator", input_shape=(3, 5, 5))
    x = torch.randn(2, 2, 5, 5)
    compiled = _compiled(model)
    compiled.eval()(x)
    model.load_state_dict(eager.state_dict(), strict=True)
    for (out_c, grads_c), (out_e, grads_e) in zip(_sgd(compiled, x, 2), _sgd(eager, x, 2)):
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads_c, grads_e):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    for k, v in _uv(eager).items():
        torch.testing.assert_close(_uv(model)[k], v, rtol=1e-5, atol=1e-5)


def test_backend_operator_mode_resolves_owners_per_call():
    # two instances run the same compiled graph: each gets its own u/v, shaped by the input
    torch.manual_seed(0)
    backend = fx_spectral.backend(mode="operator", inner="eager")
    torch._dynamo.reset()
    models = [nn.Sequential(nn.Conv1d(2, 3, 3, padding=1)) for _ in range(2)]
    twins = [copy.deepcopy(m) for m in models]
    x = torch.randn(2, 2, 6)
    for m in models:
        torch.compile(m, backend=backend)(x)
    for m, twin in zip(models, twins):
        assert m[0].weight_v.shape == (2, 6) and m[0].weight_u.shape == (3, 6)
        spectral_norm(twin[0], mode="operator", input_shape=(2, 6))
        twin.load_state_dict(m.state_dict())
        torch.testing.assert_close(twin.eval()(x), torch.compile(m, backend=backend).eval()(x), rtol=1e-6, atol=1e-6)
    assert not torch.equal(models[0][0].weight_u, models[1][0].weight_u)


def test_backend_mode_field():
    assert fx_spectral.backend(mode="operator").config._operator
    assert fx_spectral.backend(mode="max-autotune").config._inductor_mode == "max-autotune"
    assert fx_spectral.backend(mode="operator", inner="eager").config._inductor_mode is None
    with pytest.raises(ValueError, match="inductor settings"):
        fx_spectral.backend(mode="max-autotune", inner="eager")


class TestOperatorGolden(TestCase):
    """What transform(mode="operator") emits, as code (regenerate with EXPECTTEST_ACCEPT=1)."""

    def test_conv_transpose_operator_mode(self):
        model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1))
        gm = transform(model, mode="operator", example_inputs=(torch.randn(1, 2, 4, 4),))
        self.assertExpectedInline(code(gm.eval_code), """\
def forward(self, input):
    input_1 = input
    _0_weight = getattr(self, "0").weight
    _0_bias = getattr(self, "0").bias
    _0_weight_u = getattr(self, "0").weight_u
    _0_weight_v = getattr(self, "0").weight_v
    _0_weight_operator_normalized = fx_spectral_graph_operator_operator_weight(_0_weight, _0_weight_u, _0_weight_v, input_1, (None, 'constant', (2, 2), (1, 1), (1, 1), True, (0, 0), 1), '0', 1, 1e-12, False)
    _0 = torch.conv_transpose2d(input_1, _0_weight_operator_normalized, _0_bias, (2, 2), (1, 1), (0, 0), 1, (1, 1))
    return _0""")  # noqa: E501
