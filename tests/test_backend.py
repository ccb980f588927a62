# ruff: noqa: E501  (the golden graphs are dynamo's code, one op per line)
"""The torch.compile backend "spectral": registration, options, golden graph, numerics vs torch's spectral_norm.

Numerics: backend vs the eager API vs ``torch.nn.utils.parametrizations.spectral_norm``, from the
same u/v, over 3 SGD steps then eval, for the fourteen module types (aot_eager, 1e-6) and for one
model holding several layer types (inductor, 1e-5, compiled once per module).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fx_spectral
from fx_spectral.graph import backend as backend_mod
from fx_spectral.graph.backend import BackendConfig, backend, spectral_backend
from fx_spectral.nn import default_dim


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# The reference protocol: same u/v, 3 SGD steps, then eval
# --------------------------------------------------------------------------------------------


def _strip_uv(model: nn.Module) -> None:
    for m in model.modules():
        for k in [k for k in m._buffers if k.endswith(("_u", "_v")) and k[:-2] in m._parameters]:
            del m._buffers[k]


def _references(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Copies of ``model`` normalized by the eager API and by torch's spectral_norm, with its u/v."""
    owners = [
        (fqn, m, k[:-2])
        for fqn, m in model.named_modules()
        for k in m._buffers
        if k.endswith("_u") and k[:-2] in m._parameters
    ]
    eager, torch_sn = copy.deepcopy(model), copy.deepcopy(model)
    for ref in (eager, torch_sn):
        _strip_uv(ref)
    for fqn, m, name in owners:
        u, v = m._buffers[name + "_u"], m._buffers[name + "_v"]
        e = eager.get_submodule(fqn)
        fx_spectral.spectral_norm(e, name)
        e._buffers[name + "_u"].copy_(u)
        e._buffers[name + "_v"].copy_(v)
        t = torch_sn.get_submodule(fqn)
        torch.nn.utils.parametrizations.spectral_norm(t, name, dim=default_dim(t))
        getattr(t.parametrizations, name)[0]._u.copy_(u)
        getattr(t.parametrizations, name)[0]._v.copy_(v)
    return eager, torch_sn


def _uv(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("_u", "_v"))}


def check_protocol(model, inputs, be, *, atol, out=lambda y: y, steps=3):
    """Backend (``be``) vs eager API vs torch's spectral_norm: 3 SGD steps then eval. Returns the counter."""
    cnt = CompileCounterWithBackend(be)
    compiled = torch.compile(model, backend=cnt)
    model.eval()
    compiled(*inputs)  # materializes Lazy modules, creates u/v; eval: no update
    model.train()
    assert _uv(model), "the backend normalized nothing"
    eager, torch_sn = _references(model)
    models = (model, eager, torch_sn)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for step in range(steps):
        ys = [out(compiled(*inputs)), out(eager(*inputs)), out(torch_sn(*inputs))]
        for name, y in zip(("eager API", "torch spectral_norm"), ys[1:]):
            where = f"step {step} vs {name}"
            torch.testing.assert_close(ys[0], y, atol=atol, rtol=atol, msg=lambda m, where=where: f"{where}: {m}")
        for y, opt in zip(ys, opts):
            opt.zero_grad()
            y.float().square().mean().backward()
            opt.step()
    uv = _uv(model)
    for k, t in _uv(eager).items():
        torch.testing.assert_close(uv[k], t, atol=atol, rtol=atol)
    for (k, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=atol, msg=lambda m, k=k: f"parameter {k}: {m}")
    for m in models:
        m.eval()
    ys = [out(compiled(*inputs)), out(eager(*inputs)), out(torch_sn(*inputs))]
    for y in ys[1:]:
        torch.testing.assert_close(ys[0], y, atol=atol, rtol=atol)
    after = _uv(model)
    assert all(torch.equal(after[k], uv[k]) for k in uv), "eval updated u/v"
    return cnt


# --------------------------------------------------------------------------------------------
# Registration and options
# --------------------------------------------------------------------------------------------


def test_registered_under_its_name():
    assert "spectral" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("spectral") is spectral_backend
    backend_mod._register()  # a second registration is a no-op, not "duplicate name"


