"""fx_spectral.constrain: projection after optimizer steps, checked against SVD / matrix_norm(ord=2)."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import tiny_qwen3_config
from torch import nn

from fx_spectral import projections as C
from fx_spectral.constraint import METHODS, Constraint, HardCap, SoftCap, constrain


def rms_norm(W: torch.Tensor, dim: int = 0) -> float:
    M = W.detach().movedim(dim, 0).flatten(1).double()
    return float(torch.linalg.matrix_norm(M, ord=2)) / (M.shape[0] / M.shape[1]) ** 0.5


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@torch.no_grad()
def gapped_(model: nn.Module) -> None:
    """Give every Linear weight a clear spectral gap in RMS units (top 1.5, the rest <= 0.5), so that
    persistent power iteration tracks the same top direction (what the rank-one methods assume)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            o, i = m.weight.shape
            k = min(o, i)
            U = torch.linalg.qr(torch.randn(o, k, generator=g))[0]
            V = torch.linalg.qr(torch.randn(i, k, generator=g))[0]
            S = torch.linspace(0.5, 0.05, k)
            S[0] = 1.5
            m.weight.copy_((U * S) @ V.T * (o / i) ** 0.5)


def train(model, optimizers, steps=5, batch=16):
    optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    x = torch.randn(batch, 8)
    for _ in range(steps):
        loss = model(x).square().mean() - model(x).std()
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()


class Capture:
    """A step post-hook registered before constrain's: the weights as the optimizer left them."""

    def __init__(self, model, optimizer):
        self.model, self.before = model, {}
        optimizer.register_step_post_hook(self)

    def __call__(self, optimizer, args, kwargs):
        self.before = {n: p.detach().clone() for n, p in self.model.named_parameters()}


def op_in_rms_units(name, W, w_max, **kw):
    """The op applied the way constrain() does it, on a float64 copy, with an exact SVD estimate."""
    M = W.double()
    s = (M.shape[0] / M.shape[1]) ** 0.5
    X = M / s
    U, S, Vh = torch.linalg.svd(X)
    est = (U[:, 0], S[0], Vh[0])
    ops = {
        "spectral_normalize": lambda: C.spectral_normalize(X, w_max, estimate=est),
        "spectral_hammer": lambda: C.spectral_hammer(X, w_max, estimate=est),
        "spectral_weight_decay": lambda: C.spectral_weight_decay(X, kw.get("wd", 0.1), estimate=est),
        "hard_cap": lambda: C.hard_cap(X, w_max, exact=kw.get("exact", False)),
        "pure_svd": lambda: C.pure_svd(X, w_max),
        "soft_cap": lambda: C.soft_cap(X / w_max, kw["alpha"]) * w_max,
        "orthogonalize": lambda: C.orthogonalize(X) * w_max,
    }
    return ops[name]() * s


OPTIONS = {
    "spectral_normalize": {"n_iter": 30},
    "spectral_hammer": {"n_iter": 30},
    "spectral_weight_decay": {"n_iter": 30, "wd": 0.2},
    "hard_cap": {},
    "pure_svd": {},
    "soft_cap": {"alpha": 0.2},
    "orthogonalize": {},
}


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_projects_after_each_step(name, opt_cls):
    model = mlp()
    gapped_(model)
    opt = opt_cls(model.parameters(), lr=0.01 if opt_cls is torch.optim.SGD else 0.001)
    cap = Capture(model, opt)
    handle = constrain(model, opt, name, w_max=0.8, **OPTIONS[name])
    train(model, opt, steps=3)
    assert set(handle.names) == {"0.weight", "2.weight", "4.weight"}
    for fqn in handle.names:
        got = dict(model.named_parameters())[fqn].detach().double()
        expected = op_in_rms_units(name, cap.before[fqn], 0.8, **OPTIONS[name])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for fqn in ("0.bias", "2.bias"):  # unselected: as the optimizer left them
        assert torch.equal(dict(model.named_parameters())[fqn], cap.before[fqn])


