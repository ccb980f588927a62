"""Conformance of fx_spectral's eager spectral_norm with torch.nn.utils.parametrizations.spectral_norm.

Same initial u/v -> outputs, weight gradients and u/v equal within 1e-6 (float32) over 3 SGD
steps, then in eval; sigma against torch.linalg.matrix_norm(ord=2) after convergence.
"""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import fx_spectral
import fx_spectral.sn_autograd as sn_impl
from fx_spectral.nn import default_dim, spectral_norm, spectral_sigma, weight_matrix

TOL = dict(atol=1e-6, rtol=1e-6)

# (id, module factory, input shape). Grouped, strided, dilated and padded convs included.
CASES = [
    ("linear", lambda: nn.Linear(7, 5), (4, 7)),
    ("linear_3d_input", lambda: nn.Linear(6, 9, bias=False), (2, 3, 6)),
    ("linear_big_batch", lambda: nn.Linear(3, 4), (32, 3)),
    ("conv1d_strided", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    ("conv1d_grouped", lambda: nn.Conv1d(4, 6, 3, groups=2, dilation=2), (2, 4, 12)),
    ("conv2d_strided", lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 9, 9)),
    ("conv2d_grouped", lambda: nn.Conv2d(4, 8, (3, 2), groups=4, padding="same", padding_mode="reflect"), (2, 4, 6, 7)),
    ("conv3d", lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1)), (2, 2, 4, 5, 4)),
    ("conv3d_grouped", lambda: nn.Conv3d(4, 6, 3, groups=2, padding=1, bias=False), (1, 4, 4, 4, 4)),
    ("convT1d_strided", lambda: nn.ConvTranspose1d(4, 3, 3, stride=2, output_padding=1), (2, 4, 7)),
    ("convT1d_grouped", lambda: nn.ConvTranspose1d(6, 4, 4, groups=2, stride=3), (2, 6, 5)),
    ("convT2d_strided", lambda: nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1), (2, 4, 5, 5)),
    ("convT2d_grouped", lambda: nn.ConvTranspose2d(6, 9, 3, groups=3, stride=(2, 1), dilation=2), (2, 6, 4, 5)),
    ("convT3d", lambda: nn.ConvTranspose3d(3, 2, 2, stride=2), (1, 3, 3, 4, 3)),
    ("convT3d_grouped", lambda: nn.ConvTranspose3d(4, 4, (2, 3, 2), groups=4, padding=1), (1, 4, 3, 3, 3)),
]
IDS = [c[0] for c in CASES]


def torch_uv(ref: nn.Module, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    sn = getattr(ref.parametrizations, name)[0]
    return sn._u, sn._v


def make_pair(factory, n_power_iterations=1):
    """(torch-normalized module, fx_spectral-normalized twin with torch's u/v copied in)."""
    base = factory()
    ref = torch_spectral_norm(copy.deepcopy(base), n_power_iterations=n_power_iterations)
    ours = spectral_norm(copy.deepcopy(base), n_power_iterations=n_power_iterations)
    u, v = torch_uv(ref)
    with torch.no_grad():
        ours.weight_u.copy_(u)
        ours.weight_v.copy_(v)
    return ref, ours


def run_and_compare(ref, ours, shape, steps=3, name="weight"):
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    ref_w = getattr(ref.parametrizations, name).original
    ours_w = ours._parameters[name]
    for _ in range(steps):
        x = torch.randn(shape)
        y_ref, y_ours = ref(x), ours(x)
        torch.testing.assert_close(y_ours, y_ref, **TOL)
        u, v = torch_uv(ref, name)
        torch.testing.assert_close(getattr(ours, name + "_u"), u, **TOL)
        torch.testing.assert_close(getattr(ours, name + "_v"), v, **TOL)
        # a loss whose gradient is not proportional to the output
        w_out = torch.linspace(-1, 1, y_ref.numel()).view_as(y_ref)
        (y_ref * w_out + y_ref.square()).mean().backward()
        (y_ours * w_out + y_ours.square()).mean().backward()
        torch.testing.assert_close(ours_w.grad, ref_w.grad, **TOL)
        if getattr(ours, "bias", None) is not None:
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL)
        opt_ref.step(), opt_ours.step()
        opt_ref.zero_grad(), opt_ours.zero_grad()
        torch.testing.assert_close(ours_w, ref_w, **TOL)
    ref.eval(), ours.eval()
    u_before = getattr(ours, name + "_u").clone()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), **TOL)
    assert torch.equal(getattr(ours, name + "_u"), u_before), "eval must not update u"


