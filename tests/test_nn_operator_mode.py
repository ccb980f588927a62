"""Operator-mode spectral normalization: sigma of the convolution operator, checked against the
dense Jacobian's exact SVD (float64, small shapes), gradcheck, precision, state and compile."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fx_spectral import apply_spectral_norm, remove_spectral_norm, spectral_norm, spectral_sigma
from tests.conftest import assert_same_snapshot, snapshot

# (factory, one example's input shape): 3 -> 4 channels, 3x3 on 8x8, stride 2, groups 2,
# transposed, 1-d, 3-d, and the non-zero padding modes.
CASES = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8)),
    "stride2": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 8, 8)),
    "groups2": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2), (4, 8, 8)),
    "transposed": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 4, 4)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (3, 12)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3, padding=1), (3, 4, 4, 4)),
    "transposed1d": (lambda: nn.ConvTranspose1d(3, 4, 3, padding=1), (3, 10)),
    "circular": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 8, 8)),
    "reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 6, 6)),
    "replicate": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), (3, 6, 6)),
    "same_even": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (3, 6, 6)),
    "dilated_groups": (lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), (4, 7, 7)),
    "transposed_dilated_groups": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, dilation=2, groups=2), (4, 4, 4)),
}


def true_operator_norm(module: nn.Module, shape) -> float:
    """The exact largest singular value of the module's linear part for one example (float64 SVD of the
    dense Jacobian, built column by column as m(e_i) - m(0)).

    The module runs in eval mode on a float64 copy, so a normalized module computes with its current
    W / sigma and does not update u/v."""
    m = copy.deepcopy(module).double().eval()
    n = torch.Size(shape).numel()
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
        jac_t = (m(basis) - m(torch.zeros(1, *shape, dtype=torch.float64))).reshape(n, -1)
    return torch.linalg.matrix_norm(jac_t, ord=2).item()


def _train(module: nn.Module, shape, steps: int = 8) -> list[float]:
    """SGD on a regression to random targets (lr 0.01: each step moves the weight by ~0.5-1.3%).
    Returns the true operator norm of the normalized conv after each step (u/v as the next forward sees them)."""
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    x = torch.randn(8, *shape)
    y = 3 * torch.randn_like(module(x))
    norms = []
    for _ in range(steps):
        (module(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        module(x)  # the training forward that follows the step updates u/v once
        norms.append(true_operator_norm(module, shape))
    return norms


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", list(CASES))
def test_operator_mode_is_1_lipschitz_during_training(case):
    make, shape = CASES[case]
    m = spectral_norm(make(), mode="operator")
    norms = _train(m, shape)
    assert m.weight_v.shape == shape and m.weight_u.shape[0] == m.out_channels
    assert 0.99 < min(norms) and max(norms) <= 1.01, f"{case}: true operator norms {norms}"


@pytest.mark.parametrize("case", ["conv2d", "stride2", "groups2", "transposed", "conv3d", "circular"])
def test_matrix_mode_is_not_1_lipschitz_in_the_same_setup(case):
    # The motivation: torch's reshaped-kernel norm leaves the same convs well above 1.
    make, shape = CASES[case]
    assert min(_train(spectral_norm(make()), shape, steps=2)) > 1.2, case


@pytest.mark.parametrize("case", ["conv2d", "transposed", "circular", "reflect"])
def test_spectral_sigma_is_the_operator_norm(case):
    make, shape = CASES[case]
    m = make()
    plain = copy.deepcopy(m)
    spectral_norm(m, mode="operator", input_shape=shape)
    for _ in range(30):
        m(torch.randn(1, *shape))
    assert spectral_sigma(m).dtype == torch.float32
    assert spectral_sigma(m).item() == pytest.approx(true_operator_norm(plain, shape), rel=1e-3)


def test_gradient_flows_through_operator_sigma_gradcheck():
    m = spectral_norm(nn.Conv2d(2, 3, 3, stride=2, padding=1, groups=1).double(), mode="operator",
                      input_shape=(2, 5, 5)).eval()  # eval: u, v fixed, so f(W) is a function
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    w = m.weight.detach().clone().requires_grad_()
    torch.autograd.gradcheck(lambda w: functional_call(m, {"weight": w}, (x,)), (w,))
    # and the sigma term is really there: without it the gradient would differ.
    out = functional_call(m, {"weight": w}, (x,)).sum()
    g = torch.autograd.grad(out, w)[0]
    sigma = spectral_sigma(m).double()
    g_const = torch.autograd.grad(nn.functional.conv2d(x, w / sigma, m.bias, 2, 1).sum(), w)[0]
    assert not torch.allclose(g, g_const, atol=1e-6)


def test_double_backward_gradient_penalty():
    # R1 / WGAN-GP style: the input gradient's norm, differentiated w.r.t. the weight (sigma included).
    m = spectral_norm(nn.Conv2d(2, 3, 3, padding=1).double(), mode="operator", input_shape=(2, 5, 5)).eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = m.weight.detach().clone().requires_grad_()

    def penalty(w):
        out = functional_call(m, {"weight": w}, (x,))
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return gx.square().sum()

    torch.autograd.gradcheck(penalty, (w,))


def test_gradcheck_transposed():
    m = spectral_norm(nn.ConvTranspose1d(2, 3, 3, stride=2).double(), mode="operator", input_shape=(2, 4)).eval()
    x = torch.randn(2, 2, 4, dtype=torch.float64)
    w = m.weight.detach().clone().requires_grad_()
    torch.autograd.gradcheck(lambda w: functional_call(m, {"weight": w}, (x,)), (w,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_keep_float32_state(dtype):
    ref = spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode="operator", input_shape=(3, 8, 8))
    low = copy.deepcopy(ref).to(dtype)
    assert low.weight.dtype == dtype and low.weight_u.dtype == low.weight_v.dtype == torch.float32
    x = torch.randn(2, 3, 8, 8)
    out = low(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref.weight.data.copy_(low.weight.float())
    ref(x)
    torch.testing.assert_close(low.weight_u, ref.weight_u, atol=1e-5, rtol=1e-4)
    assert spectral_sigma(low).dtype == torch.float32


def test_autocast_does_not_downcast_the_power_iteration():
    m = spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode="operator", input_shape=(3, 8, 8))
    twin = copy.deepcopy(m)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    twin(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(m.weight_u, twin.weight_u, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.weight_v, twin.weight_v, atol=1e-6, rtol=1e-6)


def test_state_round_trips_and_eval_does_not_update():
    x = torch.randn(2, 3, 8, 8)
    m = spectral_norm(nn.Conv2d(3, 4, 3, stride=2, padding=1), mode="operator")
    assert sorted(m.state_dict()) == ["bias", "weight", "weight_u", "weight_v"]
    unrun = copy.deepcopy(m)  # before the first forward: u/v not created yet, the copy creates its own
    assert unrun(x).shape == (2, 4, 4, 4) and unrun.weight_v.shape == (3, 8, 8)
    m(x)
    m.eval()
    before = (m.weight_u.clone(), m.weight_v.clone())
    want = m(x)
    torch.testing.assert_close((m.weight_u, m.weight_v), before, atol=0, rtol=0)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(m), torch.load(buf, weights_only=False)):
        torch.testing.assert_close(clone(x), want)
    # A fresh operator-mode module takes u/v (and so the input shape) from the checkpoint.
    fresh = spectral_norm(nn.Conv2d(3, 4, 3, stride=2, padding=1), mode="operator")
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.eval()(x), want)
    # One set up for another input shape refuses the checkpoint (u/v shapes differ).
    other = spectral_norm(nn.Conv2d(3, 4, 3, stride=2, padding=1), mode="operator", input_shape=(3, 6, 6))
    with pytest.raises(RuntimeError, match="weight_v"):
        other.load_state_dict(m.state_dict())


def test_changed_input_shape_raises_naming_module_and_shapes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3))
    apply_spectral_norm(model, mode="operator")
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"0\.weight.*\(8, 8\).*\(10, 10\)"):
        model(torch.randn(1, 3, 10, 10))


def test_zero_weight_gives_zeros_not_nan():
    m = spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode="operator", input_shape=(3, 8, 8))
    nn.init.zeros_(m.weight)
    nn.init.zeros_(m.bias)
    x = torch.randn(2, 3, 8, 8)
    out = m(x)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isfinite(m.weight_u).all() and torch.isfinite(m.weight_v).all()
    assert torch.equal(m.eval()(x), torch.zeros_like(out))


@pytest.mark.parametrize("case", ["conv2d", "transposed"])
def test_compiles_without_graph_breaks(case):
    make, shape = CASES[case]
    m = spectral_norm(make(), mode="operator", input_shape=shape)
    x = torch.randn(2, *shape)
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_training_step_matches_eager():
    make, shape = CASES["stride2"]
    m = spectral_norm(make(), mode="operator", input_shape=shape)
    eager = copy.deepcopy(m)
    x = torch.randn(2, *shape)
    compiled = torch.compile(m, fullgraph=True)
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    torch.testing.assert_close(m.weight.grad, eager.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.weight_u, eager.weight_u, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_torch_export_matches_eager(training):
    m = spectral_norm(nn.Conv2d(2, 3, 3, padding=1, stride=2), mode="operator", input_shape=(2, 8, 8)).train(training)
    x = torch.randn(2, 2, 8, 8)
    exported = torch.export.export(copy.deepcopy(m), (x,)).module()
    torch.testing.assert_close(exported(x), m(x))


def test_linear_operator_mode_is_matrix_mode():
    torch.manual_seed(1)
    a = spectral_norm(nn.Linear(5, 3), mode="operator")
    torch.manual_seed(1)
    b = spectral_norm(nn.Linear(5, 3))
    x = torch.randn(2, 5)
    torch.testing.assert_close(a(x), b(x))
    assert a.weight_u.shape == (3,) and a._sn_params["weight"].mode == "matrix"


def test_lazy_conv_operator_mode():
    m = spectral_norm(nn.LazyConv2d(4, 3, padding=1), mode="operator")
    _train(m, (3, 8, 8))
    assert type(m).__name__ == "SpectralConv2d" and m.weight_v.shape == (3, 8, 8)
    assert true_operator_norm(m, (3, 8, 8)) <= 1.01


def test_conv_transpose_output_size_must_match_the_state():
    m = spectral_norm(nn.ConvTranspose2d(3, 4, 3, stride=2), mode="operator")
    x = torch.randn(1, 3, 4, 4)
    assert m(x, output_size=[10, 10]).shape[-2:] == (10, 10)
    assert m.weight_u.shape == (4, 10, 10)
    with pytest.raises(ValueError, match="output_padding"):
        m(x, output_size=[9, 9])


def test_remove_bakes_the_operator_normalized_weight():
    m = spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode="operator", input_shape=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    want = m.eval()(x)
    remove_spectral_norm(m)
    assert type(m) is nn.Conv2d
    torch.testing.assert_close(m(x), want)
    unrun = spectral_norm(nn.Conv2d(3, 4, 3), mode="operator")
    with pytest.raises(ValueError, match="first forward"):
        remove_spectral_norm(unrun)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="spectral"), r"encoder\.0\.weight: expected mode 'matrix'.*'spectral'"),
        (dict(mode="operator", name="bias"), r"encoder\.0\.bias"),
    ],
)
def test_bad_options_name_the_module_path_and_change_nothing(kwargs, match):
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Conv2d(3, 4, 3)))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        apply_spectral_norm(model, **kwargs)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="operator", input_shape=(2, 8, 8)), r"in_channels.*\(2, 8, 8\)"),
        (dict(mode="operator", input_shape=(3, 8)), r"input_shape"),
        (dict(mode="matrix", input_shape=(3, 8, 8)), r"only used with mode='operator'"),
        (dict(mode="operator", dim=1), r"dim"),
        (dict(mode=None), r"Conv2d\.weight: expected mode"),
    ],
)
def test_spectral_norm_bad_operator_options(kwargs, match):
    m = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=match):
        spectral_norm(m, **kwargs)
    assert type(m) is nn.Conv2d and "weight_u" not in m._buffers
