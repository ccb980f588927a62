"""The "spectral" backend uses each module's own u/v, whichever graph dynamo runs it with.

Dynamo reuses one compiled graph for every instance of a class (parameters are graph inputs): two
instances of a model, N identical blocks compiled one by one (TorchTitan's ``apply_compile``), the
same under activation checkpointing (plain and selective), and a repeated block split by a graph
break. Each case: every block's outputs, weights and u/v over 3 SGD steps (then in eval) equal the
eager API (``fx_spectral.spectral_norm``) applied to an identical copy with identical u/v, and the
graph really is reused (fewer compiled frames than blocks). Also: a strict checkpoint load before
the first call, the warning for a weight whose owner is out of reach, one weight feeding two ops.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import fx_spectral
from fx_spectral.graph.backend import backend
from fx_spectral.nn import normalize_weight

TOL = dict(atol=1e-6, rtol=1e-6)
N_BLOCKS = 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    """A residual MLP block (two Linears of different shapes, so u and v differ in length)."""

    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 6)
        self.graph_break = graph_break

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.graph_break:
            torch._dynamo.graph_break()
        return x + self.fc2(h)


def _selective_policy(ctx, op, *args, **kwargs):
    # TorchTitan's op-level selective AC saves matmul outputs and recomputes the rest
    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class Checkpointed(nn.Module):
    """``checkpoint(block, x, use_reentrant=False)``, optionally selective (``context_fn``), as TorchTitan's AC."""

    def __init__(self, block: nn.Module, selective: bool):
        super().__init__()
        self.block = block
        self.selective = selective

    def forward(self, x):
        if self.selective:
            ctx = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
            return checkpoint(self.block, x, use_reentrant=False, context_fn=ctx)
        return checkpoint(self.block, x, use_reentrant=False)


class Stack(nn.Module):
    def __init__(self, make_block, graph_break: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(make_block() for _ in range(N_BLOCKS))
        self.graph_break = graph_break

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
            if self.graph_break:
                torch._dynamo.graph_break()
        return x


def _owners_with_uv(model: nn.Module) -> list[tuple[str, str]]:
    return [
        (fqn, k[:-2])
        for fqn, m in model.named_modules()
        for k in m._buffers
        if k.endswith("_u") and k[:-2] in m._parameters
    ]


def _eager_reference(model: nn.Module, ref: nn.Module) -> nn.Module:
    """``ref`` (an uncompiled copy of ``model``) normalized by the eager API where ``model`` has u/v, with its u/v."""
    for fqn, name in _owners_with_uv(model):
        fx_spectral.spectral_norm(ref.get_submodule(fqn), name)
    ref.load_state_dict(model.state_dict())  # strict: the same weights and u/v
    return ref


def _uv(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in model.state_dict().items() if k.endswith(("_u", "_v"))}


def check_against_eager(cases, x, *, expected_owners):
    """Each ``(call, state, ref)``: the compiled ``call`` vs ``ref`` (eager API, same u/v): 3 SGD steps, then eval.

    ``state`` is the module holding the parameters and u/v that ``call`` runs on (``call`` itself,
    or the plain module under a ``torch.compile`` wrapper), with the keys of ``ref``. Every model is
    called in turn at each step, so a model that read or wrote another's u/v is caught.
    """
    for _, state, _ in cases:
        assert sorted(_owners_with_uv(state)) == sorted(expected_owners), "u/v missing on some blocks"
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for _, state, ref in cases for m in (state, ref)]
    for step in range(3):
        for call, _, ref in cases:
            y, y_ref = call(x), ref(x)
            torch.testing.assert_close(y, y_ref, **TOL, msg=lambda m, step=step: f"step {step}: {m}")
            for out in (y, y_ref):
                out.square().mean().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for _, state, ref in cases:
            torch.testing.assert_close(_uv(state), _uv(ref), **TOL)
            for (k, p), (_, q) in zip(state.named_parameters(), ref.named_parameters()):
                torch.testing.assert_close(p, q, **TOL, msg=lambda m, k=k: f"parameter {k}: {m}")
    for call, state, ref in cases:
        state.eval(), ref.eval()
        before = _uv(state)
        torch.testing.assert_close(call(x), ref(x), **TOL)
        assert all(torch.equal(t, before[k]) for k, t in _uv(state).items()), "eval updated u/v"
    # the blocks' u/v really are their own: no two blocks ended with the same u
    us = [t for k, t in _uv(cases[0][1]).items() if k.endswith("fc1.weight_u")]
    assert all(not torch.equal(a, b) for i, a in enumerate(us) for b in us[i + 1 :])