# ---------------------------------------------------------------------------- both eager paths
#
# A fused Linear / Conv / ConvTranspose forward takes one of two routes, chosen per call by size:
# "output": op(x, W) / sigma + b (_OpOverSigma), when the output is smaller than the weight;
# "weight": op(x, W / sigma) + b (_DivideBySigma, its fused backward), otherwise. Each key property
# (conformance, gradients, double backward) runs on both, the route checked, not assumed.


@contextlib.contextmanager
def eager_paths():
    """Record the route of every fused training/eval forward: yields a list of "output"/"weight"."""
    taken: list[str] = []
    op_over_sigma, sn_weight = sn_impl._op_over_sigma, sn_impl._sn_weight

    def output_route(*args, **kwargs):
        taken.append("output")
        return op_over_sigma(*args, **kwargs)

    def weight_route(*args, **kwargs):
        taken.append("weight")
        return sn_weight(*args, **kwargs)

    with mock.patch.object(sn_impl, "_op_over_sigma", output_route), mock.patch.object(sn_impl, "_sn_weight",
                                                                                        weight_route):
        yield taken


# (id, factory, {path: input shape selecting it})
PATH_CASES = [
    ("linear", lambda: nn.Linear(16, 8), {"output": (2, 16), "weight": (64, 16)}),
    ("linear_3d_input", lambda: nn.Linear(12, 6, bias=False), {"output": (1, 2, 12), "weight": (4, 8, 12)}),
    ("conv2d", lambda: nn.Conv2d(8, 16, 3, stride=2), {"output": (1, 8, 5, 5), "weight": (8, 8, 9, 9)}),
    ("conv1d_grouped", lambda: nn.Conv1d(8, 8, 3, groups=2), {"output": (1, 8, 4), "weight": (8, 8, 12)}),
    ("convT1d", lambda: nn.ConvTranspose1d(16, 8, 3), {"output": (1, 16, 1), "weight": (8, 16, 8)}),
    ("convT2d_grouped", lambda: nn.ConvTranspose2d(8, 8, 3, groups=2, stride=2),
     {"output": (1, 8, 1, 1), "weight": (4, 8, 4, 4)}),
]
PATHS = ["output", "weight"]


def _path_params():
    return [pytest.param(f, shapes[p], p, id=f"{name}-{p}") for name, f, shapes in PATH_CASES for p in PATHS]


@pytest.mark.parametrize("factory,shape,path", _path_params())
def test_matches_torch_on_both_paths(factory, shape, path):
    """Outputs, weight / bias gradients and u/v over 3 SGD steps, then eval, on the route named."""
    ref, ours = make_pair(factory)
    with eager_paths() as taken:
        run_and_compare(ref, ours, shape)
    assert taken and set(taken) == {path}, taken


@pytest.mark.parametrize("factory,shape,path", _path_params())
def test_input_gradient_matches_torch_on_both_paths(factory, shape, path):
    """d out / d x (frozen weights and trainable ones), on the route named."""
    ref, ours = make_pair(factory)
    for requires_grad in (True, False):
        ref.requires_grad_(requires_grad), ours.requires_grad_(requires_grad)
        x = torch.randn(shape)
        grads = []
        with eager_paths() as taken:
            for model in (ref, ours):
                xi = x.clone().requires_grad_()
                y = model(xi)
                y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
                grads.append(xi.grad)
        assert set(taken) == {path}, taken
        torch.testing.assert_close(grads[1], grads[0], **TOL)


