"""certify: bound >= attained lower bound on a zoo; exact where the model is one op; clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_snapshot, snapshot
from torch import nn

from fx_spectral import apply_spectral_norm, certify, operator_norm, spectral_norm
from fx_spectral.certify_rules import GELU_SLOPE, GELU_TANH_SLOPE, SILU_SLOPE
from fx_spectral.lipschitz import lipschitz_bound
from fx_spectral.models import LipschitzTransformer, LipschitzTransformerConfig

# many tiny ops: a second intra-op thread only adds synchronisation (and crawls on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")


class ResBlock(nn.Module):
    def __init__(self, c: int = 6):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + 0.5 * self.c2(F.relu(self.bn(self.c1(x)))))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.b1, self.b2, self.head = nn.Conv2d(3, 6, 3, padding=1), ResBlock(), ResBlock(), nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.b2(self.b1(self.stem(x))).mean((2, 3)))


class TwoBranch(nn.Module):
    """Concatenation, reflect padding, GELU/tanh, a constant scale: traces with symbolic_trace."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 3, 3, padding=1)
        self.b = nn.Conv1d(2, 3, 5, padding=2, padding_mode="reflect")
        self.fc = nn.Linear(6 * 12, 4)

    def forward(self, x):
        y = torch.cat([torch.tanh(self.a(x)), F.gelu(self.b(x)) / 2], dim=1)
        return self.fc(y.flatten(1))


