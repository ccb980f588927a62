"""operator_norm: lower (attained) and upper (proven) against the dense Jacobian's exact SVD (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fx_spectral import operator_norm, spectral_norm
from fx_spectral.operator_norms import conv_operator_norm, conv_upper_bound, padding_map_norm

# many tiny ops: a second intra-op thread only adds synchronisation (and crawls on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")


def exact_norm(module: nn.Module, shape) -> float:
    """Largest singular value of the dense Jacobian of ``module`` (float64, bias cancels out)."""
    m = copy.deepcopy(module).double().eval()
    x = torch.zeros(1, *shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: m(z), x).reshape(-1, math.prod(shape))
    return float(torch.linalg.matrix_norm(jac, ord=2))


# (module factory, input shape, zero/circular at n >= 2k: the 1.10 target applies)
CASES = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8), True),
    "conv2d-nobias-5x5": (lambda: nn.Conv2d(2, 3, 5, padding=2, bias=False), (2, 10, 10), True),
    "conv2d-stride2": (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), (3, 8, 8), True),
    "conv2d-k4-stride2": (lambda: nn.Conv2d(3, 4, 4, padding=1, stride=2), (3, 8, 8), True),
    "conv2d-dilation2": (lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2), (4, 10, 10), True),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 8, 8), True),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 7, 7), True),
    "conv2d-valid-rect": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(1, 2)), (2, 7, 8), True),
    "conv2d-same-even": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (3, 8, 8), True),
    "conv2d-same-dil": (lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2), (3, 8, 8), False),
    "conv2d-circular": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 8, 8), True),
    "conv2d-circular-s2": (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2, padding_mode="circular"), (3, 8, 8), True),
    "conv2d-circular-s3": (lambda: nn.Conv2d(2, 2, 3, padding=1, stride=3, padding_mode="circular"), (2, 7, 7), True),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 8, 8), False),
    "conv2d-replicate": (lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="replicate"), (3, 8, 8), False),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, padding=2), (3, 16), True),
    "conv1d-stride3": (lambda: nn.Conv1d(3, 4, 3, stride=3, padding=1), (3, 17), True),
    "conv1d-s2-dil3": (lambda: nn.Conv1d(2, 3, 3, stride=2, dilation=3, padding=3), (2, 15), True),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 6, 6, 6), True),
    "conv3d-s2-groups": (lambda: nn.Conv3d(2, 4, 3, padding=1, stride=2, groups=2), (2, 6, 6, 6), True),
    "convT2d-s2": (lambda: nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1), (4, 6, 6), True),
    "convT2d-outpad": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (4, 5, 5), True),
    "convT1d-dil": (lambda: nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1, output_padding=1, dilation=2), (4, 7),
                    True),
    "convT3d-groups": (lambda: nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1, groups=2), (2, 3, 3, 3), False),
    "convT2d-groups-dil": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=1, padding=2, dilation=2, groups=2), (4, 6, 6),
                           True),
    "linear": (lambda: nn.Linear(7, 5), (3, 7), True),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", sorted(CASES))
def test_brackets_the_exact_norm(case):
    factory, shape, tight = CASES[case]
    m = factory()
    exact = exact_norm(m, shape)
    r = operator_norm(m, shape)
    assert r.lower <= exact * (1 + 1e-12), (r, exact)
    assert r.lower >= exact * (1 - 1e-3), (r, exact)
    assert r.upper >= exact, (r, exact)
    if tight:
        assert r.upper <= 1.10 * exact, (r, exact)
    # Without the dense SVD the structured bound must still be sound (the proof is independent).
    structured = operator_norm(m, shape, dense_limit=0)
    assert structured.upper >= exact, (structured, exact)


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_structured_bound_is_tight_on_larger_inputs(mode):
    # n = 12 >= 2k, dense disabled: the circulant bound alone.
    m = nn.Conv2d(4, 5, 3, padding=1, padding_mode=mode)
    exact = exact_norm(m, (4, 12, 12))
    up = operator_norm(m, (4, 12, 12), dense_limit=0).upper
    assert exact <= up <= (1 + 1e-8 if mode == "circular" else 1.05) * exact


def _power_iteration(op, shape, n_iter: int) -> float:
    v = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(n_iter):
        v = v / v.norm()
        x = v.clone().requires_grad_(True)
        (v,) = torch.autograd.grad(op(x), x, op(x).detach())
    v = v / v.norm()
    return float(op(v).norm())


def test_16_channel_3x3_at_32x32_within_5_percent():
    m = nn.Conv2d(16, 16, 3, padding=1)
    r = operator_norm(m, (16, 32, 32))
    w = m.weight.detach().double()
    reference = _power_iteration(lambda x: F.conv2d(x, w, padding=1), (16, 32, 32), 300)
    assert r.upper <= 1.05 * reference
    assert r.lower >= reference * (1 - 1e-3)
    assert r.lower <= r.upper


def test_linear_is_exact():
    m = nn.Linear(20, 9)
    true = float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
    r = operator_norm(m, (20,))
    assert r.method == "exact-svd"
    assert r.lower == pytest.approx(true, rel=1e-12) and true <= r.upper <= true * (1 + 2e-9)


def test_spectral_normalized_module_uses_the_normalized_weight():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    plain = copy.deepcopy(conv)
    spectral_norm(conv)
    conv.eval()
    from fx_spectral import spectral_sigma

    with torch.no_grad():
        plain.weight.div_(spectral_sigma(conv))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(conv(x), plain(x))  # the weight we certify is the one forward uses
    a, b = operator_norm(conv, (3, 8, 8)), operator_norm(plain, (3, 8, 8))
    assert a.upper == pytest.approx(b.upper, rel=1e-6) and a.lower == pytest.approx(b.lower, rel=1e-6)
    assert a.lower > 1.2  # matrix-mode SN: reshaped norm 1, operator norm well above


def test_lazy_modules():
    m = nn.LazyConv2d(4, 3, padding=1)
    with pytest.raises(ValueError, match="Lazy module has not run yet"):
        operator_norm(m, (3, 8, 8))
    m(torch.randn(1, 3, 8, 8))
    assert operator_norm(m, (3, 8, 8)).upper >= exact_norm(m, (3, 8, 8))
    lin = nn.LazyLinear(3)
    with pytest.raises(ValueError, match="Lazy"):
        operator_norm(lin, (5,))


def test_errors_name_the_module_and_expectation():
    with pytest.raises(ValueError, match=r"Conv2d: expected input_shape \(C_in=3"):
        operator_norm(nn.Conv2d(3, 4, 3), (4, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        operator_norm(nn.Conv2d(3, 4, 5), (3, 3, 3))
    with pytest.raises(TypeError, match="got ReLU"):
        operator_norm(nn.ReLU(), (3,))
    with pytest.raises(ValueError, match="in_features=5"):
        operator_norm(nn.Linear(5, 2), (4,))


def test_global_rng_untouched_and_deterministic():
    m = nn.Conv1d(2, 2, 3, padding=1)
    state = torch.get_rng_state()
    a, b = operator_norm(m, (2, 40)), operator_norm(m, (2, 40))
    assert torch.equal(state, torch.get_rng_state())
    assert a == b


def test_functional_form_matches_module_and_transposed_adjoint():
    w = torch.randn(4, 3, 3, 3)
    m = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, bias=False)
    with torch.no_grad():
        m.weight.copy_(w)
    r_mod = operator_norm(m, (4, 5, 5))
    r_fn = conv_operator_norm(w, (4, 5, 5), stride=2, padding=1, output_padding=1, transposed=True)
    assert r_mod.upper == r_fn.upper and r_mod.output_shape == (3, 10, 10)
    # the adjoint conv (same weight, read as a conv from 3 to 4 channels... on the 10x10 grid) has the same norm
    up, _, out = conv_upper_bound(w, (3, 10, 10), stride=2, padding=1)
    assert out == (4, 5, 5) and up == pytest.approx(r_mod.upper, rel=1e-9)


def test_padding_map_norms():
    assert padding_map_norm(8, 1, 1, "reflect") == pytest.approx(math.sqrt(2))
    assert padding_map_norm(8, 2, 2, "replicate") == pytest.approx(math.sqrt(3))
    assert padding_map_norm(8, 1, 1, "circular") == pytest.approx(math.sqrt(2))