@pytest.mark.parametrize("factory,shape,path", _path_params())
def test_double_backward_matches_torch_on_both_paths(factory, shape, path):
    """Hessian-vector product w.r.t. the weight and an input-gradient penalty (create_graph=True)."""
    ref, ours = make_pair(factory)
    x = torch.randn(shape)
    vec = None
    results = []
    with eager_paths() as taken:
        for model, w in ((ref, ref.parametrizations.weight.original), (ours, ours.weight)):
            xi = x.clone().requires_grad_()
            out = model(xi)
            loss = (out.square() * out.detach().sign()).mean()
            gw, gx = torch.autograd.grad(loss, (w, xi), create_graph=True)
            vec = torch.randn_like(gw) if vec is None else vec
            ((gw * vec).sum() + gx.square().sum()).backward()
            results.append((gw.detach(), gx.detach(), w.grad.clone()))
    assert set(taken) == {path}, taken
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    torch.testing.assert_close(results[1][1], results[0][1], **TOL)
    torch.testing.assert_close(results[1][2], results[0][2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory,shape", [c[1:] for c in CASES], ids=IDS)
def test_matches_torch_three_sgd_steps_then_eval(factory, shape):
    ref, ours = make_pair(factory)
    assert ours.weight_u.dtype == torch.float32 and ours.weight_v.dtype == torch.float32
    run_and_compare(ref, ours, shape)


# Outputs smaller than the weight (the eager route may divide the output instead of the weight),
# and unbatched inputs, which torch's modules accept.
SMALL_OUTPUT_CASES = [
    ("linear_unbatched", lambda: nn.Linear(16, 8), (16,)),
    ("conv1d_unbatched", lambda: nn.Conv1d(8, 8, 3), (8, 5)),
    ("conv2d_small_out", lambda: nn.Conv2d(8, 16, 3, stride=2), (1, 8, 5, 5)),
    ("conv2d_unbatched", lambda: nn.Conv2d(4, 8, 3), (4, 5, 5)),
    ("conv3d_grouped_small_out", lambda: nn.Conv3d(8, 8, 3, groups=4, bias=False), (1, 8, 3, 3, 3)),
    ("convT1d_small_out", lambda: nn.ConvTranspose1d(16, 8, 3), (1, 16, 1)),
    ("convT2d_grouped_small_out", lambda: nn.ConvTranspose2d(8, 8, 3, groups=2, stride=2), (1, 8, 1, 1)),
    ("convT2d_unbatched", lambda: nn.ConvTranspose2d(8, 4, 3), (8, 2, 2)),
    ("convT3d_small_out", lambda: nn.ConvTranspose3d(8, 4, 2, bias=False), (1, 8, 1, 1, 1)),
]


@pytest.mark.parametrize("factory,shape", [c[1:] for c in SMALL_OUTPUT_CASES], ids=[c[0] for c in SMALL_OUTPUT_CASES])
def test_matches_torch_small_outputs_and_unbatched(factory, shape):
    ref, ours = make_pair(factory)
    run_and_compare(ref, ours, shape)


def test_matches_torch_with_inplace_activations():
    """An in-place op on the output must not corrupt what backward saved."""
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 8, bias=False),
                         nn.LeakyReLU(0.1, inplace=True), nn.Unflatten(1, (8, 1)),
                         nn.Conv1d(8, 16, 1, bias=False), nn.ReLU(inplace=True))
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    for i in (0, 2, 5):
        torch_spectral_norm(ref[i])
        spectral_norm(ours[i])
        with torch.no_grad():
            ours[i].weight_u.copy_(torch_uv(ref[i])[0]), ours[i].weight_v.copy_(torch_uv(ref[i])[1])
    x = torch.randn(2, 16)
    yr, yo = ref(x), ours(x)
    torch.testing.assert_close(yo, yr, **TOL)
    g = torch.randn_like(yr)
    yr.backward(g), yo.backward(g)
    for i in (0, 2, 5):
        torch.testing.assert_close(ours[i].weight.grad, ref[i].parametrizations.weight.original.grad, **TOL)


@pytest.mark.parametrize(
    "factory,shape", [CASES[i][1:] for i in (0, 4, 10)], ids=[CASES[i][0] for i in (0, 4, 10)]
)
def test_matches_torch_n_power_iterations_3(factory, shape):
    ref, ours = make_pair(factory, n_power_iterations=3)
    run_and_compare(ref, ours, shape)


