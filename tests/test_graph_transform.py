"""Numbers of the graph transform: fx_spectral.transform vs the eager API vs torch's spectral_norm.

Same initial u/v -> outputs, weights and u/v equal within 1e-6 over 3 SGD steps, then in eval;
export (train and eval), the pass on an exported program's module, bake + export in a fresh
process, state_dict round trips between eager and transform, and the errors.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import fx_spectral
from fx_spectral.graph import SpectralGraphModule, bake, spectral_pass, transform
from fx_spectral.graph.rewrite import NORMALIZED_META

TOL = dict(atol=1e-6, rtol=1e-6)

CASES = [
    ("linear", lambda: nn.Linear(7, 5), (4, 7)),
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    ("conv2d", lambda: nn.Conv2d(4, 8, (3, 2), groups=4, padding="same", padding_mode="reflect"), (2, 4, 6, 7)),
    ("conv3d", lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1)), (2, 2, 4, 5, 4)),
    ("convT1d", lambda: nn.ConvTranspose1d(6, 4, 4, groups=2, stride=3), (2, 6, 5)),
    ("convT2d", lambda: nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1, output_padding=1), (2, 4, 5, 5)),
    ("convT3d", lambda: nn.ConvTranspose3d(3, 2, 2, stride=2), (1, 3, 3, 4, 3)),
]
IDS = [c[0] for c in CASES]


def _train(model: nn.Module, xs, targets, lr=0.1):
    """3 SGD steps; returns the outputs of each step and then the eval output."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    model.train()
    for x, t in zip(xs, targets):
        opt.zero_grad()
        y = model(x)
        (y * t).sum().backward()
        opt.step()
        outs.append(y.detach())
    model.eval()
    with torch.no_grad():
        outs.append(model(xs[0]))
    return outs


@pytest.mark.parametrize("factory,shape", [c[1:] for c in CASES], ids=IDS)
def test_transform_matches_eager_and_torch(factory, shape):
    base = factory()
    ref_torch = torch_spectral_norm(copy.deepcopy(base))  # torch picks dim=1 for ConvTranspose
    ref_eager = fx_spectral.spectral_norm(copy.deepcopy(base))
    model = nn.Sequential(copy.deepcopy(base))
    gm = transform(model)
    assert isinstance(gm, SpectralGraphModule)
    assert not any(n.op == "call_module" for n in gm.graph.nodes), "the leaf is lowered to its functional op"
    layer = gm.get_submodule("0")
    assert layer is model[0]
    # same starting u/v everywhere
    sn = ref_torch.parametrizations.weight[0]
    for mod in (ref_eager, layer):
        mod.weight_u.copy_(sn._u)
        mod.weight_v.copy_(sn._v)

    xs = [torch.randn(shape) for _ in range(3)]
    with torch.no_grad():
        targets = [torch.randn_like(base(x)) for x in xs]
    out_t, out_e, out_g = (_train(m, xs, targets) for m in (ref_torch, ref_eager, gm))
    for step, (a, b, c) in enumerate(zip(out_t, out_e, out_g)):
        torch.testing.assert_close(c, a, **TOL, msg=f"transform vs torch, step {step}")
        torch.testing.assert_close(c, b, **TOL, msg=f"transform vs eager, step {step}")
    torch.testing.assert_close(layer.weight, ref_torch.parametrizations.weight.original, **TOL)
    torch.testing.assert_close(layer.weight_u, sn._u, **TOL)
    torch.testing.assert_close(layer.weight_v, sn._v, **TOL)
    torch.testing.assert_close(layer.weight_u, ref_eager.weight_u, **TOL)
    assert layer.weight_u.dtype == torch.float32