@pytest.mark.parametrize(
    "name,bound", [("spectral_normalize", 0.8), ("hard_cap", 0.8 * 1.0109), ("pure_svd", 0.8), ("soft_cap", 0.8)]
)
def test_caps_hold_after_training(name, bound):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    opts = {"max_update_norm": 0.5} if name == "soft_cap" else {"n_iter": 2} if name == "spectral_normalize" else {}
    handle = constrain(model, opt, name, w_max=0.8, **opts)
    if name == "soft_cap":
        handle.project("pure_svd")  # the coupling keeps an invariant: start inside the ball
    train(model, opt, steps=6)
    # persistent power iteration (2 per step) may underestimate sigma a little
    tol = 1e-2 if name == "spectral_normalize" else 2e-3
    for fqn, entry in handle.report().items():
        assert entry["sigma"] <= bound * (1 + tol), (fqn, entry)
        assert entry["sigma"] == pytest.approx(rms_norm(dict(model.named_parameters())[fqn]), rel=1e-5)


@pytest.fixture(scope="module")
def qwen3():
    transformers = pytest.importorskip("transformers")
    config = tiny_qwen3_config()
    return lambda: transformers.Qwen3ForCausalLM(config)


def qwen3_optimizers(model, lr=0.05):
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.Muon(hidden, lr=lr, weight_decay=0.1), torch.optim.AdamW(rest, lr=1e-3)


def train_lm(model, optimizers, steps):
    x = torch.randint(0, 256, (4, 24))
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("method,bound", [("soft_cap", 1.0), ("hard_cap", 1.0109), ("spectral_normalize", 1.0)])
def test_qwen3_with_muon(qwen3, method, bound):
    model = qwen3()
    muon, adamw = qwen3_optimizers(model)
    w_max = {"*.v_proj.weight": 1.5, "*.o_proj.weight": 1.5, "*": 1.0}
    handle = constrain(model, muon, method, w_max=w_max, n_iter=2) if method == "spectral_normalize" else None
    handle = handle or constrain(model, muon, method, w_max=w_max)
    assert len(handle.names) == 14 and not any("embed" in n or "lm_head" in n or "norm" in n for n in handle.names)
    if method != "spectral_normalize":  # (a flat spectrum is the worst case for power iteration)
        handle.project("orthogonalize", exact=True)  # the paper's init: every singular value at w_max
    embed_before = model.model.embed_tokens.weight.detach().clone()
    train_lm(model, [muon], steps=4)  # AdamW is not stepped: embeddings / lm_head / norms untouched
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    params = dict(model.named_parameters())
    report = handle.report()
    for fqn in handle.names:
        cap = 1.5 if fqn.endswith(("v_proj.weight", "o_proj.weight")) else 1.0
        sigma = rms_norm(params[fqn])
        assert report[fqn]["sigma"] == pytest.approx(sigma, rel=1e-5)
        assert report[fqn]["w_max"] == cap
        # spectral_normalize: 2 persistent power iterations per step may underestimate sigma a little
        assert sigma <= bound * cap * (1 + (2e-2 if method == "spectral_normalize" else 2e-3)), (fqn, sigma)
    if method != "spectral_normalize":  # not a blunt rescale: weights stay near the cap
        assert max(report[n]["sigma"] / report[n]["w_max"] for n in handle.names) > 0.9


def test_soft_cap_coupling_follows_muon_lr(qwen3):
    from fx_spectral.methods import muon_update_norm

    model = qwen3()
    muon, _ = qwen3_optimizers(model, lr=0.02)
    p = model.model.layers[0].mlp.down_proj.weight  # (64, 128): Muon scales lr by max(1, A/B) = 1
    group = muon.param_groups[0]
    assert muon_update_norm(group, p.shape) == pytest.approx(0.02 * 1.2024 * 1.02, rel=1e-3)
    # the bound holds for an actual Muon update, measured by SVD
    before = p.detach().clone()
    train_lm(model, [muon], steps=1)
    train_lm(model, [muon], steps=1)
    delta = p.detach() - before * (1 - 0.02 * 0.1)
    assert torch.linalg.matrix_norm(delta.double(), ord=2) <= muon_update_norm(group, p.shape) * 2 + 1e-6