@pytest.mark.parametrize("factory,shape", [c[1:] for c in CASES[::2]], ids=IDS[::2])
def test_same_seed_same_initial_uv(factory, shape):
    """Same RNG state -> the same initial u/v as torch (same draws, same 15 + 1 warm-up steps)."""
    base = factory()
    torch.manual_seed(123)
    ref = torch_spectral_norm(copy.deepcopy(base))
    torch.manual_seed(123)
    ours = spectral_norm(copy.deepcopy(base))
    u, v = torch_uv(ref)
    torch.testing.assert_close(ours.weight_u, u, **TOL)
    torch.testing.assert_close(ours.weight_v, v, **TOL)


def test_default_dim_and_state_layout():
    for factory, _ in [c[1:] for c in CASES]:
        m = factory()
        w = m.weight
        spectral_norm(m)
        assert m._sn_params["weight"].dim == (1 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 0)
        assert m.weight is w and m._parameters["weight"] is w, "raw parameter keeps its identity"
        h = w.shape[m._sn_params["weight"].dim]
        assert m.weight_u.shape == (h,) and m.weight_v.shape == (w.numel() // h,)
        keys = list(m.state_dict())
        assert keys[-2:] == ["weight_u", "weight_v"] and "weight" in keys
        assert isinstance(m, type(m)._sn_base) and default_dim(m) == m._sn_params["weight"].dim


def test_two_forwards_before_one_backward_matches_torch():
    """GAN discriminator pattern: D(real) and D(fake) in training, then one backward."""
    factory = lambda: nn.Conv2d(3, 4, 3, stride=2)  # noqa: E731
    ref, ours = make_pair(factory)
    real, fake = torch.randn(2, 3, 7, 7), torch.randn(2, 3, 7, 7)
    loss_ref = ref(real).mean() - ref(fake).square().mean()
    loss_ours = ours(real).mean() - ours(fake).square().mean()
    torch.testing.assert_close(loss_ours, loss_ref, **TOL)
    loss_ref.backward()
    loss_ours.backward()
    torch.testing.assert_close(ours.weight.grad, ref.parametrizations.weight.original.grad, **TOL)
    u, v = torch_uv(ref)
    torch.testing.assert_close(ours.weight_u, u, **TOL)


def test_generic_modules_match_torch_bilinear_and_two_names():
    """Non-fused path: nn.Bilinear (3-D weight) and a custom module with two normalized parameters."""
    base = nn.Bilinear(3, 4, 5)
    ref = torch_spectral_norm(copy.deepcopy(base))
    ours = spectral_norm(copy.deepcopy(base))
    with torch.no_grad():
        ours.weight_u.copy_(torch_uv(ref)[0]), ours.weight_v.copy_(torch_uv(ref)[1])
    opt_r, opt_o = torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(ours.parameters(), lr=0.1)
    for _ in range(3):
        a, b = torch.randn(6, 3), torch.randn(6, 4)
        yr, yo = ref(a, b), ours(a, b)
        torch.testing.assert_close(yo, yr, **TOL)
        yr.square().mean().backward(), yo.square().mean().backward()
        torch.testing.assert_close(ours.weight.grad, ref.parametrizations.weight.original.grad, **TOL)
        opt_r.step(), opt_o.step(), opt_r.zero_grad(), opt_o.zero_grad()
    assert isinstance(ours.weight, nn.Parameter), "outside forward, .weight is the raw parameter"

    class TwoMats(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(6, 4))
            self.b = nn.Parameter(torch.randn(6, 2, 3))
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return (x @ self.a.t()) @ self.b.flatten(1) * self.scale

    base = TwoMats()
    ref = torch_spectral_norm(torch_spectral_norm(copy.deepcopy(base), "a"), "b", dim=2)
    ours = spectral_norm(copy.deepcopy(base), "a")
    spectral_norm(ours, "b", dim=2)
    with torch.no_grad():
        for n in "ab":
            getattr(ours, n + "_u").copy_(torch_uv(ref, n)[0])
            getattr(ours, n + "_v").copy_(torch_uv(ref, n)[1])
    assert ours._sn_params["b"].dim == 2
    for n in "ab":
        u, v = torch_uv(ref, n)
        w_mat = weight_matrix(getattr(ref.parametrizations, n).original.detach(), ours._sn_params[n].dim)
        torch.testing.assert_close(spectral_sigma(ours, n), torch.dot(u, w_mat @ v), **TOL)
    x = torch.randn(5, 4)
    for _ in range(2):
        yr, yo = ref(x), ours(x)
        torch.testing.assert_close(yo, yr, atol=1e-5, rtol=1e-6)
        yr.sum().backward(), yo.sum().backward()
        for n in "ab":
            torch.testing.assert_close(getattr(ours, n).grad, getattr(ref.parametrizations, n).original.grad,
                                       atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(getattr(ours, n + "_u"), torch_uv(ref, n)[0], **TOL)


def test_name_tuple_equals_two_calls():
    class TwoMats(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(6, 4))
            self.b = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return x @ self.a.t() @ self.b.t()

    base = TwoMats()
    torch.manual_seed(1)
    one = spectral_norm(copy.deepcopy(base), ("a", "b"))
    torch.manual_seed(1)
    two = spectral_norm(spectral_norm(copy.deepcopy(base), "a"), "b")
    assert list(one.state_dict()) == ["a", "b", "a_u", "a_v", "b_u", "b_v"]
    assert one.state_dict().keys() == two.state_dict().keys()
    for k in one.state_dict():
        torch.testing.assert_close(one.state_dict()[k], two.state_dict()[k], atol=0, rtol=0)
    x = torch.randn(3, 4)
    torch.testing.assert_close(one(x), two(x), atol=0, rtol=0)
    assert fx_spectral.is_spectral_normalized(one, "a") and fx_spectral.is_spectral_normalized(one, "b")
    assert not fx_spectral.is_spectral_normalized(one, "c")


def _converge(m, shape, forwards=3):
    with torch.no_grad():
        for _ in range(forwards):
            m(torch.randn(shape))


@pytest.mark.parametrize("factory,shape", [c[1:] for c in CASES], ids=IDS)
def test_sigma_matches_matrix_norm_after_convergence(factory, shape):
    m = spectral_norm(factory(), n_power_iterations=100)
    _converge(m, shape)
    w_mat = weight_matrix(m.weight.detach().double(), m._sn_params["weight"].dim)
    exact = torch.linalg.matrix_norm(w_mat, ord=2)
    sigma = fx_spectral.spectral_sigma(m)
    assert sigma.dtype == torch.float32 and not sigma.requires_grad
    torch.testing.assert_close(sigma.double(), exact, rtol=1e-4, atol=0)
    # the normalized weight then has spectral norm 1
    m.eval()
    w_bar = fx_spectral.nn.normalize_weight(m.weight, m.weight_u, m.weight_v,
                                            dim=m._sn_params["weight"].dim, training=False)
    got = torch.linalg.matrix_norm(weight_matrix(w_bar.detach().double(), m._sn_params["weight"].dim), ord=2)
    torch.testing.assert_close(got, torch.ones((), dtype=torch.float64), rtol=1e-4, atol=0)


def test_sigma_tracks_weight_updates():
    """spectral_sigma reads the current weight, and the estimate does not move outside training forwards."""
    m = spectral_norm(nn.Linear(8, 8), n_power_iterations=50)
    _converge(m, (2, 8))
    s0 = spectral_sigma(m)
    with torch.no_grad():
        m.weight.mul_(3.0)
    torch.testing.assert_close(spectral_sigma(m), 3 * s0, rtol=1e-6, atol=0)
    u = m.weight_u.clone()
    for _ in range(3):
        spectral_sigma(m)
        _ = m.weight
    assert torch.equal(m.weight_u, u), "attribute access and spectral_sigma must not run power iteration"


def _gan_discriminators():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    conv = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(16, 32, 3),
                         nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(32 * 2 * 2, 1))
    return [("mlp", mlp, (4, 16)), ("conv", conv, (2, 3, 8, 8))]


@pytest.mark.parametrize("which", ["mlp", "conv"])
def test_gradient_penalty_matches_torch(which):
    """R1 / WGAN-GP: a penalty on d D(x) / d x, differentiated w.r.t. the weights (double backward)."""
    _, base, shape = next(c for c in _gan_discriminators() if c[0] == which)
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    layers = [i for i, m in enumerate(base) if isinstance(m, (nn.Linear, nn.Conv2d))]
    for i in layers:
        torch_spectral_norm(ref[i])
        spectral_norm(ours[i])
        with torch.no_grad():
            ours[i].weight_u.copy_(torch_uv(ref[i])[0]), ours[i].weight_v.copy_(torch_uv(ref[i])[1])
    for _ in range(2):
        x = torch.randn(shape)
        grads = []
        for model in (ref, ours):
            xi = x.clone().requires_grad_()
            out = model(xi)
            (g,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
            loss = out.mean() + 10 * g.square().sum(dim=tuple(range(1, g.dim()))).mean()
            loss.backward()
            grads.append([(m.parametrizations.weight.original if m is ref[i] else m.weight).grad.clone()
                          for i, m in ((i, model[i]) for i in layers)])
            model.zero_grad()
        for g_ref, g_ours in zip(*grads):
            torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory,shape", [
    (lambda: nn.Linear(16, 8), (2, 16)),  # output smaller than the weight
    (lambda: nn.Linear(4, 8), (64, 4)),  # output larger than the weight
    (lambda: nn.Conv2d(8, 16, 3), (1, 8, 4, 4)),
    (lambda: nn.ConvTranspose1d(4, 4, 3, stride=2), (8, 4, 16)),
], ids=["linear_small_out", "linear_big_out", "conv2d", "convT1d"])
def test_hessian_vector_product_wrt_weight_matches_torch(factory, shape):
    """Double backward w.r.t. the weight (create_graph=True, then backward again)."""
    ref, ours = make_pair(factory)
    x = torch.randn(shape)
    vec = None
    results = []
    for model, w in ((ref, ref.parametrizations.weight.original), (ours, ours.weight)):
        out = model(x)
        loss = (out.square() * out.detach().sign()).mean()
        (gw,) = torch.autograd.grad(loss, w, create_graph=True)
        vec = torch.randn_like(gw) if vec is None else vec
        (gw * vec).sum().backward()
        results.append((gw.detach(), w.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-5)


def test_frozen_discriminator_and_no_grad_training_forwards_match_torch():
    """Training G through a frozen D (grad w.r.t. the input only); D forwards under no_grad /
    inference_mode in training mode still update u/v, as torch's do."""
    base = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.Flatten(),
                         nn.Linear(32 * 2 * 2, 1))
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    for i in (0, 2, 4):
        torch_spectral_norm(ref[i])
        spectral_norm(ours[i])
        with torch.no_grad():
            ours[i].weight_u.copy_(torch_uv(ref[i])[0]), ours[i].weight_v.copy_(torch_uv(ref[i])[1])
    ref.requires_grad_(False), ours.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        model(xi).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], **TOL)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            torch.testing.assert_close(ours(x), ref(x), **TOL)
        for i in (0, 2, 4):
            torch.testing.assert_close(ours[i].weight_u, torch_uv(ref[i])[0], **TOL)