BLOCK_OWNERS = [(f"layers.{i}.{fc}", "weight") for i in range(N_BLOCKS) for fc in ("fc1", "fc2")]


def _first_call_eval(model, x):
    """One call in eval mode: the backend creates every block's u/v and updates nothing."""
    model.eval()
    model(x)
    model.train()


# --------------------------------------------------------------------------------------------
# (a)-(d): graph reuse across instances and blocks
# --------------------------------------------------------------------------------------------


def test_two_instances_compiled_separately_use_their_own_state():
    cnt = CompileCounterWithBackend(backend(inner="aot_eager"))
    models = [Block() for _ in range(2)]
    copies = [copy.deepcopy(m) for m in models]
    compiled = [torch.compile(m, backend=cnt) for m in models]
    x = torch.randn(4, 6)
    for c in compiled:
        _first_call_eval(c, x)
    refs = [_eager_reference(m, r) for m, r in zip(models, copies)]
    u0 = models[0].fc1.weight_u.clone()
    compiled[1](x)  # a training call on the second instance must not move the first one's u/v
    refs[1](x)
    assert torch.equal(models[0].fc1.weight_u, u0)
    check_against_eager(list(zip(compiled, models, refs)), x, expected_owners=[("fc1", "weight"), ("fc2", "weight")])
    assert cnt.frame_count == 1, "the second instance did not reuse the first one's graph: the test proves nothing"


def _stack_compiled_per_block(make_block, how, cnt):
    """``(model, state, ref)``: a Stack whose blocks are compiled one by one, as TorchTitan's apply_compile does."""
    model = Stack(make_block)
    ref = copy.deepcopy(model)
    state = copy.copy(model)  # the same blocks, without the torch.compile wrappers
    state._modules = dict(model._modules)
    state.layers = nn.ModuleList(list(model.layers))
    for i, block in enumerate(model.layers):
        if how == "module.compile":
            block.compile(backend=cnt)
        else:
            model.layers[i] = torch.compile(block, backend=cnt)
    return model, state, ref


@pytest.mark.parametrize("how", ["module.compile", "torch.compile"])
def test_blocks_compiled_one_by_one_use_their_own_state(how):
    cnt = CompileCounterWithBackend(backend(inner="aot_eager"))
    model, state, ref = _stack_compiled_per_block(Block, how, cnt)
    x = torch.randn(4, 6, requires_grad=True)  # every block sees an input that requires grad: one graph
    _first_call_eval(model, x)
    check_against_eager([(model, state, _eager_reference(state, ref))], x, expected_owners=BLOCK_OWNERS)
    assert cnt.frame_count < N_BLOCKS, "every block got its own graph: the test proves nothing"