def test_state_persists_through_optimizer_state_dict():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    constrain(model, opt, "spectral_normalize", w_max=0.5)
    train(model, opt, steps=2)
    sd = opt.state_dict()
    st = sd["state"][0]
    assert st["spectral_u"].shape == (32,) and st["spectral_v"].shape == (8,)
    assert st["spectral_u"].dtype == torch.float32
    W = model[0].weight.detach().double() / 2.0  # scale sqrt(32/8)
    torch.testing.assert_close(
        torch.dot(st["spectral_u"].double(), W @ st["spectral_v"].double()),
        torch.linalg.matrix_norm(W, ord=2),
        rtol=1e-3,
        atol=0,
    )

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.01)
    opt2.load_state_dict(torch.load(buf))
    handle2 = constrain(model, opt2, "spectral_normalize", w_max=0.5)
    t0 = handle2._targets[0]
    u, v = handle2._get_vectors(t0, None)
    assert torch.equal(u, st["spectral_u"]) and torch.equal(v, st["spectral_v"])


def test_remove_stops_projection():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    cap = Capture(model, opt)
    handle = constrain(model, opt, "pure_svd", w_max=0.1)
    train(model, opt, steps=1)
    assert rms_norm(model[2].weight) <= 0.1 + 1e-6
    handle.remove()
    train(model, opt, steps=1)
    assert torch.equal(model[2].weight, cap.before["2.weight"])
    assert rms_norm(model[2].weight) > 0.1


def test_report_exact_and_estimate_and_activations():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = constrain(model, opt, "spectral_normalize", w_max=2.0, track_activations=True)
    train(model, opt, steps=3)
    x = torch.randn(5, 8)
    model(x)
    exact = handle.report(activations=False)
    approx = handle.report(exact=False)
    for fqn in handle.names:
        W = dict(model.named_parameters())[fqn]
        assert exact[fqn]["sigma"] == pytest.approx(rms_norm(W), rel=1e-6)
        assert exact[fqn]["sigma_raw"] == pytest.approx(exact[fqn]["sigma"] * exact[fqn]["scale"], rel=1e-9)
        assert approx[fqn]["sigma"] == pytest.approx(exact[fqn]["sigma"], rel=2e-2)
    # no ModuleList: the owners of the selected weights are tracked; running max since last report
    h0 = torch.nn.functional.linear(x, model[0].weight, model[0].bias).abs().max().item()  # no hooks
    assert approx["0"]["max_activation"] >= h0 - 1e-6
    assert "0" not in handle.report()  # reset by the previous report, no forward since
    handle.remove()
    with pytest.raises(ValueError, match="track_activations"):
        constrain(model, opt, "pure_svd").report(activations=True)


def test_transformer_blocks_are_tracked(qwen3):
    model = qwen3()
    muon, _ = qwen3_optimizers(model)
    handle = constrain(model, muon, "hard_cap", track_activations=True)
    out = {}
    model.model.layers[1].register_forward_hook(
        lambda m, i, o: out.setdefault("h", o[0] if isinstance(o, tuple) else o)
    )
    model(input_ids=torch.randint(0, 256, (2, 8)))
    rep = handle.report()
    assert rep["model.layers.1"]["max_activation"] == pytest.approx(out["h"].abs().max().item())
    assert "model.layers.0" in rep