class Untraceable(nn.Module):
    """Control flow on a shape: symbolic_trace fails, torch.export takes over (aten ops)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 4, 2, 1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        if x.shape[1] == 3:
            x = F.max_pool2d(F.relu(self.bn(self.c(x))), 2)
        x = self.up(x)
        x = F.avg_pool2d(x, 2) * 0.5 + F.adaptive_avg_pool2d(x, 4)
        return self.fc(F.leaky_relu(torch.cat([x, -x], 1)[:, :4].flatten(1), 0.1))


def dcgan_discriminator() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16), nn.LeakyReLU(0.2),
        nn.Conv2d(16, 1, 4, 1, 0, bias=False), nn.Flatten(),
    )


ZOO = {
    "mlp": (lambda: nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.SiLU(), nn.Linear(24, 3)),
            (6, 10)),
    "cnn": (lambda: nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ELU(), nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(),
        nn.Dropout(), nn.Linear(8 * 2 * 2, 10)), (6, 1, 14, 14)),
    "resnet": (ResNet, (4, 3, 8, 8)),
    "two-branch": (TwoBranch, (4, 2, 12)),
    "dcgan-d": (dcgan_discriminator, (4, 3, 16, 16)),
    "untraceable": (Untraceable, (3, 3, 8, 8)),
}


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_()
                m.weight.uniform_(0.5, 1.5)


@pytest.mark.parametrize("normalized", [False, True], ids=["plain", "spectral_norm"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_bound_dominates_attained_lower_bound(name, normalized):
    factory, shape = ZOO[name]
    model = factory()
    _randomize_bn(model)
    if normalized:
        apply_spectral_norm(model)
    model.eval()
    x = torch.randn(shape)
    before = snapshot(model)
    cert = certify(model, x)
    attained = cert.attained(model, x, steps=15)
    assert_same_snapshot(before, snapshot(model))
    assert 0 < attained <= cert.bound, (attained, cert.bound)
    assert cert.traced_by == ("torch.export" if name == "untraceable" else "symbolic_trace")
    assert cert.rows[-1].bound == cert.bound
    assert str(cert).startswith("Lipschitz certificate")


def test_single_linear_is_exact_and_attained():
    lin = nn.Linear(12, 7).eval()
    cert = certify(lin, torch.randn(5, 12))
    true = float(torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2))
    assert true <= cert.bound <= true * (1 + 2e-9)
    assert cert.attained(lin, torch.randn(5, 12), steps=5) >= 0.999 * true


def test_single_conv_is_its_operator_norm():
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2).eval()
    cert = certify(conv, torch.randn(2, 3, 8, 8))
    r = operator_norm(conv, (3, 8, 8))
    assert cert.bound == pytest.approx(r.upper, rel=1e-12)
    assert cert.attained(conv, torch.randn(2, 3, 8, 8), steps=10) >= 0.98 * r.lower


def test_spectral_normalized_weights_are_the_ones_certified():
    lin = spectral_norm(nn.Linear(8, 8)).eval()
    from fx_spectral import spectral_sigma

    w_bar = lin.weight.detach().double() / float(spectral_sigma(lin))
    true = float(torch.linalg.matrix_norm(w_bar, ord=2))
    assert certify(lin, torch.randn(2, 8)).bound == pytest.approx(true, rel=1e-6)


@pytest.mark.parametrize(
    "pool",
    [nn.AvgPool2d(2), nn.AvgPool2d(3, stride=2, padding=1),
     nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
     nn.AvgPool2d(3, stride=2, ceil_mode=True), nn.AvgPool2d(2, divisor_override=3), nn.AdaptiveAvgPool2d((3, 2)),
     nn.AvgPool1d(4, stride=3, padding=2)],
    ids=str,
)
def test_average_pooling_factor_is_exact(pool):
    shape = (2, 1, 9) if isinstance(pool, nn.AvgPool1d) else (2, 1, 7, 9)
    cert = certify(pool, torch.randn(shape))
    jac = torch.autograd.functional.jacobian(lambda z: pool(z), torch.zeros(1, *shape[1:], dtype=torch.float64))
    true = float(torch.linalg.matrix_norm(jac.reshape(-1, math.prod(shape[1:])), ord=2))
    assert cert.bound == pytest.approx(true, rel=1e-8) and cert.bound >= true


def test_overlapping_max_pool_bound_is_attained():
    pool = nn.MaxPool2d(3, stride=1, padding=1)
    cert = certify(pool, torch.randn(2, 1, 6, 6))
    assert cert.bound == pytest.approx(3.0)  # every entry sits in 3 x 3 windows
    x, y = torch.zeros(1, 1, 6, 6), torch.zeros(1, 1, 6, 6)
    y[0, 0, 2, 2] = 1.0  # one spike shows up in 9 outputs: ratio sqrt(9)
    assert (pool(y) - pool(x)).norm() / (y - x).norm() == pytest.approx(3.0)
    assert certify(nn.MaxPool2d(2), torch.randn(2, 1, 6, 6)).bound == 1.0


def test_activation_slopes_are_upper_bounds():
    x = torch.linspace(-8, 8, 400001, dtype=torch.float64, requires_grad=True)
    for f, slope in ((F.gelu, GELU_SLOPE), (F.silu, SILU_SLOPE), (lambda t: F.gelu(t, approximate="tanh"),
                                                               GELU_TANH_SLOPE)):
        (g,) = torch.autograd.grad(f(x).sum(), x)
        assert float(g.abs().max()) <= slope <= float(g.abs().max()) * (1 + 1e-6)
    assert GELU_SLOPE == pytest.approx(1.1289, abs=1e-4) and SILU_SLOPE == pytest.approx(1.0998, abs=1e-4)


def test_lipschitz_transformer():
    cfg = LipschitzTransformerConfig(vocab_size=20, dim=16, n_layers=2, n_heads=2, max_seq_len=8)
    model = LipschitzTransformer(cfg).eval()
    tokens = torch.randint(0, 20, (3, 8))
    before = snapshot(model)
    cert = certify(model, tokens)
    assert cert.bound == pytest.approx(math.sqrt(8) * lipschitz_bound(model), rel=1e-12)
    assert cert.input_radius == cfg.embed_max_norm
    attained = cert.attained(model, tokens, steps=10)
    assert 0 < attained <= cert.bound
    assert_same_snapshot(before, snapshot(model))  # nn.Embedding(max_norm) would renormalize in place


class _Wrap(nn.Module):
    def __init__(self, fn, *mods):
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(mods)

    def forward(self, x):
        return self.fn(self, x)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), r"node '_1' \(module '1'\): no Lipschitz bound is known "
                                                          "for LayerNorm"),
        (nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1)), "no Lipschitz bound is known for Softmax"),
        (_Wrap(lambda s, x: torch.exp(x)), r"node 'exp' .*no Lipschitz bound is known for the op 'exp'"),
        (_Wrap(lambda s, x: torch.relu(x) * torch.tanh(x)), "both operands of mul depend on the input"),
        (_Wrap(lambda s, x: x - x.mean(0)), "mean over dim 0 mixes the batch"),
        (_Wrap(lambda s, x: x.reshape(-1)), "does not keep the batch"),
        (_Wrap(lambda s, x: x.transpose(0, 1)), "mixes examples"),
    ],
    ids=["layernorm", "softmax", "exp", "product", "batch-mean", "batch-reshape", "transpose"],
)
def test_unknown_ops_raise_naming_node_and_op(model, match):
    with pytest.raises(TypeError, match=match):
        certify(model.eval(), torch.randn(3, 4))


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode.*model.eval\(\)"):
        certify(model, torch.randn(3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        certify(nn.Identity().eval(), torch.ones(2, 3, dtype=torch.long))


def test_one_example_batch_still_checks_the_batch():
    model = _Wrap(lambda s, x: x.sum(0, keepdim=True)).eval()
    with pytest.raises(TypeError, match="mixes the batch"):
        certify(model, torch.randn(1, 4))
    assert certify(copy.deepcopy(nn.Linear(4, 2)).eval(), torch.randn(1, 4)).bound > 0


def test_torch_parametrized_spectral_norm_is_read_in_eval():
    conv = torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(2, 3, 3, padding=1))
    model = nn.Sequential(conv, nn.ReLU())
    with pytest.raises(ValueError, match="training mode"):
        certify(model, torch.randn(2, 2, 6, 6))
    model.eval()
    plain = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
    assert certify(model, torch.randn(2, 2, 6, 6)).bound == pytest.approx(operator_norm(plain, (2, 6, 6)).upper)


def test_in_place_ops():
    lin = nn.Linear(4, 4)

    def residual(s, x):
        out = s.mods[0](x)
        out += x  # out is read by nobody else: fine
        return out

    assert certify(_Wrap(residual, lin).eval(), torch.randn(2, 4)).bound > 1

    def aliased(s, x):
        y = s.mods[0](x)
        z = y
        z += x  # overwrites y, which the return also reads
        return y + z

    # symbolic_trace records `z += x` as an out-of-place add: the graph computes another function.
    with pytest.raises(TypeError, match="does not reproduce"):
        certify(_Wrap(aliased, lin).eval(), torch.randn(2, 4))


def test_functional_spellings_get_their_factors():
    w = torch.randn(4, 2, 3, 3)

    def fn(s, x):
        y = F.pad(x, (1, 1, 1, 1), mode="reflect")  # every edge entry copied twice per dim: factor 2
        y = F.conv2d(y, w, padding="same")
        y = y.unflatten(1, (-1, 2)).sort(dim=2).values.flatten(1, 2)  # GroupSort: 1
        return torch.cat([y.mean((2, 3)), -y.sum(dim=(2, 3))], dim=1)

    cert = certify(_Wrap(fn).eval(), torch.randn(3, 2, 6, 6))
    conv = cert.rows[1].factor
    assert cert.rows[0].factor == pytest.approx(2.0)
    assert conv == pytest.approx(operator_norm(_conv_same(w), (2, 8, 8)).upper, rel=1e-9)
    expected = 2.0 * conv * math.sqrt((1 / 8) ** 2 + 8**2)  # mean / sum over 64 entries: 1/8 and 8
    assert cert.bound == pytest.approx(expected, rel=1e-9)
    assert cert.attained(_Wrap(fn).eval(), torch.randn(3, 2, 6, 6), steps=10) <= cert.bound


def _conv_same(w):
    conv = nn.Conv2d(2, 4, 3, padding="same", bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    return conv