@pytest.mark.parametrize("selective", [False, True], ids=["checkpoint", "selective_checkpoint"])
def test_blocks_under_activation_checkpointing_use_their_own_state(selective):
    """checkpoint(block, use_reentrant=False) per block, then compiled per block (TorchTitan: apply_ac, apply_compile).

    The graph holds a tag_activation_checkpoint op whose subgraph uses the weights; the backend
    normalizes them outside it (the u/v update runs once per call, never in a recomputation).
    """
    cnt = CompileCounterWithBackend(backend(inner="aot_eager"))
    model, state, ref = _stack_compiled_per_block(lambda: Checkpointed(Block(), selective), "module.compile", cnt)
    x = torch.randn(4, 6, requires_grad=True)
    _first_call_eval(model, x)
    owners = [(f"layers.{i}.block.{fc}", "weight") for i in range(N_BLOCKS) for fc in ("fc1", "fc2")]
    # the reference runs without checkpointing: it changes what is kept for backward, not the numbers
    check_against_eager([(model, state, _Plain(_eager_reference(state, ref)))], x, expected_owners=owners)
    assert cnt.frame_count < N_BLOCKS, "every block got its own graph: the test proves nothing"


class _Plain(nn.Module):
    """Runs the blocks of a Stack of Checkpointed blocks without checkpointing (the eager reference)."""

    def __init__(self, stack: nn.Module):
        super().__init__()
        self.layers = stack.layers

    def forward(self, x):
        for layer in self.layers:
            x = layer.block(x)
        return x


@pytest.mark.parametrize("where", ["in_block", "in_model"])
def test_repeated_block_with_a_graph_break_uses_its_own_state(where):
    cnt = CompileCounterWithBackend(backend(inner="aot_eager"))
    model = Stack(lambda: Block(graph_break=where == "in_block"), graph_break=where == "in_model")
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=cnt)
    x = torch.randn(4, 6, requires_grad=True)
    _first_call_eval(compiled, x)
    check_against_eager([(compiled, model, _eager_reference(model, ref))], x, expected_owners=BLOCK_OWNERS)
    assert cnt.frame_count < 2 * N_BLOCKS, "no graph was reused: the test proves nothing"


# --------------------------------------------------------------------------------------------
# A strict checkpoint load before the first call
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["torch.compile", "per_block", "string_backend"])
def test_checkpoint_loads_strictly_before_the_first_call(how):
    from fx_spectral.graph.backend import prepare

    eager = Stack(Block)
    fx_spectral.apply_spectral_norm(eager)
    x = torch.randn(4, 6)
    eager(x)  # a training call: u/v are no longer their initial values
    checkpoint_ = copy.deepcopy(eager.state_dict())

    model = Stack(Block)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # why prepare() exists: no u/v before the first call
        model.load_state_dict(checkpoint_)
    be = backend(inner="aot_eager")
    if how == "per_block":
        for block in model.layers:
            block.compile(backend=be)
        call = model
    elif how == "string_backend":  # the module-level prepare(); aot_eager keeps the test fast
        call = torch.compile(model, backend="spectral", options={"inner": "aot_eager"})
    else:
        call = torch.compile(model, backend=be)
    (prepare(model) if how == "string_backend" else be.prepare(model)).load_state_dict(checkpoint_)  # strict
    for key, t in checkpoint_.items():
        assert torch.equal(model.state_dict()[key], t)
    for _ in range(2):  # the loaded u/v are the ones used and updated
        torch.testing.assert_close(call(x), eager(x), **TOL)
    torch.testing.assert_close(_uv(model), _uv(eager), **TOL)