def test_eval_graph_does_not_update_uv():
    gm = transform(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    x = torch.randn(5, 4)
    u0 = gm.get_submodule("0").weight_u.clone()
    gm.eval()
    assert "copy_" not in gm.code and "copy_" in gm.train_code
    gm(x)
    assert torch.equal(gm.get_submodule("0").weight_u, u0)
    gm.train()
    gm(x)
    assert not torch.equal(gm.get_submodule("0").weight_u, u0)


@pytest.mark.parametrize(
    "lazy,shape",
    [
        (lambda: nn.LazyLinear(5), (3, 6)),
        (lambda: nn.LazyConv2d(4, 3), (2, 3, 6, 6)),
        (lambda: nn.LazyConvTranspose1d(4, 3, stride=2), (2, 5, 7)),
    ],
    ids=["LazyLinear", "LazyConv2d", "LazyConvTranspose1d"],
)
def test_lazy_modules_are_deferred(lazy, shape):
    # transform hands Lazy leaves to the eager API, which creates u/v at their first forward.
    torch.manual_seed(1)
    gm = transform(nn.Sequential(lazy(), nn.Tanh()))
    torch.manual_seed(1)
    ref = nn.Sequential(fx_spectral.spectral_norm(lazy()), nn.Tanh())
    xs = [torch.randn(shape) for _ in range(3)]
    with torch.no_grad():
        torch.manual_seed(2)
        gm(xs[0])  # materializes (one update)
        torch.manual_seed(2)
        y = ref(xs[0])
    targets = [torch.randn_like(y) for _ in xs]
    assert sorted(gm.state_dict()) == ["0.bias", "0.weight", "0.weight_u", "0.weight_v"]
    for a, b in zip(_train(gm, xs, targets), _train(ref, xs, targets)):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(gm.get_submodule("0").weight_u, ref[0].weight_u, **TOL)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))
        self.proj = nn.Parameter(torch.randn(3, 6))
        self.kernel = nn.Parameter(torch.randn(2, 3, 1))

    def forward(self, x):
        h = F.linear(x, self.weight).relu()
        h = F.linear(h, self.proj)
        return F.conv1d(h.unsqueeze(-1), self.kernel.flip(-1))  # a computed weight: not normalized


def test_functional_ops_and_names():
    torch.manual_seed(0)
    model = _Functional()
    gm = transform(model, name=None)  # every weight feeding an op
    assert sorted(gm.spectral_weights) == [("proj", 0), ("weight", 0)]  # kernel.flip(-1) is computed
    gm_named = transform(_Functional(), name=("weight",))
    assert gm_named.spectral_weights == [("weight", 0)]
    x = torch.randn(5, 4)
    # against the eager math on the same u/v
    u, v = model.weight_u.clone(), model.weight_v.clone()
    pu, pv = model.proj_u.clone(), model.proj_v.clone()
    w = fx_spectral.nn.normalize_weight(model.weight, u, v)
    p = fx_spectral.nn.normalize_weight(model.proj, pu, pv)
    h = F.linear(F.linear(x, w).relu(), p)
    ref = F.conv1d(h.unsqueeze(-1), model.kernel.flip(-1))
    torch.testing.assert_close(gm(x), ref, **TOL)
    torch.testing.assert_close(model.weight_u, u, **TOL)
    torch.testing.assert_close(model.proj_v, pv, **TOL)


def test_shared_weight_is_normalized_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(F.linear(x, self.fc.weight))

    gm = transform(Tied())
    assert gm.code.count("torch.ops.aten.copy_.default") == 2  # one u and one v update
    normalized = [n for n in gm.graph.nodes if NORMALIZED_META in n.meta]
    assert len(normalized) == 1 and len(normalized[0].users) == 2
    u = gm.fc.weight_u.clone()
    v = gm.fc.weight_v.clone()
    x = torch.randn(3, 4)
    w = fx_spectral.nn.normalize_weight(gm.fc.weight, u, v)
    torch.testing.assert_close(gm(x), F.linear(F.linear(x, w), w, gm.fc.bias), **TOL)


