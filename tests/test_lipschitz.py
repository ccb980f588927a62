"""lipschitz_bound against exact norms and against an empirical lower bound (gradient ascent)."""

import math

import pytest
import torch
from torch import nn

from fx_spectral.lipschitz import _attention_factors, lipschitz_bound, lipschitz_terms, rms_operator_norms
from fx_spectral.models import LipschitzTransformer, LipschitzTransformerConfig, ScaledGELU, ball_project

# many tiny ops: a second intra-op thread only adds synchronisation (and crawls on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")


def _token_norm(z: torch.Tensor) -> torch.Tensor:
    """max_i ||z_i||_2 per batch element for z of shape (B, T, d)."""
    return z.norm(dim=-1).amax(dim=-1)


def empirical_lipschitz(f, shape, *, radius=None, steps=100, restarts=6, seed=0) -> float:
    """Lower bound of Lip(f): gradient ascent on ||f(x) - f(y)|| / ||x - y|| over (x, y).

    radius=None: l2 norms of flattened vectors, unbounded inputs. Otherwise inputs (B, T, d) whose
    rows stay within l2 norm ``radius`` (projected after every step), norm max_i ||.||_2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((restarts, *shape), generator=g, dtype=torch.float64)
    d = 0.1 * torch.randn((restarts, *shape), generator=g, dtype=torch.float64)

    def proj(z):
        return z if radius is None else z * (radius / z.norm(dim=-1, keepdim=True)).clamp(max=1)

    x = proj(x if radius is None else radius * x).requires_grad_()
    y = proj(x.detach() + d).requires_grad_()
    opt = torch.optim.Adam([x, y], lr=0.02 * (radius or 1.0))
    best = 0.0
    for _ in range(steps):
        diff_out, diff_in = f(x) - f(y), x - y
        if radius is None:
            ratio = diff_out.flatten(1).norm(dim=1) / diff_in.flatten(1).norm(dim=1)
        else:
            ratio = _token_norm(diff_out) / _token_norm(diff_in)
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
        with torch.no_grad():
            x.copy_(proj(x))
            y.copy_(proj(y))
    return best


# ---------------------------------------------------------------------------------------------
# sequential nets
# ---------------------------------------------------------------------------------------------


def test_linear_bound_is_the_exact_spectral_norm_and_attained():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).double()
    bound = lipschitz_bound(lin)
    assert bound == pytest.approx(torch.linalg.svdvals(lin.weight.detach())[0].item(), rel=1e-12)
    # For a linear map the bound is tight: the ascent must reach it (shows the ascent works).
    emp = empirical_lipschitz(lin, (7,), steps=150)
    assert emp <= bound * (1 + 1e-9)
    assert emp == pytest.approx(bound, rel=1e-3)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.Tanh(), ScaledGELU(), nn.SiLU(), nn.LeakyReLU(0.3)])
def test_sequential_mlp_bound_above_empirical(act):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 16), act, nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3)).double()
    svd = [torch.linalg.svdvals(m.weight.detach())[0].item() for m in net.modules() if isinstance(m, nn.Linear)]
    bound = lipschitz_bound(net)
    act_lip = {nn.GELU: 1.12890415, nn.SiLU: 1.09983933, ScaledGELU: 1.12890415 / 1.1289}.get(type(act), 1.0)
    assert bound == pytest.approx(math.prod(svd) * act_lip, rel=1e-9)
    emp = empirical_lipschitz(net, (6,))
    assert 0 < emp <= bound


def test_sequential_errors():
    with pytest.raises(TypeError, match=r"0 is a Conv2d"):
        lipschitz_bound(nn.Sequential(nn.Conv2d(1, 1, 3)))
    with pytest.raises(TypeError, match=r"no Lipschitz constant known for 1 \(Softmax\)"):
        lipschitz_bound(nn.Sequential(nn.Linear(2, 2), nn.Softmax(dim=-1)))
    with pytest.raises(TypeError, match="expected nn.Sequential"):
        lipschitz_bound(nn.LSTM(2, 2))
    with pytest.raises(ValueError, match="input_radius only applies"):
        lipschitz_bound(nn.Linear(2, 2), input_radius=1.0)


# ---------------------------------------------------------------------------------------------
# the paper-style transformer
# ---------------------------------------------------------------------------------------------


def _sharp_transformer(seed=0, radius=3.0, ball=None):
    """Tiny model with large Q/K so that attention is far from linear on the input ball."""
    torch.manual_seed(seed)
    cfg = LipschitzTransformerConfig(
        vocab_size=11, dim=16, n_layers=2, n_heads=2, max_seq_len=6, embed_max_norm=radius, attn_input_radius=ball
    )
    model = LipschitzTransformer(cfg).double()
    with torch.no_grad():
        for block in model.layers:
            block.attn.wq.weight.mul_(2)
            block.attn.wk.weight.mul_(2)
            block.attn.pos_bias.normal_(std=2.0)  # input-independent: must not matter for the bound
        model.lm_head.weight.normal_()
    return model


def test_attention_bound_above_empirical_and_softmax_term_needed():
    model = _sharp_transformer()
    attn = model.layers[0].attn
    lip, gain = _attention_factors(attn, 3.0)
    emp = empirical_lipschitz(attn, (5, 16), radius=3.0)
    assert emp <= lip
    # The value path alone (||W_o|| sqrt(sum_h ||W_v^h||^2) == gain) is NOT a bound here: a bound
    # that forgot the softmax term would fail this test.
    assert emp > 1.5 * gain


def test_transformer_bound_above_empirical():
    model = _sharp_transformer(1)
    bound = lipschitz_bound(model)
    assert math.isfinite(bound)
    emp = empirical_lipschitz(model.forward_embeddings, (5, 16), radius=3.0, seed=1)
    assert 0 < emp <= bound


def test_transformer_terms_match_exact_norms():
    model = _sharp_transformer()
    a = model.config.residual_weight
    terms = lipschitz_terms(model)
    assert [t.name for t in terms] == ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp", "lm_head"]
    mlp = model.layers[0].mlp
    prod = (torch.linalg.svdvals(mlp.fc_out.weight)[0] * torch.linalg.svdvals(mlp.fc_in.weight)[0]).item()
    assert terms[1].factor == pytest.approx((1 - a) + a * prod * 1.12890415 / 1.1289, rel=1e-9)
    assert terms[-1].factor == pytest.approx(torch.linalg.svdvals(model.lm_head.weight)[0].item(), rel=1e-9)
    # attention with one head, by hand
    wq, wk, wv, wo = (
        w.weight.detach()
        for w in (model.layers[0].attn.wq, model.layers[0].attn.wk, model.layers[0].attn.wv, model.layers[0].attn.wo)
    )
    s = lambda m: torch.linalg.svdvals(m)[0].item()  # noqa: E731
    rows = [slice(0, 8), slice(8, 16)]  # two heads of 8
    b = [s(wv[h]) * (1 + 2 * s(wq[h]) * s(wk[h]) * 3.0**2 / 8) for h in rows]
    expected = min(s(wo) * math.hypot(*b), sum(s(wo[:, h]) * bh for h, bh in zip(rows, b)))
    assert terms[0].factor == pytest.approx((1 - a) + a * expected, rel=1e-9)
    assert math.prod(t.factor for t in terms) == pytest.approx(lipschitz_bound(model), rel=1e-12)


def test_ball_projection():
    x = torch.tensor([[[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(ball_project(x, 1.0), torch.tensor([[[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]]).double())
    # 1-Lipschitz per token: the Jacobian of one row has spectral norm <= 1 (outside and inside)
    for row in (torch.tensor([3.0, -1.0, 2.0]), torch.tensor([0.1, 0.2, -0.3])):
        J = torch.autograd.functional.jacobian(lambda r: ball_project(r, 1.0), row.double())
        assert torch.linalg.matrix_norm(J, ord=2) <= 1 + 1e-12
    with pytest.raises(ValueError, match="attn_input_radius"):
        LipschitzTransformerConfig(vocab_size=5, dim=8, n_heads=2, attn_input_radius=0.0)


def test_ball_projection_bound_above_empirical_and_smaller():
    # the projection (radius 1.5 < the tokens' 3) is active from the first attention on
    model = _sharp_transformer(1, ball=1.5)
    plain = _sharp_transformer(1)
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = 3.0 * torch.nn.functional.normalize(torch.randn(2, 5, 16, dtype=torch.float64), dim=-1)
    assert not torch.allclose(model.forward_embeddings(x), plain.forward_embeddings(x))  # it does act
    bound = lipschitz_bound(model)
    assert bound < lipschitz_bound(plain)  # the softmax term is paid at radius 1.5, not 3
    emp = empirical_lipschitz(model.forward_embeddings, (5, 16), radius=3.0, seed=1)
    assert 0 < emp <= bound
    # the attention factor is the one of radius min(R_propagated, 1.5); the radius after it mixes both
    a = model.config.residual_weight
    terms = lipschitz_terms(model)
    lip, gain = _attention_factors(model.layers[0].attn, 1.5)
    assert terms[0].factor == pytest.approx((1 - a) + a * lip, rel=1e-12)
    assert terms[0].radius == pytest.approx((1 - a) * 3.0 + a * gain * 1.5, rel=1e-12)
    lip1, _ = _attention_factors(model.layers[1].attn, min(terms[1].radius, 1.5))
    assert terms[2].factor == pytest.approx((1 - a) + a * lip1, rel=1e-12)


def test_embedding_rows_respect_the_radius():
    model = _sharp_transformer(radius=0.5)
    with torch.no_grad():
        model.tok_emb.weight.mul_(10)
    x = model.tok_emb(torch.arange(11).view(1, 11))
    assert x.norm(dim=-1).max().item() <= 0.5 * (1 + 1e-6)


def test_transformer_radius_errors_and_rms_norms():
    cfg = LipschitzTransformerConfig(vocab_size=5, dim=8, n_layers=1, n_heads=2, embed_max_norm=None)
    model = LipschitzTransformer(cfg)
    with pytest.raises(ValueError, match="only Lipschitz on bounded inputs"):
        lipschitz_bound(model)
    assert lipschitz_bound(model, input_radius=1.0) > 0
    norms = rms_operator_norms(model)
    # fresh hidden weights are orthogonal with RMS->RMS norm 1
    assert norms["layers.0.mlp.fc_in.weight"] == pytest.approx(1.0, rel=1e-5)
    assert norms["layers.0.mlp.fc_out.weight"] == pytest.approx(1.0, rel=1e-5)
    w = model.lm_head.weight.detach()
    assert norms["lm_head.weight"] == pytest.approx(torch.linalg.svdvals(w)[0].item() * math.sqrt(8 / 5), rel=1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        LipschitzTransformerConfig(vocab_size=5, dim=10, n_heads=3)
    with pytest.raises(ValueError, match="embed_max_norm"):
        LipschitzTransformerConfig(vocab_size=5, dim=8, n_heads=2, embed_max_norm=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        LipschitzTransformerConfig(vocab_size=0)


def test_lipschitz_bound_agrees_with_certify_on_mlp():
    # the no-input shortcut and the general graph certificate give the same l2 -> l2 bound
    from fx_spectral import certify

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3)
    ).eval()
    ref = math.prod(float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2)) for m in net.modules()
                    if isinstance(m, nn.Linear))
    got, cert = lipschitz_bound(net), certify(net, torch.randn(4, 6)).bound
    assert got == pytest.approx(ref, rel=1e-12)
    assert cert == pytest.approx(got, rel=1e-6)


def _sup(f, lo: float = 0.0, hi: float = 6.0) -> float:
    """sup of a smooth function with one top on [lo, hi]: a dense float64 grid, then golden section."""
    xs = torch.linspace(lo, hi, 200001, dtype=torch.float64)
    i = int(torch.argmax(f(xs)))
    a, b = float(xs[max(i - 1, 0)]), float(xs[min(i + 1, len(xs) - 1)])
    g = (math.sqrt(5) - 1) / 2
    at = lambda x: float(f(torch.tensor(x, dtype=torch.float64)))  # noqa: E731
    for _ in range(200):
        c, d = b - g * (b - a), a + g * (b - a)
        a, b = (a, d) if at(c) > at(d) else (c, b)
    return at((a + b) / 2)


def test_activation_slope_constants_are_the_exact_sup_rounded_up():
    """The one slope table (lipschitz_bound and certify read it) holds the exact sup |f'|, rounded up."""
    from fx_spectral import certify_rules, lipschitz

    def d_gelu_tanh(x):
        x = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.gelu(x, approximate="tanh").sum(), x)
        return g

    r = math.sqrt(2)  # d/dx [x Phi(x)] = Phi(x) + x phi(x) peaks where phi(x) (2 - x^2) = 0
    exact = {
        "GELU_SLOPE": 0.5 * (1 + math.erf(r / math.sqrt(2))) + r * math.exp(-1.0) / math.sqrt(2 * math.pi),
        "SILU_SLOPE": _sup(lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x)))),
        "GELU_TANH_SLOPE": _sup(d_gelu_tanh),
    }
    for name, value in exact.items():
        const = getattr(lipschitz, name)
        assert value <= const < value * (1 + 1e-8), name
        assert getattr(certify_rules, name) is const  # certify reads the same table
    assert certify_rules.activation_module_slope is lipschitz.activation_module_slope
    assert lipschitz.SELU_SLOPE == pytest.approx(1.0507009873554805 * 1.6732632423543772, rel=1e-15)