def test_entry_point_resolves_without_importing_fx_spectral():
    code = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        m = nn.Sequential(nn.Linear(4, 3))
        assert "fx_spectral" not in sys.modules
        torch.compile(m, backend="spectral", options={"inner": "eager"})(torch.randn(2, 4))
        print(sorted(m.state_dict()), "fx_spectral" in sys.modules)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "['0.bias', '0.weight', '0.weight_u', '0.weight_v'] True"


def test_options_from_torch_compile_are_honoured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    compiled = torch.compile(model, backend="spectral", options={"inner": "aot_eager", "n_power_iterations": 3})
    model.eval()
    compiled(torch.randn(2, 6))
    model.train()
    u, v = model[0].weight_u.clone(), model[0].weight_v.clone()
    compiled(torch.randn(2, 6))
    ref = fx_spectral.spectral_norm(nn.Linear(6, 5), n_power_iterations=3)
    ref.load_state_dict({**model[0].state_dict(), "weight_u": u, "weight_v": v})
    ref(torch.randn(2, 6))
    torch.testing.assert_close(model[0].weight_u, ref.weight_u, atol=1e-7, rtol=0)


def test_unknown_options_are_warned_about_by_name():
    with pytest.warns(UserWarning, match="'bogus'"):
        cfg = backend_mod._merge_options(
            BackendConfig(inner="aot_eager"), {"options": {"bogus": 1, "eps": 1e-6}}
        )
    assert cfg.eps == 1e-6 and cfg.inner_options == {}
    # inductor config keys go to inductor, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = backend_mod._merge_options(BackendConfig(), {"options": {"epilogue_fusion": False}})
    assert cfg.inner_options == {"epilogue_fusion": False}
    # ... and are warned about when the inner backend is not inductor
    with pytest.warns(UserWarning, match="'epilogue_fusion'.*'aot_eager'"):
        backend_mod._merge_options(
            BackendConfig(), {"options": {"inner": "aot_eager", "epilogue_fusion": False}}
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_power_iterations": 0}, ValueError, "n_power_iterations >= 1"),
        ({"eps": -1.0}, ValueError, "eps > 0"),
        ({"inner": "spectral"}, ValueError, "cannot be 'spectral'"),
        ({"inner": 3}, TypeError, "backend name or callable"),
        ({"inner": "aot_eager", "mode": "max-autotune"}, ValueError, "inductor settings"),
        ({"filter_fn": "fc"}, TypeError, "filter_fn"),
        ({"name": 3}, TypeError, "parameter name"),
    ],
)
def test_bad_config_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        backend(**kwargs)


# --------------------------------------------------------------------------------------------
# The graph the backend hands to its inner compiler (golden)
# --------------------------------------------------------------------------------------------


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def _code(gm) -> str:
    """The graph's code without the ``;  x = y = None`` clauses that free dead values."""
    return "\n".join(re.sub(r";  [\w =]+ = None$", "", line) for line in gm.code.strip().splitlines())


def _recorded_graphs(model, *inputs, **kwargs):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=backend(inner=record, **kwargs))(*inputs)
    return graphs