def test_prepare_covers_the_layers_the_backend_normalizes():
    from fx_spectral.graph.backend import prepare

    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ConvTranspose2d(3, 4, (2, 3)), nn.Flatten(), nn.LazyLinear(2))
    fx_spectral.spectral_norm(model[0])  # the eager API's: left alone
    with pytest.warns(UserWarning, match=r"3\.weight is a Lazy parameter"):
        prepare(model)
    assert sorted(k for k in model.state_dict() if k.endswith(("_u", "_v"))) == [
        "0.weight_u", "0.weight_v", "1.weight_u", "1.weight_v"
    ]
    assert model[1].weight_u.shape == (4,) and model[1].weight_v.shape == (3 * 2 * 3,)  # ConvTranspose: dim=1
    u = model[1].weight_u.clone()
    with pytest.warns(UserWarning, match="Lazy"):
        prepare(model)  # existing u/v are kept
    assert torch.equal(model[1].weight_u, u)
    # what it creates is what the backend uses: a call in eval mode changes nothing
    compiled = torch.compile(model, backend=backend(inner="aot_eager"))
    model.eval()
    compiled(torch.randn(1, 2, 5, 5))
    assert torch.equal(model[1].weight_u, u) and sorted(model[3].state_dict()) == [
        "bias", "weight", "weight_u", "weight_v"
    ]
    only = prepare(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)), filter_fn=lambda m, fqn: fqn == "1")
    assert sorted(k for k in only.state_dict() if k.endswith("_u")) == ["1.weight_u"]


# --------------------------------------------------------------------------------------------
# Owners out of reach, one weight feeding two ops
# --------------------------------------------------------------------------------------------


def test_parameter_argument_is_normalized_on_its_module_and_an_unowned_one_is_warned_about_once():
    lin = nn.Linear(4, 3).eval()

    def f(x, w):
        return F.linear(x, w)

    compiled = torch.compile(f, backend=backend(inner="aot_eager"))
    x = torch.randn(2, 4)
    plain = copy.deepcopy(nn.Sequential(lin))
    y = compiled(x, lin.weight)  # lin (a local of this calling frame) owns it: u/v go there
    ref = _eager_reference(nn.Sequential(lin), plain)[0].eval()
    torch.testing.assert_close(y + lin.bias, ref(x), **TOL)  # f has no bias term
    free = nn.Parameter(torch.randn(3, 4))  # held by no module at all: same shapes, the graph is reused
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, y2 = compiled(x, free), compiled(x, free)
    messages = [str(w.message) for w in caught if "spectral backend" in str(w.message)]
    assert len(messages) == 1, messages  # once, not at every call
    assert "L['w']" in messages[0] and "(3, 4)" in messages[0] and "left unnormalized" in messages[0]
    torch.testing.assert_close(y1, F.linear(x, free))
    torch.testing.assert_close(y2, F.linear(x, free))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


def test_one_weight_feeding_two_ops_gets_one_normalization_for_both():
    model = _Twice()
    compiled = torch.compile(model, backend=backend(inner="aot_eager"))
    x = torch.randn(3, 5)
    model.eval()
    compiled(x)  # creates u/v
    model.train()
    # start far from the top singular pair, so that one power iteration and two give different u/v
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.fc.weight_u.copy_(F.normalize(torch.randn(5, generator=g), dim=0))
        model.fc.weight_v.copy_(F.normalize(torch.randn(5, generator=g), dim=0))
    u, v = model.fc.weight_u.clone(), model.fc.weight_v.clone()
    y = compiled(x)
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    w_bar = normalize_weight(w, u, v, n_power_iterations=1)  # NB: u, v now hold one iteration's result
    torch.testing.assert_close(y, F.linear(torch.tanh(F.linear(x, w_bar, b)), w_bar, b), **TOL)
    torch.testing.assert_close(model.fc.weight_u, u, **TOL)
    torch.testing.assert_close(model.fc.weight_v, v, **TOL)
    u2, v2 = u.clone(), v.clone()
    normalize_weight(w, u2, v2, n_power_iterations=1)
    assert not torch.allclose(u2, u, atol=1e-4), "one and two iterations agree: the check above proves nothing"