def test_conv_and_conv_transpose_views():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 4, 3, groups=2))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = constrain(model, opt, "pure_svd", w_max=0.5)
    x = torch.randn(2, 3, 8, 8)
    model(x).square().mean().backward()
    opt.step()
    assert rms_norm(model[0].weight, 0) == pytest.approx(0.5, rel=1e-5)
    assert rms_norm(model[2].weight, 1) <= 0.5 + 1e-5
    rep = handle.report()
    assert rep["2.weight"]["scale"] == pytest.approx((2 / (8 * 9)) ** 0.5)


def test_split_views_and_w_max_patterns():
    model = nn.Sequential(nn.Linear(16, 24))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    split = lambda fqn, p: {"q": p[:8], "kv": p[8:]}  # noqa: E731
    handle = constrain(model, opt, "pure_svd", split=split, w_max={"*[q]": 0.3, "*": 0.6})
    assert handle.names == ["0.weight[q]", "0.weight[kv]"]
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    W = model[0].weight
    assert rms_norm(W[:8]) <= 0.3 + 1e-6 and rms_norm(W[8:]) <= 0.6 + 1e-6
    rep = handle.report()
    assert rep["0.weight[q]"]["sigma"] == pytest.approx(rms_norm(W[:8]), rel=1e-6)


def test_config_objects_and_selection_rules():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 8), "body": mlp(), "head": nn.Linear(4, 10)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = constrain(model, opt, HardCap(exact=True))
    assert handle.names == ["body.0.weight", "body.2.weight", "body.4.weight"]
    handle.remove()  # (a live handle refuses a second constrain() of its weights)
    handle = constrain(model, opt, SoftCap(alpha=0.1), sensitive_to_wmax=False, exclude="body.4.*")
    assert handle.method == SoftCap(alpha=0.1, sensitive_to_wmax=False)
    assert handle.names == ["body.0.weight", "body.2.weight"]
    handle.remove()
    handle = constrain(model, opt, "pure_svd", include=["head.weight", "emb.weight"])
    assert handle.names == ["emb.weight", "head.weight"]
    handle.remove()
    handle = constrain(model, opt, "pure_svd", filter_fn=lambda mod, fqn: mod.out_features == 32)
    assert handle.names == ["body.0.weight", "body.2.weight"]
    handle.remove()
    # only the optimizer's parameters
    opt_body0 = torch.optim.SGD(model["body"][0].parameters(), lr=0.1)
    assert constrain(model, opt_body0, "pure_svd").names == ["body.0.weight"]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"method": "nope"}, ValueError, "unknown method"),
        ({"method": 3}, TypeError, "method must be"),
        ({"method": "pure_svd", "w_max": 0.0}, ValueError, "w_max must be > 0"),
        ({"method": "pure_svd", "w_max": {"*.weight": -1.0}}, ValueError, "w_max must be > 0"),
        ({"method": "pure_svd", "w_max": {"nothing.*": 1.0, "*": 1.0}}, ValueError, "matches no selected"),
        ({"method": "pure_svd", "w_max": {"0.*": 1.0}}, ValueError, "no w_max pattern matches"),
        ({"method": "pure_svd", "include": "x.*"}, ValueError, "matches no parameter"),
        ({"method": "pure_svd", "exclude": ["x.*"]}, ValueError, "matches no parameter"),
        ({"method": "pure_svd", "include": "*"}, ValueError, "not a matrix"),
        ({"method": "pure_svd", "alpha": 0.1}, TypeError, "not valid for method"),
        ({"method": "soft_cap"}, ValueError, "max_update_norm"),
        ({"method": "soft_cap", "alpha": -1.0}, ValueError, "alpha"),
        ({"method": "spectral_normalize", "n_iter": 0}, ValueError, "n_iter"),
        ({"method": "pure_svd", "filter_fn": lambda m, f: False}, ValueError, "no weight selected"),
        ({"method": "pure_svd", "track_activations": "zzz"}, ValueError, "match no module"),
    ],
)
def test_bad_input_raises_before_registering(kwargs, exc, match, module_snapshot):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshot, same = module_snapshot
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        constrain(model, opt, **kwargs)
    assert not opt._optimizer_step_post_hooks
    assert all(not m._forward_hooks for m in model.modules())
    same(before, snapshot(model))