def test_golden_dynamo_graph_training():
    (gm,) = _recorded_graphs(_One(), torch.randn(2, 4))
    assert_expected_inline(
        _code(gm),
        """\
def forward(self, L_self_modules_fc_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_fc_parameters_bias_ : torch.nn.parameter.Parameter, L_x_ : torch.Tensor, fc_weight_u, fc_weight_v):
    l_self_modules_fc_parameters_weight_ = L_self_modules_fc_parameters_weight_
    l_self_modules_fc_parameters_bias_ = L_self_modules_fc_parameters_bias_
    l_x_ = L_x_
    l_self_modules_fc_parameters_weight__nograd = l_self_modules_fc_parameters_weight_.detach()
    l_self_modules_fc_parameters_weight__nograd_t = l_self_modules_fc_parameters_weight__nograd.t()
    l_self_modules_fc_parameters_weight__Wv = torch.mv(l_self_modules_fc_parameters_weight__nograd, fc_weight_v)
    l_self_modules_fc_parameters_weight__u_new_norm = torch._C._linalg.linalg_vector_norm(l_self_modules_fc_parameters_weight__Wv)
    l_self_modules_fc_parameters_weight__u_new_nonzero = l_self_modules_fc_parameters_weight__u_new_norm > 1e-12
    l_self_modules_fc_parameters_weight__u_new_safe = l_self_modules_fc_parameters_weight__u_new_norm.clamp_min(1e-12)
    l_self_modules_fc_parameters_weight__u_new_unit = l_self_modules_fc_parameters_weight__Wv / l_self_modules_fc_parameters_weight__u_new_safe
    l_self_modules_fc_parameters_weight__u_new = torch.where(l_self_modules_fc_parameters_weight__u_new_nonzero, l_self_modules_fc_parameters_weight__u_new_unit, fc_weight_u)
    l_self_modules_fc_parameters_weight__Wtu = torch.mv(l_self_modules_fc_parameters_weight__nograd_t, l_self_modules_fc_parameters_weight__u_new)
    l_self_modules_fc_parameters_weight__v_new_norm = torch._C._linalg.linalg_vector_norm(l_self_modules_fc_parameters_weight__Wtu)
    l_self_modules_fc_parameters_weight__v_new_nonzero = l_self_modules_fc_parameters_weight__v_new_norm > 1e-12
    l_self_modules_fc_parameters_weight__v_new_safe = l_self_modules_fc_parameters_weight__v_new_norm.clamp_min(1e-12)
    l_self_modules_fc_parameters_weight__v_new_unit = l_self_modules_fc_parameters_weight__Wtu / l_self_modules_fc_parameters_weight__v_new_safe
    l_self_modules_fc_parameters_weight__v_new = torch.where(l_self_modules_fc_parameters_weight__v_new_nonzero, l_self_modules_fc_parameters_weight__v_new_unit, fc_weight_v)
    l_self_modules_fc_parameters_weight__u_update = torch.ops.aten.copy_.default(fc_weight_u, l_self_modules_fc_parameters_weight__u_new)
    l_self_modules_fc_parameters_weight__v_update = torch.ops.aten.copy_.default(fc_weight_v, l_self_modules_fc_parameters_weight__v_new)
    l_self_modules_fc_parameters_weight__and_sigma = fx_spectral_graph_emit_weight_and_sigma(l_self_modules_fc_parameters_weight_, l_self_modules_fc_parameters_weight__u_new, l_self_modules_fc_parameters_weight__v_new, l_self_modules_fc_parameters_weight__v_new_norm, 1e-12, 0)
    l_self_modules_fc_parameters_weight__for_op = l_self_modules_fc_parameters_weight__and_sigma[0]
    l_self_modules_fc_parameters_weight__sigma = l_self_modules_fc_parameters_weight__and_sigma[1]
    linear = torch._C._nn.linear(l_x_, l_self_modules_fc_parameters_weight__for_op, None)
    linear_over_sigma = linear / l_self_modules_fc_parameters_weight__sigma
    linear_biased = linear_over_sigma + l_self_modules_fc_parameters_bias_
    return (linear_biased,)""",
    )


