"""Eager spectral_norm in everyday use: copies, checkpoints, dtype moves, torch.compile, removal,
recursive application, zero weights, generic modules."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fx_spectral
from fx_spectral import (
    apply_spectral_norm,
    is_spectral_normalized,
    remove_spectral_norm,
    spectral_norm,
    spectral_sigma,
)
from fx_spectral.nn import normalize_weight, weight_matrix

TOL = dict(atol=1e-6, rtol=1e-6)


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2), nn.Flatten(),
                         nn.Linear(2 * 5 * 5, 5))


def _trained(steps=2):
    model = _net()
    apply_spectral_norm(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.randn(2, 3, 9, 9)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model


def _same_behaviour(a, b):
    """Same state, same training outputs and u/v updates, same eval outputs (a and b are left in train)."""
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, atol=0, rtol=0, msg=k)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(b(x), a(x), **TOL)
    torch.testing.assert_close(b[0].weight_u, a[0].weight_u, **TOL)
    a.eval(), b.eval()
    torch.testing.assert_close(b(x), a(x), **TOL)
    a.train(), b.train()


# ---------------------------------------------------------------------------- copies and checkpoints


def test_deepcopy_is_independent_and_equivalent():
    model = _trained()
    clone = copy.deepcopy(model)
    assert type(clone[0]) is type(model[0]) and clone[0]._sn_params == model[0]._sn_params
    assert clone[0].weight is not model[0].weight and clone[0].weight_u is not model[0].weight_u
    _same_behaviour(model, clone)
    u = model[0].weight_u.clone()
    clone(torch.randn(2, 3, 9, 9))
    assert torch.equal(model[0].weight_u, u), "the copy owns its u/v"


def test_deepcopy_keeps_self_references():
    """A bound-method hook (or any self-reference) must point at the copy, not at a phantom module."""

    class Remember(nn.Linear):
        def remember(self, module, args, out):
            self.last = out

    m = Remember(3, 2)
    m.register_forward_hook(m.remember)
    m.me = [m]
    spectral_norm(m)
    c = copy.deepcopy(m)
    assert c.me[0] is c
    y = c(torch.randn(1, 3))
    assert c.last is y and not hasattr(m, "last")


def test_torch_save_load_whole_model():
    model = _trained()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded[4]) is type(model[4]) and type(loaded[4])._sn_base is nn.Linear
    _same_behaviour(model, loaded)
    # a plain state_dict checkpoint is weights_only-safe
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd.keys() == model.state_dict().keys()


def test_state_dict_round_trip_strict():
    src = _trained(3)
    dst = _net()
    apply_spectral_norm(dst)
    missing = dst.load_state_dict(src.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    _same_behaviour(src, dst)
    assert [k for k in src.state_dict() if k.endswith(("_u", "_v"))] == [
        "0.weight_u", "0.weight_v", "2.weight_u", "2.weight_v", "4.weight_u", "4.weight_v"]
    # a plain model refuses the extra u/v in strict mode, accepts the weights otherwise
    plain = _net()
    with pytest.raises(RuntimeError, match="weight_u"):
        plain.load_state_dict(src.state_dict(), strict=True)
    plain.load_state_dict(src.state_dict(), strict=False)
    torch.testing.assert_close(plain[0].weight, src[0].weight, atol=0, rtol=0)


def test_to_dtype_keeps_uv_float32_and_values():
    m = spectral_norm(nn.Linear(6, 5))
    u = m.weight_u.clone()
    w = m.weight
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.float32):
        m.to(dtype)
        assert m.weight.dtype == dtype and m.weight_u.dtype == torch.float32 and m.weight_v.dtype == torch.float32
        assert torch.equal(m.weight_u, u), f"u lost precision through {dtype}"
    m.half()
    assert m.weight_u.dtype == torch.float32
    m.float()
    assert m.weight is w, "module.to keeps the Parameter object (optimizer-safe)"
    m.to("cpu", torch.float64)
    assert m(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64
    assert m.weight_u.dtype == torch.float32 and list(m.state_dict()) == ["weight", "bias", "weight_u", "weight_v"]


def test_optimizer_built_before_normalization_keeps_training_the_same_parameter():
    m = nn.Linear(4, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    spectral_norm(m)
    before = m.weight.detach().clone()
    m(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert not torch.equal(m.weight, before)
    assert m.weight is opt.param_groups[0]["params"][0]


def test_forward_updates_once_per_training_forward():
    m = spectral_norm(nn.Linear(8, 8), n_power_iterations=2)
    u0, v0 = m.weight_u.clone(), m.weight_v.clone()
    _ = m.weight, m.weight, spectral_sigma(m)
    assert torch.equal(m.weight_u, u0)
    m(torch.randn(1, 8))
    w = m.weight.detach()
    u, v = u0, v0
    for _ in range(2):
        u = torch.nn.functional.normalize(w @ v, dim=0)
        v = torch.nn.functional.normalize(w.t() @ u, dim=0)
    torch.testing.assert_close(m.weight_u, u, **TOL)
    torch.testing.assert_close(m.weight_v, v, **TOL)


# ---------------------------------------------------------------------------- torch.compile


def test_compile_zero_graph_breaks():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.ConvTranspose1d(3, 2, 2, stride=2), nn.Flatten(),
                          nn.Linear(2 * 8, 3))
    apply_spectral_norm(model)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 2, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # a Lazy model that has never run: dynamo materializes it (u/v included) before tracing
    lazy = nn.Sequential(nn.LazyConv1d(3, 3), nn.Flatten(), nn.LazyLinear(2))
    apply_spectral_norm(lazy)
    explanation = torch._dynamo.explain(lazy)(torch.randn(2, 2, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert type(lazy[2])._sn_base is nn.Linear and lazy[2].weight_u.shape == (2,)
    # the generic path (a property serves W / sigma while forward runs)
    bil = spectral_norm(nn.Bilinear(3, 4, 2))
    explanation = torch._dynamo.explain(bil)(torch.randn(2, 3), torch.randn(2, 4))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compile_default_backend_matches_eager_without_recompiles():
    from torch._dynamo.utils import counters

    eager = spectral_norm(nn.Linear(6, 4))
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)  # default backend (inductor)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(3, 6)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.weight_u, eager.weight_u, atol=1e-5, rtol=1e-5)
        ye.square().sum().backward(), yc.square().sum().backward()
        torch.testing.assert_close(model.weight.grad, eager.weight.grad, atol=1e-5, rtol=1e-5)
        opt_e.step(), opt_c.step(), opt_e.zero_grad(), opt_c.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1, "one graph for all training steps (no recompiles)"
    assert not counters["graph_break"]
    # eval: the compiled module stops updating u/v
    model.eval(), eager.eval()
    u = model.weight_u.clone()
    x = torch.randn(3, 6)
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.weight_u, u)


# ---------------------------------------------------------------------------- remove_spectral_norm


@pytest.mark.parametrize("factory,shape", [
    (lambda: nn.Linear(5, 4), (2, 5)),
    (lambda: nn.ConvTranspose2d(3, 4, 3, groups=1), (1, 3, 4, 4)),
    (lambda: nn.Bilinear(3, 2, 4), None),
], ids=["linear", "convT2d", "bilinear"])
def test_remove_bake(factory, shape):
    m = spectral_norm(factory())
    base = type(m)._sn_base
    args = (torch.randn(2, 3), torch.randn(2, 2)) if shape is None else (torch.randn(shape),)
    for _ in range(2):
        m(*args)
    w = m.weight
    m.eval()
    expected = m(*args)
    u = m.weight_u.clone()
    sigma = spectral_sigma(m)
    raw = m.weight.detach().clone()
    assert remove_spectral_norm(m) is m
    assert type(m) is base and not is_spectral_normalized(m)
    assert "weight_u" not in m._buffers and "_sn_params" not in m.__dict__
    assert "weight_u" not in m.state_dict()
    assert m.weight is w, "bake writes in place: same Parameter object"
    torch.testing.assert_close(m.weight.detach(), raw / sigma, **TOL)
    torch.testing.assert_close(m(*args), expected, **TOL)
    m.train()
    torch.testing.assert_close(m(*args), expected, **TOL)  # no more normalization, no update
    del u


def test_remove_without_bake_and_one_of_two_names():
    m = spectral_norm(nn.Linear(4, 4))
    raw = m.weight.detach().clone()
    remove_spectral_norm(m, bake=False)
    assert torch.equal(m.weight, raw) and type(m) is nn.Linear

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(3, 3) * 4)
            self.b = nn.Parameter(torch.randn(3, 3) * 4)

        def forward(self, x):
            return x @ self.a @ self.b

    t = spectral_norm(Two(), ("a", "b"))
    x = torch.randn(2, 3)
    t.eval()
    y = t(x)
    remove_spectral_norm(t, "a")
    assert is_spectral_normalized(t, "b") and not is_spectral_normalized(t, "a")
    assert list(t.state_dict()) == ["a", "b", "b_u", "b_v"]
    torch.testing.assert_close(t(x), y, **TOL)
    remove_spectral_norm(t, "b")
    assert type(t) is Two
    torch.testing.assert_close(t(x), y, **TOL)
    # and it can be normalized again
    spectral_norm(t, "b")
    assert is_spectral_normalized(t, "b")


# ---------------------------------------------------------------------------- apply_spectral_norm


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.inner = nn.Sequential(nn.Conv1d(8, 8, 1), nn.GELU(), nn.Linear(8, 8, bias=False))
        self.head = nn.Linear(8, 10)

    def forward(self, idx):
        h = self.norm(self.emb(idx))
        h = self.proj(h)
        h = self.inner[0](h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.inner[2](self.inner[1](h)))


def test_apply_recursive_leaves_embedding_and_layernorm_alone():
    model = Block()
    seen = []

    def filter_fn(module, fqn):
        seen.append((type(module).__name__, fqn))
        return fqn != "head"

    done = apply_spectral_norm(model, filter_fn=filter_fn)
    assert done == ["proj.weight", "inner.0.weight", "inner.2.weight"]
    assert seen == [("Linear", "proj"), ("Conv1d", "inner.0"), ("Linear", "inner.2"), ("Linear", "head")]
    assert type(model.emb) is nn.Embedding and type(model.norm) is nn.LayerNorm and type(model.head) is nn.Linear
    assert not any(k.startswith(("emb.", "norm.", "head.")) and k.endswith("_u") for k in model.state_dict())
    # second pass: already normalized ones are skipped, only the head is new
    assert apply_spectral_norm(model) == ["head.weight"]
    assert apply_spectral_norm(model) == []
    assert model.proj._sn_params["weight"].n_power_iterations == 1
    y = model(torch.randint(0, 10, (2, 5)))
    y.sum().backward()
    assert model.emb.weight.grad is not None


def test_apply_root_module_and_options():
    m = nn.Linear(4, 4)
    assert apply_spectral_norm(m, n_power_iterations=4, eps=1e-6) == ["weight"]
    assert m._sn_params["weight"].n_power_iterations == 4 and m._sn_params["weight"].eps == 1e-6
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    spectral_norm(model[1], n_power_iterations=3)
    assert apply_spectral_norm(model) == ["0.weight"]
    assert model[1]._sn_params["weight"].n_power_iterations == 3, "skipped, not re-configured"


def test_apply_shared_module_normalized_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert apply_spectral_norm(model) == ["0.weight"]
    assert model[2] is model[0] and list(model.state_dict()).count("0.weight_u") == 1


def test_apply_custom_linear_subclass_uses_generic_path():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(ScaledLinear(4, 3))
    assert apply_spectral_norm(model) == ["0.weight"]
    model.eval()
    x = torch.randn(2, 4)
    w_bar = normalize_weight(model[0].weight, model[0].weight_u, model[0].weight_v, training=False)
    torch.testing.assert_close(model(x), 2 * nn.functional.linear(x, w_bar, model[0].bias), **TOL)
    assert isinstance(model[0], ScaledLinear)


# ---------------------------------------------------------------------------- zero weights


@pytest.mark.parametrize("factory,shape", [
    (lambda: nn.Linear(6, 4), (3, 6)),
    (lambda: nn.ConvTranspose1d(3, 2, 3), (2, 3, 5)),
], ids=["linear", "convT1d"])
def test_zero_weight_gives_zeros_then_recovers(factory, shape):
    m = factory()
    with torch.no_grad():
        m.weight.zero_()
        m.bias.fill_(0.5)
    spectral_norm(m, n_power_iterations=5)
    assert torch.isfinite(m.weight_u).all() and m.weight_u.norm() > 0.5
    for _ in range(2):
        y = m(torch.randn(shape))
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, torch.full_like(y, 0.5), atol=0, rtol=0)
        y.sum().backward()
        assert torch.isfinite(m.weight.grad).all()
        m.weight.grad = None
    assert torch.isfinite(m.weight_u).all() and m.weight_u.norm() > 0.5, "u/v must not collapse to zero"
    m.eval()
    assert torch.isfinite(m(torch.randn(shape))).all()
    m.train()
    # the weight grows from zero: sigma tracks it
    with torch.no_grad():
        m.weight.copy_(torch.randn_like(m.weight))
    for _ in range(40):
        m(torch.randn(shape))
    exact = torch.linalg.matrix_norm(weight_matrix(m.weight.detach().double(), m._sn_params["weight"].dim), ord=2)
    torch.testing.assert_close(spectral_sigma(m).double(), exact, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------- generic modules


def test_generic_module_forward_serves_normalized_weight_only_inside_forward():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(4, 3) * 5)
            self.w2 = nn.Parameter(torch.randn(2, 4) * 5)

        def forward(self, x):
            seen["w1"], seen["w2"] = self.w1, self.w2
            return x @ self.w1.t() @ self.w2.t()

    m = spectral_norm(Probe(), ("w1", "w2"), n_power_iterations=30)
    assert isinstance(m.w1, nn.Parameter)
    keys = set(m.__dict__)
    m(torch.randn(1, 3))
    assert set(m.__dict__) == keys, "forward leaves no state behind"
    assert not isinstance(seen["w1"], nn.Parameter)
    for n in ("w1", "w2"):
        assert torch.linalg.matrix_norm(seen[n].detach(), ord=2).item() == pytest.approx(1.0, rel=1e-4)
    assert m.w1 is m._parameters["w1"]
    # deepcopy and remove work on the generic path too
    c = copy.deepcopy(m)
    assert type(c) is type(m) and torch.equal(c.w1_u, m.w1_u)
    remove_spectral_norm(c, ("w1", "w2"))
    assert type(c) is type(m)._sn_base
    with pytest.raises(RuntimeError):
        m(torch.randn(1, 4))  # a failing forward
    assert set(m.__dict__) == keys, "the normalized weights are not left behind after an error"
    assert isinstance(m.w1, nn.Parameter)


def test_package_root_exports():
    for name in ("spectral_norm", "remove_spectral_norm", "apply_spectral_norm", "is_spectral_normalized",
                 "spectral_sigma"):
        assert getattr(fx_spectral, name) is getattr(fx_spectral.nn, name)


# ---------------------------------------------------------------------------- torch.func


def test_torch_func_transforms_match_torch():
    """jacrev / vmap (local Lipschitz estimates) and func.grad over functional_call, train and eval."""
    from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4), nn.Unflatten(-1, (4, 1)),
                         nn.Conv1d(4, 8, 1))
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    for i in (0, 2, 4):
        torch_spectral_norm(ref[i])
        spectral_norm(ours[i])
        with torch.no_grad():
            ours[i].weight_u.copy_(ref[i].parametrizations.weight[0]._u)
            ours[i].weight_v.copy_(ref[i].parametrizations.weight[0]._v)
    x, xs = torch.randn(16), torch.randn(5, 16)
    for mode in ("train", "eval"):
        ref.train(mode == "train"), ours.train(mode == "train")
        torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(ref)(x), **TOL)
        torch.testing.assert_close(torch.func.vmap(torch.func.jacrev(ours))(xs),
                                   torch.func.vmap(torch.func.jacrev(ref))(xs), **TOL)
        g_ref = torch.func.grad(lambda p: torch.func.functional_call(ref, p, (xs,)).square().sum())(
            dict(ref.named_parameters()))
        g_ours = torch.func.grad(lambda p: torch.func.functional_call(ours, p, (xs,)).square().sum())(
            dict(ours.named_parameters()))
        for i in (0, 2, 4):
            torch.testing.assert_close(g_ours[f"{i}.weight"], g_ref[f"{i}.parametrizations.weight.original"],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours[i].weight_u, ref[i].parametrizations.weight[0]._u, **TOL)


def test_torch_checkpoint_converts_by_renaming_keys():
    """docs/eager.md: a torch spectral_norm checkpoint loads after renaming its keys."""
    from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

    src = _net()
    for i in (0, 2, 4):
        torch_spectral_norm(src[i])
    for _ in range(2):
        src(torch.randn(2, 3, 9, 9))
    renames = {"parametrizations.weight.original": "weight", "parametrizations.weight.0._u": "weight_u",
               "parametrizations.weight.0._v": "weight_v"}
    sd = {}
    for k, v in src.state_dict().items():
        for old, new in renames.items():
            k = k.replace(old, new)
        sd[k] = v
    dst = _net()
    apply_spectral_norm(dst)
    dst.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(dst(x), src(x), **TOL)
    src.eval(), dst.eval()
    torch.testing.assert_close(dst(x), src(x), **TOL)


def test_torch_export_eval_matches_eager():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    apply_spectral_norm(model)
    model.eval()
    x = torch.randn(2, 16)
    ep = torch.export.export(model, (x,), strict=False)
    assert {"0.weight_u", "0.weight_v", "2.weight_u", "2.weight_v"} <= set(ep.state_dict)
    torch.testing.assert_close(ep.module()(x), model(x), **TOL)


def test_meta_device_build_then_to_empty():
    """TorchTitan-style init: build and normalize on meta, to_empty, init weights, train."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        assert apply_spectral_norm(model) == ["0.weight", "2.weight"]
    assert model[0].weight_u.is_meta
    model.to_empty(device="cpu")
    for i in (0, 2):
        model[i].reset_parameters()
        assert model[i].weight_u.device.type == "cpu" and model[i].weight_u.dtype == torch.float32
        assert torch.isfinite(model[i].weight_u).all() and model[i].weight_u.norm().item() == pytest.approx(1.0)
    for _ in range(60):
        assert torch.isfinite(model(torch.randn(2, 8))).all()
    for i in (0, 2):
        exact = torch.linalg.matrix_norm(model[i].weight.detach().double(), ord=2)
        torch.testing.assert_close(spectral_sigma(model[i]).double(), exact, rtol=1e-3, atol=0)
    # to_empty on the same device keeps the values
    u = model[0].weight_u.clone()
    model.to_empty(device="cpu")
    assert torch.equal(model[0].weight_u, u)


def test_apply_skips_multihead_attention_out_proj_with_a_warning():
    # MultiheadAttention reads out_proj.weight itself: normalizing out_proj would be a no-op.
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
    with pytest.warns(UserWarning, match="self_attn.out_proj"):
        done = apply_spectral_norm(layer)
    assert done == ["linear1.weight", "linear2.weight"]
    assert not is_spectral_normalized(layer.self_attn.out_proj)
    # The supported way for the attention block: the stacked QKV weight through the generic path.
    spectral_norm(layer.self_attn, "in_proj_weight")
    x = torch.randn(3, 5, 16)
    layer.eval()
    w = layer.self_attn.in_proj_weight
    sigma = fx_spectral.spectral_sigma(layer.self_attn, "in_proj_weight")
    ref = copy.deepcopy(layer)
    remove_spectral_norm(ref.self_attn, "in_proj_weight")  # bakes W/sigma into a plain module
    torch.testing.assert_close(layer(x), ref(x))
    torch.testing.assert_close(ref.self_attn.in_proj_weight, w.detach() / sigma)