def test_report_estimate_leaves_the_global_rng_alone():
    model = mlp()
    handle = constrain(model, torch.optim.SGD(model.parameters(), lr=0.1), "soft_cap", alpha=0.1)
    state = torch.get_rng_state()
    handle.report(exact=False)  # no stored vectors: a fresh, privately seeded estimate
    assert torch.equal(torch.get_rng_state(), state)


def test_report_estimate_follows_the_one_start_rule():
    """report(exact=False): power.start_vectors (the stored vectors if they fit the weight, else the
    seeded fresh start and its warm-up) and power.N_REPORT steps, as the sharded report."""
    import zlib

    from fx_spectral import power
    from fx_spectral.projections import power_iterate

    model = mlp()
    handle = constrain(model, torch.optim.SGD(model.parameters(), lr=0.1), "hard_cap", initial_projection=False)
    t = handle.targets[0]
    W = t.param.detach()
    seed = zlib.crc32(t.fqn.encode())

    def expected(stored):
        u, v, warm = power.start_vectors(stored, *W.shape, seed, dtype=W.dtype)
        return float(power_iterate(W, power.N_REPORT + warm, u=u, v=v)[1])

    fresh = expected(None)
    assert handle.report(exact=False)[t.fqn]["sigma_raw"] == fresh  # 2 + 15 steps from the seeded start
    u, v = torch.randn(W.shape[0]), torch.randn(W.shape[1])
    handle.vectors.put(t, None, u / u.norm(), v / v.norm())
    assert handle.report(exact=False)[t.fqn]["sigma_raw"] == expected((u / u.norm(), v / v.norm()))
    handle.vectors.put(t, None, torch.ones(W.shape[0] + 1), torch.ones(W.shape[1]))  # no longer fits
    assert handle.report(exact=False)[t.fqn]["sigma_raw"] == fresh  # a fresh start, not an error


def test_coupling_follows_lr_changes_and_load_state_dict():
    model = mlp()
    muon = torch.optim.Muon([model[2].weight], lr=0.02)
    handle = constrain(model, muon, "soft_cap")
    t = handle._targets[0]
    W = model[2].weight
    before = handle._context(t, None, W, 1.0).update_norm
    muon.load_state_dict(muon.state_dict())  # new param-group dicts
    muon.param_groups[0]["lr"] = 0.01  # as a scheduler does
    assert handle._context(t, None, W, 1.0).update_norm == pytest.approx(before / 2)


def test_handle_type_and_repr():
    model = mlp()
    handle = constrain(model, torch.optim.SGD(model.parameters(), lr=0.1), "hard_cap")
    assert isinstance(handle, Constraint) and "HardCap" in repr(handle)


def test_optimizer_container_keeps_vectors_in_member_state():
    """A container optimizer with an ``optimizers`` list (as TorchTitan's OptimizersContainer):
    hooks on the container, vectors in the member optimizer that owns the parameter."""

    class Container(torch.optim.Optimizer):
        def __init__(self, optimizers):
            self.optimizers = optimizers
            params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
            super().__init__(params, {})

        def step(self, closure=None):
            for o in self.optimizers:
                o.step()

    model = mlp()
    members = [torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.AdamW(model[2].parameters(), lr=0.01)]
    container = Container(members)
    handle = constrain(model, container, "spectral_normalize", w_max=0.5)
    assert handle.names == ["0.weight", "2.weight"]
    model(torch.randn(4, 8)).sum().backward()
    container.step()
    assert "spectral_u" in members[1].state[model[2].weight]
    assert rms_norm(model[2].weight) <= 0.5 * 1.02
    assert not container.state  # nothing written to the container's own (unsaved) state


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_bf16_weights(dtype):
    model = mlp().bfloat16()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    handle = constrain(model, opt, "hard_cap", w_max=0.5, exact=True, dtype=dtype)
    x = torch.randn(16, 8).bfloat16()
    for _ in range(3):
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    for fqn in handle.names:
        W = dict(model.named_parameters())[fqn]
        assert W.dtype == torch.bfloat16
        assert rms_norm(W) <= 0.5 * 1.02  # bf16 rounding of the written-back weight