def test_estimate_of_a_cuda_weight_runs_with_autocast_off():
    # CUDA autocast runs mv in fp16/bf16: the backend wraps a CUDA weight's power iteration in an
    # autocast-off region (CPU autocast leaves mv alone: no region). Checked on dynamo's real graph
    # with the weight's recorded example value swapped for a fake CUDA tensor (no GPU needed).
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fx_spectral.graph.compiled import Slot, _rewritten

    dynamo_graphs = []

    def keep(gm, example_inputs):
        dynamo_graphs.append(gm)
        return gm.forward

    torch.compile(_One(), backend=keep)(torch.randn(2, 4))
    (gm,) = dynamo_graphs
    weight = next(n for n in gm.graph.nodes if n.op == "placeholder" and "weight" in n.name)
    slot = Slot(index=[n for n in gm.graph.nodes if n.op == "placeholder"].index(weight), dim=0, source="fc.weight")
    cpu_code = _rewritten(gm, [slot], ["fc.weight"], (True,), BackendConfig()).code
    assert "_enter_autocast" not in cpu_code and "torch.mv" in cpu_code
    with FakeTensorMode():
        weight.meta["example_value"] = torch.empty(3, 4, device="cuda")
    cuda_code = _rewritten(gm, [slot], ["fc.weight"], (True,), BackendConfig()).code
    lines = cuda_code.splitlines()
    enter = next(i for i, line in enumerate(lines) if "_enter_autocast('cuda', None, False, None)" in line)
    leave = next(i for i, line in enumerate(lines) if "_exit_autocast" in line)
    inside = "\n".join(lines[enter:leave])
    assert inside.count("torch.mv") == 2 and "weight_and_sigma" in inside
    assert "linear" not in inside  # the op itself stays under the user's autocast


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def test_autocast_leaves_the_backend_estimate_in_float32(device):
    # Same u/v, one training call under bf16 autocast: the backend's updated u/v equal the eager
    # API's (whose estimate runs with autocast off) to float32 precision; a bf16 mv would be off by ~1e-2.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).to(device)
    eager = copy.deepcopy(model)
    fx_spectral.apply_spectral_norm(eager)
    backend_mod.prepare(model)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, backend=backend(inner="aot_eager"))
    x = torch.randn(16, 64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, ref = compiled(x), eager(x)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)  # the layers themselves run in bf16
    for key, value in eager.state_dict().items():
        if key.endswith(("_u", "_v")):
            assert model.state_dict()[key].dtype == torch.float32
            torch.testing.assert_close(model.state_dict()[key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_golden_dynamo_graph_eval():
    model = _Two().eval()
    (gm,) = _recorded_graphs(model, torch.randn(2, 4))
    assert_expected_inline(
        _code(gm),
        """\
def forward(self, L_self_modules_fc_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_fc_parameters_bias_ : torch.nn.parameter.Parameter, L_x_ : torch.Tensor, L_self_modules_out_parameters_weight_ : torch.nn.parameter.Parameter, fc_weight_u, fc_weight_v, out_weight_u, out_weight_v):
    l_self_modules_fc_parameters_weight_ = L_self_modules_fc_parameters_weight_
    l_self_modules_fc_parameters_bias_ = L_self_modules_fc_parameters_bias_
    l_x_ = L_x_
    l_self_modules_out_parameters_weight_ = L_self_modules_out_parameters_weight_
    l_self_modules_fc_parameters_weight__u_const = fc_weight_u.clone()
    l_self_modules_fc_parameters_weight__v_const = fc_weight_v.clone()
    l_self_modules_fc_parameters_weight__W_v = torch.mv(l_self_modules_fc_parameters_weight_, l_self_modules_fc_parameters_weight__v_const)
    l_self_modules_fc_parameters_weight__uWv = torch.dot(l_self_modules_fc_parameters_weight__u_const, l_self_modules_fc_parameters_weight__W_v)
    l_self_modules_fc_parameters_weight__uWv_zero = l_self_modules_fc_parameters_weight__uWv == 0
    l_self_modules_fc_parameters_weight__sigma = l_self_modules_fc_parameters_weight__uWv.masked_fill(l_self_modules_fc_parameters_weight__uWv_zero, 1e-12)
    linear = torch._C._nn.linear(l_x_, l_self_modules_fc_parameters_weight_, None)
    linear_over_sigma = linear / l_self_modules_fc_parameters_weight__sigma
    linear_biased = linear_over_sigma + l_self_modules_fc_parameters_bias_
    relu = torch.relu(linear_biased)
    l_self_modules_out_parameters_weight__u_const = out_weight_u.clone()
    l_self_modules_out_parameters_weight__v_const = out_weight_v.clone()
    l_self_modules_out_parameters_weight__W_v = torch.mv(l_self_modules_out_parameters_weight_, l_self_modules_out_parameters_weight__v_const)
    l_self_modules_out_parameters_weight__uWv = torch.dot(l_self_modules_out_parameters_weight__u_const, l_self_modules_out_parameters_weight__W_v)
    l_self_modules_out_parameters_weight__uWv_zero = l_self_modules_out_parameters_weight__uWv == 0
    l_self_modules_out_parameters_weight__sigma = l_self_modules_out_parameters_weight__uWv.masked_fill(l_self_modules_out_parameters_weight__uWv_zero, 1e-12)
    linear_1 = torch._C._nn.linear(relu, l_self_modules_out_parameters_weight_, None)
    linear_1_over_sigma = linear_1 / l_self_modules_out_parameters_weight__sigma
    return (linear_1_over_sigma,)""",
    )


# --------------------------------------------------------------------------------------------
# Numerics: the fourteen module types (aot_eager) and a mixed model (inductor)
# --------------------------------------------------------------------------------------------


class _Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


LAYERS = {
    "Linear": (lambda: nn.Linear(6, 5), (4, 6)),
    "Conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 8)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2), (2, 3, 7, 7)),
    "Conv3d": (lambda: nn.Conv3d(2, 4, 2), (2, 2, 4, 4, 4)),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 5)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), (2, 4, 5, 5)),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(2, 3, 2), (2, 2, 3, 3, 3)),
    "LazyLinear": (lambda: nn.LazyLinear(5), (4, 6)),
    "LazyConv1d": (lambda: nn.LazyConv1d(4, 3), (2, 3, 8)),
    "LazyConv2d": (lambda: nn.LazyConv2d(4, 3), (2, 3, 6, 6)),
    "LazyConv3d": (lambda: nn.LazyConv3d(4, 2), (2, 2, 4, 4, 4)),
    "LazyConvTranspose1d": (lambda: nn.LazyConvTranspose1d(4, 3), (2, 3, 5)),
    "LazyConvTranspose2d": (lambda: nn.LazyConvTranspose2d(4, 3, stride=2), (2, 3, 4, 4)),
    "LazyConvTranspose3d": (lambda: nn.LazyConvTranspose3d(3, 2), (2, 2, 3, 3, 3)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_matches_torch_spectral_norm_aot_eager(kind):
    make, shape = LAYERS[kind]
    model = _Wrap(make())
    cnt = check_protocol(model, (torch.randn(shape),), backend(inner="aot_eager"), atol=1e-6)
    assert sorted(model.state_dict()) == ["layer.bias", "layer.weight", "layer.weight_u", "layer.weight_v"]
    assert cnt.frame_count == 1, "recompiled across steps or on eval()"


class _Mixed(nn.Module):
    """Conv2d -> ConvTranspose2d (dim=1) -> Linear, the shared inductor model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2)
        self.fc = nn.Linear(2 * 13 * 13, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.up(F.relu(self.conv(x)))).flatten(1))


@pytest.mark.slow
def test_matches_torch_spectral_norm_inductor():
    model = _Mixed()
    cnt = check_protocol(model, (torch.randn(2, 3, 8, 8),), backend(), atol=1e-5)
    assert cnt.frame_count == 1
    assert {k for k in model.state_dict() if k.endswith(("_u", "_v"))} == {
        f"{m}.weight_{k}" for m in ("conv", "up", "fc") for k in "uv"
    }


def _post_grad_addmm_inputs(compile_model) -> list[tuple[int, ...]]:
    """The shapes of the ``inp`` of every ``aten.addmm`` in inductor's post-grad graphs (forward and
    backward) of one training step of a small MLP whose outputs are divided by sigma."""
    shapes: list[tuple[int, ...]] = []
    graphs: list[int] = []

    def record(graph: torch.fx.Graph) -> None:
        graphs.append(len(graph.nodes))
        for n in graph.nodes:
            if n.target is torch.ops.aten.addmm.default:
                shapes.append(tuple(n.args[0].meta["val"].shape))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    compiled = compile_model(model, {"post_grad_custom_post_pass": record})
    compiled(torch.randn(4, 64)).sum().backward()
    assert model[0].weight.grad is not None and len(graphs) == 2  # the forward and the backward were seen
    return shapes


@pytest.mark.parametrize("route", ["backend", "eager API + inductor"])
def test_sigma_term_of_the_weight_gradient_is_no_addmm_input(route):
    """The rank-one sigma term of W's gradient must not reach inductor as ``add(mm(...), term)``:
    on CPU inductor rewrites that into ``addmm(term, ...)``, which writes the W-sized term and
    copies it before the GEMM (two extra passes over W per step). Written as a subtraction after
    the GEMM it stays one fused pass, so no addmm may take a 2-D (W-sized) input."""
    if route == "backend":
        def compile_model(model, options):
            return torch.compile(model, backend=backend(inner_options=options))
    else:
        def compile_model(model, options):
            fx_spectral.apply_spectral_norm(model)
            return torch.compile(model, options=options)
    shapes = _post_grad_addmm_inputs(compile_model)
    assert all(len(shape) == 1 for shape in shapes), shapes


# --------------------------------------------------------------------------------------------
# Behaviour: graph breaks, eager-normalized weights, state, filters, dynamic shapes
# --------------------------------------------------------------------------------------------


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def test_every_subgraph_of_a_graph_break_is_rewritten():
    model = _Broken()
    cnt = check_protocol(model, (torch.randn(4, 6),), backend(inner="aot_eager"), atol=1e-6)
    assert cnt.frame_count == 2
    assert {"a.weight_u", "b.weight_u"} <= set(model.state_dict())


def test_weights_normalized_by_the_eager_api_are_not_normalized_twice():
    model = _Two()
    fx_spectral.spectral_norm(model.fc)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend(inner="aot_eager"))
    x = torch.randn(4, 4)
    fx_spectral.spectral_norm(ref.out)
    y = compiled(x)  # creates out.weight_u/v (one update); fc's come from the eager API
    ref.out.weight_u.copy_(model.out.weight_u)
    ref.out.weight_v.copy_(model.out.weight_v)
    ref.fc.weight_u.copy_(model.fc.weight_u)
    ref.fc.weight_v.copy_(model.fc.weight_v)
    torch.testing.assert_close(compiled(x), ref(x), atol=1e-6, rtol=1e-6)
    assert y.shape == (4, 2)
    assert sorted(k for k in model.state_dict() if k.endswith("_u")) == ["fc.weight_u", "out.weight_u"]


def test_state_dict_moves_between_backend_and_eager_api():
    model = _Two()
    compiled = torch.compile(model, backend=backend(inner="aot_eager"))
    x = torch.randn(4, 4)
    compiled(x)
    eager = _Two()
    fx_spectral.apply_spectral_norm(eager)
    assert sorted(eager.state_dict()) == sorted(model.state_dict())
    eager.load_state_dict(model.state_dict())
    model.eval(), eager.eval()
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)
    # and back: load other u/v into the compiled model; the next call reads them
    fresh = _Two()
    fx_spectral.apply_spectral_norm(fresh)
    fresh.eval()
    model.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(compiled(x), fresh(x), atol=1e-6, rtol=1e-6)


def test_filter_fn_and_name():
    model = _Two()
    torch.compile(model, backend=backend(inner="eager", filter_fn=lambda m, fqn: fqn != "out"))(torch.randn(2, 4))
    assert sorted(k for k in model.state_dict() if k.endswith("_u")) == ["fc.weight_u"]
    torch._dynamo.reset()
    model = _Two()
    torch.compile(model, backend=backend(inner="eager", name="bias"))(torch.randn(2, 4))
    assert not any(k.endswith("_u") for k in model.state_dict())  # biases feed no op as a weight


def test_plain_tensor_weight_is_warned_about():
    def f(x, w):
        return F.linear(x, w)

    with pytest.warns(UserWarning, match="not an nn.Parameter"):
        torch.compile(f, backend=backend(inner="eager"))(torch.randn(2, 4), torch.randn(3, 4))


def test_dynamic_shapes_train_and_eval():
    torch.manual_seed(0)
    model = _Two()
    cnt = CompileCounterWithBackend(backend(inner="aot_eager"))
    compiled = torch.compile(model, backend=cnt, dynamic=True)
    compiled(torch.randn(3, 4))
    eager = copy.deepcopy(model)
    _strip_uv(eager)
    fx_spectral.apply_spectral_norm(eager)
    eager.load_state_dict(model.state_dict())
    for batch in (5, 2):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)
    model.eval(), eager.eval()
    x = torch.randn(7, 4)
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.fc.weight_u, eager.fc.weight_u, atol=1e-6, rtol=1e-6)
    assert cnt.frame_count == 1


def test_survives_dtype_change_and_recompile():
    model = _Two()
    compiled = torch.compile(model, backend=backend(inner="aot_eager"))
    compiled(torch.randn(2, 4))
    u = model.fc.weight_u.clone()
    model.double().eval()  # converts u/v too; dynamo recompiles (new dtype) and the backend restores float32
    y = compiled(torch.randn(2, 4, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert model.fc.weight_u.dtype == torch.float32 and model.out.weight_v.dtype == torch.float32
    assert torch.equal(model.fc.weight_u, u)  # reused (eval: not updated), not re-created
    eager = _Two().double()
    fx_spectral.apply_spectral_norm(eager)
    eager.load_state_dict(model.state_dict())
    eager.eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-12, rtol=1e-12)