@pytest.mark.parametrize("case", ["convT_output_size", "linear_empty_batch", "conv_empty_batch",
                                  "conv_channels_last", "linear_noncontiguous"])
def test_matches_torch_edge_inputs(case):
    factory, x, kwargs = {
        "convT_output_size": (lambda: nn.ConvTranspose2d(16, 8, 3, stride=2), torch.randn(1, 16, 2, 2),
                              dict(output_size=[6, 6])),
        "linear_empty_batch": (lambda: nn.Linear(8, 4), torch.randn(0, 8), {}),
        "conv_empty_batch": (lambda: nn.Conv2d(8, 16, 3), torch.randn(0, 8, 4, 4), {}),
        "conv_channels_last": (lambda: nn.Conv2d(8, 16, 3),
                               torch.randn(1, 8, 4, 4).to(memory_format=torch.channels_last), {}),
        "linear_noncontiguous": (lambda: nn.Linear(8, 16), torch.randn(8, 3).t(), {}),
    }[case]
    ref, ours = make_pair(factory)
    y_ref, y_ours = ref(x, **kwargs), ours(x, **kwargs)
    assert y_ours.shape == y_ref.shape
    torch.testing.assert_close(y_ours, y_ref, **TOL)
    g = torch.randn_like(y_ref)
    y_ref.backward(g), y_ours.backward(g)
    torch.testing.assert_close(ours.weight.grad, ref.parametrizations.weight.original.grad, atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(ours.weight_u, torch_uv(ref)[0], **TOL)