def test_bf16_vectors_stay_float32_across_load_state_dict():
    model = mlp().bfloat16()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    constrain(model, opt, "spectral_normalize")
    model(torch.randn(4, 8).bfloat16()).float().sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["spectral_u"].dtype == torch.float32
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[model[0].weight]["spectral_u"].dtype == torch.bfloat16  # torch casts on load
    handle = constrain(model, opt2, "spectral_normalize")
    u, _ = handle._get_vectors(handle._targets[0], None)
    assert u.dtype == torch.float32 and opt2.state[model[0].weight]["spectral_u"].dtype == torch.float32


@pytest.mark.parametrize("matmul_dtype", ["auto", None])
def test_muon_weights_get_bf16_products_by_default(matmul_dtype):
    model = mlp()
    weights = [model[i].weight for i in (0, 2, 4)]
    muon = torch.optim.Muon(weights, lr=0.01)
    cap = Capture(model, muon)
    constrain(model, muon, "soft_cap", alpha=0.2, matmul_dtype=matmul_dtype)
    model(torch.randn(4, 8)).sum().backward()
    muon.step()
    W0 = cap.before["2.weight"]  # 32 × 32: scale 1
    products = torch.bfloat16 if matmul_dtype == "auto" else None
    expected = C.soft_cap(W0, 0.2, matmul_dtype=products)
    torch.testing.assert_close(model[2].weight.detach(), expected, rtol=0, atol=1e-6)
    if matmul_dtype == "auto":
        assert not torch.allclose(model[2].weight.detach(), C.soft_cap(W0, 0.2), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Safe from any starting point: initial projection, range guards, refusals, all or nothing
# --------------------------------------------------------------------------------------------

CAPPED = {  # method -> (options, bound on sigma / w_max after each step)
    "pure_svd": ({}, 1.0),
    "hard_cap": ({}, 1.0109),
    "hard_cap_exact": ({"exact": True}, 1.0),
    "soft_cap": ({"max_update_norm": 0.5}, 1.0),
    "spectral_normalize": ({"exact": True}, 1.0),
    "orthogonalize_exact": ({"exact": True}, 1.0),
}


def _method(key: str) -> str:
    return key.removesuffix("_exact")


def test_readme_example_stays_finite_and_under_the_cap():
    """The README's model (default init, torch's spectral_norm replacement on top), Muon and the
    soft cap: before, RMS sigma 22 became 1.9e9 in one step and NaN in two."""
    import fx_spectral

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    fx_spectral.apply_spectral_norm(model)
    x = torch.randn(8, 3, 32, 32)
    model(x)  # materializes the LazyLinear
    assert rms_norm(model[3].weight) > 10  # far outside the ball at the start
    muon = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    handle = fx_spectral.constrain(model, muon, "soft_cap", w_max=1.0)
    assert handle.names == ["3.weight"]
    assert rms_norm(model[3].weight) <= 1.0 + 1e-5  # the initial projection
    target = torch.randn(8, 10)
    for _ in range(10):
        muon.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        muon.step()
        W = model[3].weight
        assert torch.isfinite(W).all()
        assert rms_norm(W) <= 1.0 * (1 + 2e-3)  # bf16 products (Muon's precision) round a little
        assert handle.report()["3.weight"]["sigma"] == pytest.approx(rms_norm(W), rel=1e-5)


@pytest.mark.parametrize("start", [1e4, 1.0, 1e-4])
@pytest.mark.parametrize("key", sorted(CAPPED))
def test_every_capping_method_holds_from_any_start(key, start):
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(start)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    options, bound = CAPPED[key]
    handle = constrain(model, opt, _method(key), w_max=0.8, **options)
    for fqn, entry in handle.report().items():  # from step 0
        assert entry["sigma"] <= 0.8 * bound * (1 + 1e-5), (fqn, entry)
    x = torch.randn(16, 8)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        for fqn, entry in handle.report().items():
            assert torch.isfinite(dict(model.named_parameters())[fqn]).all()
            assert entry["sigma"] <= 0.8 * bound * (1 + 2e-3), (fqn, entry)


@pytest.mark.parametrize(
    "method,options,bound", [("hard_cap", {}, 1.0109), ("soft_cap", {"max_update_norm": 0.5}, 1.0)]
)
def test_polynomials_are_guarded_without_the_initial_projection(method, options, bound):
    """Weights far outside the polynomial's range (sigma ~1e20 in float32): finite, capped."""
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(1e20)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = constrain(model, opt, method, w_max=0.8, initial_projection=False, **options)
    assert rms_norm(model[2].weight) > 1e19  # not projected at registration
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    W = model[2].weight
    assert torch.isfinite(W).all()
    assert handle.report()["2.weight"]["sigma"] <= 0.8 * bound * (1 + 2e-3)


def test_initial_projection_is_exact_and_leaves_inside_weights_alone():
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(50.0)  # outside the ball
        model[2].weight.mul_(1e-3)  # well inside
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    constrain(model, opt, "soft_cap", w_max=0.8, alpha=0.1)
    assert rms_norm(model[0].weight) == pytest.approx(0.8, rel=1e-5)  # min(sigma_i, w_max): exactly at the cap
    # the exact cap keeps the singular vectors and every singular value below the cap
    s_before = torch.linalg.svdvals(before["0.weight"].double() / 2.0)
    s_after = torch.linalg.svdvals(model[0].weight.detach().double() / 2.0)
    torch.testing.assert_close(s_after, s_before.clamp_max(0.8), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[2].weight, before["2.weight"], rtol=1e-6, atol=0)
    assert torch.equal(model[0].bias, before["0.bias"])
    # spectral normalize: a rescale by the exact sigma (keeps the spectrum's shape)
    model2 = mlp()
    with torch.no_grad():
        model2[0].weight.mul_(50.0)
    W0 = model2[0].weight.detach().clone()
    constrain(model2, torch.optim.SGD(model2.parameters(), lr=0.1), "spectral_normalize", w_max=0.8)
    torch.testing.assert_close(model2[0].weight, W0 * (0.8 / rms_norm(W0)), rtol=1e-5, atol=1e-7)
    # opting out
    model3 = mlp()
    with torch.no_grad():
        model3[0].weight.mul_(50.0)
    W0 = model3[0].weight.detach().clone()
    constrain(model3, torch.optim.SGD(model3.parameters(), lr=0.1), "hard_cap", w_max=0.8, initial_projection=False)
    assert torch.equal(model3[0].weight, W0)
    with pytest.raises(TypeError, match="initial_projection"):
        constrain(model3, torch.optim.SGD(model3.parameters(), lr=0.1), "hard_cap", initial_projection="yes")


def test_constrain_twice_on_the_same_optimizer_and_weight_is_refused(module_snapshot):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = constrain(model, opt, "hard_cap", w_max=0.8)
    snapshot, same = module_snapshot
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'0\.weight' is already constrained for this optimizer .*remove\(\)"):
        constrain(model, opt, "soft_cap", alpha=0.1)
    same(before, snapshot(model))
    assert len(opt._optimizer_step_post_hooks) == 1
    # disjoint weights are fine; after remove() the weights can be constrained again
    other = constrain(model, opt, "pure_svd", include="4.weight", exclude=None) if False else None
    assert other is None
    handle.remove()
    handle2 = constrain(model, opt, "soft_cap", alpha=0.1, exclude="4.weight")
    handle3 = constrain(model, opt, "pure_svd", include="4.weight")
    assert handle2.names == ["0.weight", "2.weight"] and handle3.names == ["4.weight"]
    # a container optimizer and its member are the same owner of the state: refused too
    members = [torch.optim.SGD(mlp().parameters(), lr=0.1)]

    class Container(torch.optim.Optimizer):
        def __init__(self, optimizers):
            self.optimizers = optimizers
            super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})

    m2 = mlp()
    member = torch.optim.SGD(m2.parameters(), lr=0.1)
    constrain(m2, member, "hard_cap")
    with pytest.raises(ValueError, match="already constrained"):
        constrain(m2, Container([member]), "hard_cap")
    del members