def test_eager_normalized_modules_are_left_alone():
    model = nn.Sequential(fx_spectral.spectral_norm(nn.Linear(4, 5)), nn.ReLU(), nn.Linear(5, 2))
    u0 = model[0].weight_u.clone()
    gm = transform(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert gm.spectral_weights == [("2.weight", 0)]
    gm(torch.randn(3, 4))
    assert not torch.equal(model[0].weight_u, u0)  # updated once, by its own forward


def test_state_dict_round_trip_eager_and_transform():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    eager = copy.deepcopy(base)
    fx_spectral.apply_spectral_norm(eager)
    gm = transform(copy.deepcopy(base))
    assert sorted(eager.state_dict()) == sorted(gm.state_dict())
    x = torch.randn(2, 3, 4, 4)
    eager(x)  # move eager's u/v on
    gm.load_state_dict(eager.state_dict())
    for m in (eager, gm):
        m.eval()
    torch.testing.assert_close(gm(x), eager(x), **TOL)
    # and back: the transform's state loads into a fresh eager model
    gm.train()
    gm(x)
    eager2 = fx_spectral.apply_spectral_norm(m2 := copy.deepcopy(base)) and m2
    eager2.load_state_dict(gm.state_dict())
    gm.eval(), eager2.eval()
    torch.testing.assert_close(eager2(x), gm(x), **TOL)


def test_to_dtype_keeps_uv_float32_and_regenerates_casts():
    gm = transform(nn.Sequential(nn.Linear(4, 3)))
    assert ".float()" not in gm.code
    gm = gm.to(torch.bfloat16)
    assert gm.get_submodule("0").weight_u.dtype == torch.float32
    assert ".float()" in gm.code and ".to(torch.bfloat16)" in gm.code
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    layer = gm.get_submodule("0")
    u, v = layer.weight_u.clone(), layer.weight_v.clone()
    ref = F.linear(x, fx_spectral.nn.normalize_weight(layer.weight, u, v), layer.bias)
    torch.testing.assert_close(gm(x), ref)


def test_copy_survives_dead_code_elimination():
    gm = transform(nn.Sequential(nn.Linear(4, 3)))
    gm.train_graph.eliminate_dead_code()
    assert sum(n.target is torch.ops.aten.copy_.default for n in gm.train_graph.nodes) == 2


def test_deepcopy_and_pickle_keep_both_graphs(tmp_path):
    conv = nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular")
    gm = transform(nn.Sequential(conv, nn.Flatten(), nn.Linear(12, 3)))
    gm2 = copy.deepcopy(gm)
    assert isinstance(gm2, SpectralGraphModule) and gm2.eval_code == gm.eval_code
    torch.save(gm, tmp_path / "gm.pt")
    gm3 = torch.load(tmp_path / "gm.pt", weights_only=False)
    assert isinstance(gm3, SpectralGraphModule) and sorted(gm3.state_dict()) == sorted(gm.state_dict())
    x = torch.randn(2, 2, 4)
    for mode in (True, False, True):
        outs = [m.train(mode)(x) for m in (gm, gm2, gm3)]
        torch.testing.assert_close(outs[1], outs[0])
        torch.testing.assert_close(outs[2], outs[0])
    torch.testing.assert_close(gm3.get_submodule("0").weight_u, gm.get_submodule("0").weight_u)


# --------------------------------------------------------------------------------------------
# export, the pass on exported programs, bake
# --------------------------------------------------------------------------------------------


def _gan_like():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.ConvTranspose2d(4, 2, 3), nn.Flatten(), nn.Linear(72, 3)
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_lists_uv_mutations_after_decompositions(training):
    gm = transform(_gan_like()).train(training)
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(gm, (x,)).run_decompositions()
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    uv = {f"{i}.weight_{s}" for i in (0, 2, 4) for s in "uv"}
    assert mutated == (uv if training else set())
    expected = copy.deepcopy(gm)(x)  # the same u/v as before the exported run
    torch.testing.assert_close(ep.module()(x), expected, **TOL)


def test_pass_on_exported_program_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    ep = torch.export.export(model, (x,))
    gm = transform(ep.module())
    assert "torch.ops.aten.mv.default" in gm.code  # ATen in, ATen out
    ref = transform(model)
    ref.load_state_dict(gm.state_dict())  # same weights, same u/v
    for _ in range(2):
        torch.testing.assert_close(gm(x), ref(x), **TOL)
    # the one-graph pass, then re-export: the normalization is inside the new program
    pm = spectral_pass(torch.export.export(model, (x,)).module())
    ep2 = torch.export.export(pm, (x,)).run_decompositions()
    assert len(ep2.graph_signature.buffers_to_mutate) == 4


def test_bake_transformed_module_exports_and_loads_without_fx_spectral(tmp_path):
    model = nn.Sequential(_gan_like(), nn.LazyLinear(2))  # the Lazy leaf goes through the eager API
    gm = transform(model)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(3):
        gm(x)
    gm.eval()
    expected = gm(x).detach()
    plain = bake(gm)
    assert not any(k.endswith(("_u", "_v")) for k in plain.state_dict())
    assert not any(k.endswith(("_u", "_v")) for k in model.state_dict())  # baked in place, shared modules
    torch.testing.assert_close(plain(x), expected, **TOL)
    path = tmp_path / "baked.pt2"
    torch.export.save(torch.export.export(plain, (x,)), path)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch
        ep = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = ep.module()(io["x"])
        assert not [m for m in sys.modules if m.startswith("fx_spectral")], "fx_spectral was imported"
        torch.testing.assert_close(out, io["expected"], atol=1e-6, rtol=1e-6)
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_bake_eager_model():
    model = fx_spectral.apply_spectral_norm(m := _gan_like()) and m
    x = torch.randn(2, 3, 6, 6)
    model(x)
    model.eval()
    expected = model(x).detach()
    assert bake(model) is model
    assert not any(k.endswith(("_u", "_v")) for k in model.state_dict())
    torch.testing.assert_close(model(x), expected, **TOL)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_untraceable_model_points_to_backend(module_snapshot):
    snap, same = module_snapshot
    model = _Untraceable()
    before = snap(model)
    with pytest.raises(TypeError, match='backend="spectral"'):
        transform(model)
    same(before, snap(model))


def test_bad_options_leave_model_unchanged(module_snapshot):
    snap, same = module_snapshot
    model = nn.Sequential(nn.Linear(3, 3))
    before = snap(model)
    with pytest.raises(ValueError, match="n_power_iterations"):
        transform(model, n_power_iterations=0)
    with pytest.raises(TypeError, match="filter_fn"):
        transform(model, filter_fn=3)
    same(before, snap(model))
    with pytest.raises(ValueError, match="already"):
        transform(transform(model))


def test_filter_fn_sees_owner_and_fqn():
    seen = []
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    gm = transform(model, filter_fn=lambda m, fqn: seen.append((type(m).__name__, fqn)) or fqn == "2")
    assert ("Linear", "0") in seen and ("Linear", "2") in seen
    assert gm.spectral_weights == [("2.weight", 0)]
    assert "weight_u" not in model[0]._buffers


def test_several_power_iterations_match_torch():
    base = nn.Linear(6, 5)
    ref = torch_spectral_norm(copy.deepcopy(base), n_power_iterations=3)
    gm = transform(nn.Sequential(copy.deepcopy(base)), n_power_iterations=3)
    layer = gm.get_submodule("0")
    layer.weight_u.copy_(ref.parametrizations.weight[0]._u)
    layer.weight_v.copy_(ref.parametrizations.weight[0]._v)
    xs = [torch.randn(4, 6) for _ in range(3)]
    targets = [torch.randn(4, 5) for _ in range(3)]
    for a, b in zip(_train(gm, xs, targets), _train(ref, xs, targets)):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(layer.weight_u, ref.parametrizations.weight[0]._u, **TOL)


def test_float64_weights_compute_in_float64():
    base = nn.Conv1d(3, 4, 3).double()
    ref = fx_spectral.spectral_norm(copy.deepcopy(base))
    gm = transform(nn.Sequential(copy.deepcopy(base)))
    layer = gm.get_submodule("0")
    layer.weight_u.copy_(ref.weight_u)
    layer.weight_v.copy_(ref.weight_v)
    assert ".float()" not in gm.code
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(gm(x), ref(x), atol=1e-12, rtol=1e-12)
    assert layer.weight_u.dtype == torch.float32


def test_spectral_pass_eval_graph_has_no_mutation():
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    pm = spectral_pass(torch.export.export(model, (x,)).module(), training=False)
    assert "copy_" not in pm.code
    ep = torch.export.export(pm, (x,)).run_decompositions()
    assert ep.graph_signature.buffers_to_mutate == {}


def test_conflicting_dims_raise_and_leave_model_unchanged(module_snapshot):
    class Conflict(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.lazy = nn.LazyLinear(2)
            self.k = nn.Parameter(torch.randn(4, 4, 1))

        def forward(self, x):
            h = self.lazy(self.fc(x))
            y = F.conv1d(h.unsqueeze(-1).expand(-1, -1, 4).transpose(1, 2)[:, :4], self.k)
            return y, F.conv_transpose1d(y, self.k)

    snap, same = module_snapshot
    model = Conflict()
    before = snap(model)
    with pytest.raises(ValueError, match=r"'k' is used with different output dims \[0, 1\]"):
        transform(model, name=None)
    same(before, snap(model))


def test_autocast_guard_keeps_the_estimate_in_float32():
    # transform emits the guard for CUDA weights; the same nodes, for CPU, checked under CPU autocast
    from fx_spectral.graph import find_weight_uses, insert_normalization

    model = nn.Linear(8, 4)
    gm = torch.fx.symbolic_trace(model)
    u, v = fx_spectral.nn._init_uv(model.weight, 0, 1e-12)
    gm.register_buffer("weight_u", u.clone())
    gm.register_buffer("weight_v", v.clone())
    graph = gm.graph
    (w, uses), = find_weight_uses(graph).items()
    with graph.inserting_before(w.next):
        un, vn = graph.get_attr("weight_u"), graph.get_attr("weight_v")
    new = insert_normalization(
        graph, w, un, vn, dim=0, n_power_iterations=1, eps=1e-12, training=True, autocast_off="cpu"
    )
    uses[0][0].replace_input_with(w, new)
    gm.recompile()
    assert "_enter_autocast('cpu', None, False, None)" in gm.code and "_exit_autocast" in gm.code
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gm(x)
        ref = F.linear(x, fx_spectral.nn.normalize_weight(model.weight, u, v), model.bias)
        assert torch.is_autocast_enabled("cpu")  # restored after the region
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gm.weight_u, u)


def test_compiled_transform_follows_train_and_eval():
    gm = transform(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    ref = copy.deepcopy(gm)
    compiled = torch.compile(gm, backend="aot_eager")
    x = torch.randn(5, 4)
    for mode in (True, False, True):
        compiled.train(mode), ref.train(mode)
        u_before = gm.get_submodule("0").weight_u.clone()
        torch.testing.assert_close(compiled(x), ref(x), **TOL)
        assert torch.equal(gm.get_submodule("0").weight_u, u_before) is (not mode)
        torch.testing.assert_close(gm.get_submodule("0").weight_u, ref.get_submodule("0").weight_u, **TOL)


def test_transform_of_a_model_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    eager = copy.deepcopy(model)
    fx_spectral.apply_spectral_norm(eager)
    gm = transform(model)  # used to raise AttributeError: no attribute '_graph'
    assert not gm.training
    assert "copy_" not in gm.code and "copy_" in gm.train_code  # runs the eval graph; both exist
    eager.load_state_dict(gm.state_dict())
    x = torch.randn(3, 4)
    before = {k: t.clone() for k, t in gm.state_dict().items()}
    torch.testing.assert_close(gm(x), eager(x), **TOL)
    assert all(torch.equal(t, before[k]) for k, t in gm.state_dict().items()), "eval updated u/v"
    gm.train(), eager.train()
    for _ in range(2):
        torch.testing.assert_close(gm(x), eager(x), **TOL)
    torch.testing.assert_close(gm.state_dict(), eager.state_dict(), **TOL)


def test_spectral_pass_on_decomposed_conv_transpose_uses_dim_1():
    """aten.convolution(transposed=True) after run_decompositions: the weight is (in, out, *k); dim=1."""
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(3, 5, (2, 3), stride=2)
    x = torch.randn(2, 3, 4, 4)
    ep = torch.export.export(nn.Sequential(layer), (x,)).run_decompositions()
    gm = ep.module()
    (conv,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default]
    assert conv.args[6] is True  # transposed
    ref = torch_spectral_norm(copy.deepcopy(layer))  # torch's default dim for ConvTranspose: 1
    spectral_pass(gm)
    owner = gm.get_submodule("0")
    assert owner.weight_u.shape == (5,) and owner.weight_v.shape == (3 * 2 * 3,)
    sn = ref.parametrizations.weight[0]
    sn._u.copy_(owner.weight_u)
    sn._v.copy_(owner.weight_v)
    for _ in range(2):
        torch.testing.assert_close(gm(x), ref(x), **TOL)
    torch.testing.assert_close(owner.weight_u, sn._u, **TOL)
    torch.testing.assert_close(owner.weight_v, sn._v, **TOL)