@pytest.mark.parametrize("policy", ["SelectiveAC", "FullAC"])
def test_torchtitan_apply_ac_then_apply_compile(policy):
    """TorchTitan's own activation checkpointing (its default per-op selective policy, or full) and
    its per-block apply_compile, with backend="spectral": every block matches the eager API."""
    pytest.importorskip("torchtitan")
    from fx_spectral.integrations.torchtitan import _triton_shim

    _triton_shim.install()  # TorchTitan's distributed package imports triton; a stand-in on CPU-only machines
    from torchtitan.config import CompileConfig
    from torchtitan.distributed import activation_checkpoint as titan_ac
    from torchtitan.distributed.compile import apply_compile

    class _Dims:  # apply_compile only asks whether tensor parallelism is on
        tp_enabled = False

    model = Stack(Block)
    ref = copy.deepcopy(model)
    cls = getattr(titan_ac, policy)
    cnt = CompileCounterWithBackend(backend(inner="aot_eager"))
    # apply_compile sets global dynamo flags and apply() turns dynamo's LRU cache off: restore both after
    with torch._dynamo.config.patch(
        capture_scalar_outputs=True, skip_fwd_side_effects_in_bwd_under_checkpoint=True
    ):
        try:
            cls(cls.Config()).apply(model)
            apply_compile(model, compile_config=CompileConfig(enable=True, backend=cnt), parallel_dims=_Dims())
            x = torch.randn(4, 6, requires_grad=True)
            _first_call_eval(model, x)
            fx_spectral.apply_spectral_norm(ref)
            ref.load_state_dict(model.state_dict())  # the wrappers' state_dict has the plain keys
            owners = [(f"layers.{i}._checkpoint_wrapped_module.{fc}", "weight") for i in range(N_BLOCKS)
                      for fc in ("fc1", "fc2")]
            check_against_eager([(model, model, ref)], x, expected_owners=owners)
        finally:
            torch._C._dynamo.eval_frame._set_lru_cache(True)
    assert cnt.frame_count < N_BLOCKS, "every block got its own graph: the test proves nothing"


def test_find_weight_uses_nested_follows_checkpoint_bodies_and_reports_other_subgraphs():
    from fx_spectral.graph.rewrite import find_weight_uses_nested

    def body_fn(x, w, wt):
        return F.conv_transpose1d(F.linear(x, w).unsqueeze(0), wt)

    root = nn.Module()
    root.body = torch.fx.symbolic_trace(body_fn)
    graph = torch.fx.Graph()
    x, w, wt = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("wt")
    body = graph.get_attr("body")
    ckpt = graph.call_function(torch.ops.higher_order.tag_activation_checkpoint, (body, x, w, wt), {})
    other = graph.call_function(torch.ops.higher_order.invoke_subgraph, (body, "id", x, w, wt), {})
    graph.output((ckpt, other))
    uses, opaque, mixed = find_weight_uses_nested(torch.fx.GraphModule(root, graph))
    assert uses == {w: [(ckpt, 0)], wt: [(ckpt, 1)]}  # conv_transpose: dim 1, from inside the body
    assert opaque == [other] and mixed == []


def test_filter_fn_is_asked_per_owner_on_a_shared_graph():
    model = Stack(Block)
    ref = copy.deepcopy(model)
    skip = model.layers[1].fc1  # the blocks share one graph; this weight alone stays raw
    cnt = CompileCounterWithBackend(backend(inner="aot_eager", filter_fn=lambda m, fqn: m is not skip))
    for block in model.layers:
        block.compile(backend=cnt)
    x = torch.randn(4, 6, requires_grad=True)
    _first_call_eval(model, x)
    owners = [o for o in BLOCK_OWNERS if o[0] != "layers.1.fc1"]
    check_against_eager([(model, model, _eager_reference(model, ref))], x, expected_owners=owners)
    assert cnt.frame_count == 1


class _ReadsItsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + self.fc.weight.square().sum()  # a second, non-linear read of the weight


def test_other_reads_of_a_weight_inside_a_checkpointed_region_are_warned_about():
    model = Checkpointed(_ReadsItsWeight(), selective=False)
    with pytest.warns(UserWarning, match=r"also read by ops other than its linear / conv op.*W / sigma too"):
        torch.compile(model, backend=backend(inner="aot_eager"))(torch.randn(2, 4))