def test_a_failed_projection_writes_nothing_and_names_the_weight():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model, opt)  # (its hook runs before constrain's)
    handle = constrain(model, opt, "hard_cap", w_max=0.1, initial_projection=False)
    x = torch.randn(4, 8)
    model(x).sum().backward()
    with torch.no_grad():
        model[4].weight.grad[0, 0] = float("nan")  # the last weight turns NaN in the step
    from fx_spectral.constraint import ProjectionError

    with pytest.raises(ProjectionError, match=r"'4\.weight' after the optimizer step .*NaN.*already happened"):
        opt.step()
    for fqn, p in model.named_parameters():  # every weight as the optimizer left it (none projected)
        torch.testing.assert_close(p.detach(), cap.before[fqn], rtol=0, atol=0, equal_nan=True)
    assert rms_norm(model[0].weight) > 0.1 * 1.05  # the first weight was not projected
    with pytest.raises(ProjectionError, match=r"'4\.weight' in project\(\).*No weight was changed"):
        handle.project()


def test_a_failing_op_is_reported_and_nothing_is_written(monkeypatch):
    import fx_spectral.methods as K

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cap = Capture(model, opt)
    constrain(model, opt, "pure_svd", w_max=0.1)
    original = K._HANDLERS[K.PureSVD]

    def failing(X, cfg, ctx):
        if X.shape == (4, 32):  # the last weight
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return original(X, cfg, ctx)

    monkeypatch.setitem(K._HANDLERS, K.PureSVD, failing)
    model(torch.randn(4, 8)).sum().backward()
    with pytest.raises(RuntimeError, match=r"'4\.weight'.*LinAlgError.*already happened"):
        opt.step()
    for fqn, p in model.named_parameters():
        assert torch.equal(p.detach(), cap.before[fqn])


@pytest.mark.parametrize("empty", [(0, 5), (5, 0)])
def test_zero_size_weights_are_skipped(empty):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.empty, self.b = nn.Linear(8, 5), nn.Linear(*empty), nn.Linear(5, 4)

        def forward(self, x):
            h = self.a(x)
            if empty == (0, 5):
                h = h + self.empty(x[:, :0])  # its bias only
            else:
                h = h + self.empty(h).sum()  # an empty output
            return self.b(h)

    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    handle = constrain(model, opt, "hard_cap", w_max=0.5)
    assert handle.names == ["a.weight", "b.weight"]
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 8)).square().sum().backward()
        opt.step()
    assert set(handle.report()) == {"a.weight", "b.weight"}
    with pytest.raises(ValueError, match="zero-size weights are skipped"):
        constrain(model, torch.optim.SGD(model.parameters(), lr=0.1), "hard_cap", include="empty.weight")


def test_nested_head_is_excluded_by_default():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()
            self.lm_head = nn.Linear(4, 10)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Model()

    model = Wrapper()
    handle = constrain(model, torch.optim.SGD(model.parameters(), lr=0.1), "hard_cap")
    assert handle.names == ["inner.body.0.weight", "inner.body.2.weight", "inner.body.4.weight"]
    assert not any("lm_head" in n for n in handle.names)
