"""fx_spectral.power: the one power-iteration core and the one u/v rule.

normalize_or_keep (plain and overflow-safe) on edge cases, iterate against torch's spectral_norm,
the warm-up constants, compute_dtype, start vectors, and ensure_uv's rules (create, keep, cast
back to float32, errors naming the buffer, nothing changed on error) at the helper itself and
through the graph transform and the backend's prepare; the graph emitter's nodes against iterate.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import fx_spectral
from fx_spectral import methods, power, projections
from fx_spectral import nn as sn
from fx_spectral.graph import owners, transform
from fx_spectral.graph.backend import prepare

TOL = dict(atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# normalize_or_keep
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overflow_safe", [False, True])
def test_zero_vector_keeps_the_old_one(overflow_safe):
    old = F.normalize(torch.randn(5), dim=0)
    unit, norm = power.normalize_or_keep(torch.zeros(5), old, 1e-12, overflow_safe=overflow_safe)
    assert torch.equal(unit, old) and float(norm) == 0.0
    # below eps counts as zero too
    unit, _ = power.normalize_or_keep(torch.full((5,), 1e-14), old, 1e-12, overflow_safe=overflow_safe)
    assert torch.equal(unit, old)


def test_plain_rule_is_bit_identical_to_dividing_by_the_norm():
    t = torch.randn(33)
    unit, norm = power.normalize_or_keep(t, torch.zeros(33), 1e-12)
    assert torch.equal(norm, torch.linalg.vector_norm(t)) and torch.equal(unit, t / torch.linalg.vector_norm(t))


def test_eager_cpu_branch_and_traced_where_give_the_same_vectors():
    """Eager on the CPU the rule branches on the norm in Python; traced (make_fx, torch.compile) or
    under torch.func it stays the where() form. Same values either way, and the kept vector is a
    copy (it gets saved for backward while the buffer it came from moves on)."""
    old = F.normalize(torch.randn(6), dim=0)
    for t in (torch.randn(6), torch.zeros(6)):
        unit, norm = power.normalize_or_keep(t, old, 1e-12)
        traced = torch.fx.experimental.proxy_tensor.make_fx(lambda a, b: power.normalize_or_keep(a, b, 1e-12))(t, old)
        assert any(n.target is torch.ops.aten.where.self for n in traced.graph.nodes)  # no data-dependent branch
        t_unit, t_norm = traced(t, old)
        assert torch.equal(unit, t_unit) and torch.equal(norm, t_norm)
        v_unit, _ = torch.func.vmap(lambda a, b: power.normalize_or_keep(a, b, 1e-12))(t[None], old[None])
        assert torch.equal(v_unit[0], unit)
    kept, _ = power.normalize_or_keep(torch.zeros(6), old, 1e-12)
    assert torch.equal(kept, old) and kept.data_ptr() != old.data_ptr()


def test_huge_entries_stay_finite_only_with_the_overflow_safe_rule():
    t = torch.tensor([3e30, -4e30, 1e29])  # |t|^2 overflows float32
    old = torch.tensor([1.0, 0.0, 0.0])
    plain, plain_norm = power.normalize_or_keep(t, old, 1e-12)
    assert torch.isinf(plain_norm) and float(plain.norm()) == 0.0  # t / inf: not a unit vector
    safe, safe_norm = power.normalize_or_keep(t, old, 1e-12, overflow_safe=True)
    assert torch.isfinite(safe).all() and float(safe.norm()) == pytest.approx(1.0, abs=1e-6)
    ref = t.double() / t.double().norm()
    torch.testing.assert_close(safe.double(), ref, **TOL)
    assert float(safe_norm) == pytest.approx(float(t.double().norm()), rel=1e-5)  # |t| fits, |t|^2 does not


@pytest.mark.parametrize("overflow_safe", [False, True])
def test_batched_rows_are_independent(overflow_safe):
    t = torch.randn(4, 6)
    t[2] = 0
    old = torch.randn(4, 6)
    unit, norm = power.normalize_or_keep(t, old, 1e-12, overflow_safe=overflow_safe)
    assert norm.shape == (4,)
    for i in range(4):
        u_i, n_i = power.normalize_or_keep(t[i], old[i], 1e-12, overflow_safe=overflow_safe)
        torch.testing.assert_close(unit[i], u_i, **TOL)
        torch.testing.assert_close(norm[i], n_i, **TOL)
    assert torch.equal(unit[2], old[2])


def test_dim_none_normalizes_the_whole_tensor():
    # operator-mode u/v are shaped like one example: one vector, whatever its shape
    t = torch.randn(3, 4, 5)
    unit, norm = power.normalize_or_keep(t, torch.zeros_like(t), 1e-12, dim=None)
    assert norm.shape == () and float(unit.norm()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(unit, t / t.norm(), **TOL)


# --------------------------------------------------------------------------------------------
# iterate, the constants, compute_dtype
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dim", [((5, 3), 0), ((4, 3, 2, 2), 0), ((3, 4, 2, 2), 1)], ids=["linear", "conv", "conv_t"]
)
def test_weight_and_sigma_gradient_is_the_op_gradient_plus_the_rank_one_term(shape, dim):
    """weight_and_sigma's W view and sigma give W the gradient autograd gives W through the op and
    through sigma = u^T W_mat v (u, v constants), in W's own layout, as one sum."""
    from fx_spectral.graph.emit import weight_and_sigma
    from fx_spectral.matrices import outer_in_layout

    torch.manual_seed(0)
    w = torch.randn(shape, requires_grad=True)
    mat = w.detach().movedim(dim, 0).flatten(1)
    u, v = F.normalize(torch.randn(mat.shape[0]), dim=0), F.normalize(torch.randn(mat.shape[1]), dim=0)
    assert torch.equal(outer_in_layout(u, v, w.shape, dim).movedim(dim, 0).flatten(1), torch.outer(u, v))
    g_op = torch.randn(shape)
    w_op, sigma = weight_and_sigma(w, u, v, torch.tensor(2.0), 1e-12, dim)
    ((w_op * g_op).sum() + 3 * sigma).backward()
    ref = w.detach().clone().requires_grad_()
    ((ref * g_op).sum() + 3 * (u @ ref.movedim(dim, 0).flatten(1) @ v)).backward()
    torch.testing.assert_close(w.grad, ref.grad)
    assert float(sigma) == 2.0  # the value is the given norm (clamped at eps), not recomputed
    # the view unused (an op reading the raw weight): the sigma term alone
    w.grad = None
    weight_and_sigma(w, u, v, torch.tensor(2.0), 1e-12, dim)[1].backward()
    torch.testing.assert_close(w.grad, outer_in_layout(u, v, w.shape, dim))


def test_constants():
    assert power.N_WARMUP == 15 and power.TORCH_REGISTER_STEP == 1  # torch's __init__ and register check
    assert power.N_INIT == 16 == sn.N_WARMUP_ITERATIONS  # eager/transform/backend buffers: torch parity
    assert methods.N_WARMUP_ITERATIONS == projections._DEFAULT_FRESH_ITERATIONS == 15  # constrain's fresh starts
    assert power.n_fresh(2) == 17


@pytest.mark.parametrize("factory,dim", [(lambda: nn.Linear(7, 5), 0), (lambda: nn.Conv2d(3, 4, 3), 0),
                                         (lambda: nn.ConvTranspose2d(4, 6, 3), 1)])
def test_init_and_iterate_equal_torch_spectral_norm(factory, dim):
    layer = factory()
    torch.manual_seed(1)
    ref = torch_spectral_norm(copy.deepcopy(layer))  # 15 steps in __init__, 1 in register's check
    sn_ref = ref.parametrizations.weight[0]
    torch.manual_seed(1)
    u, v = power.init_uv(layer.weight, dim, 1e-12)  # N_INIT steps from the same random draw
    torch.testing.assert_close(u, sn_ref._u, **TOL)
    torch.testing.assert_close(v, sn_ref._v, **TOL)
    # 3 training forwards of torch = 3 more steps of iterate, torch's order
    x = torch.randn(2, *((7,) if isinstance(layer, nn.Linear) else (layer.in_channels, 6, 6)))
    for _ in range(3):
        ref(x)
    w_mat = sn.weight_matrix(layer.weight.detach(), dim)
    u3, v3, sigma = power.iterate(w_mat, None, u, v, 3, 1e-12)
    torch.testing.assert_close(u3, sn_ref._u, **TOL)
    torch.testing.assert_close(v3, sn_ref._v, **TOL)
    torch.testing.assert_close(sigma, torch.dot(u3, w_mat @ v3), **TOL)
    # the matvec form gives the same steps
    u3b, v3b, _ = power.iterate(lambda x: w_mat @ x, lambda x: w_mat.t() @ x, u, v, 3, 1e-12)
    torch.testing.assert_close(u3b, u3, **TOL)
    torch.testing.assert_close(v3b, v3, **TOL)


def test_eager_init_runs_torchs_16_steps_not_15():
    layer = nn.Linear(64, 64)  # top singular values close together: not converged after 15 steps
    torch.manual_seed(2)
    ref = torch_spectral_norm(copy.deepcopy(layer)).parametrizations.weight[0]
    torch.manual_seed(2)
    w_mat = layer.weight.detach()
    u0 = F.normalize(torch.randn(64), dim=0)
    v0 = F.normalize(torch.randn(64), dim=0)
    u15, _, _ = power.iterate(w_mat, None, u0, v0, power.N_WARMUP, 1e-12)
    u16, _, _ = power.iterate(w_mat, None, u0, v0, power.N_INIT, 1e-12)
    torch.testing.assert_close(u16, ref._u, **TOL)
    assert not torch.allclose(u15, ref._u, atol=1e-6)  # the register step matters


def test_iterate_batched_equals_a_loop_and_zero_steps_return_the_inputs():
    W = torch.randn(3, 5, 4)
    u0, v0 = torch.zeros(3, 5), F.normalize(torch.randn(3, 4), dim=-1)
    u, v, norm = power.iterate(W, None, u0, v0, 4, 1e-12, overflow_safe=True)
    for i in range(3):
        ui, vi, ni = power.iterate(W[i], None, u0[i], v0[i], 4, 1e-12, overflow_safe=True)
        torch.testing.assert_close(u[i], ui, **TOL)
        torch.testing.assert_close(v[i], vi, **TOL)
        torch.testing.assert_close(norm[i], ni, **TOL)
    assert power.iterate(W, None, u0, v0, 0, 1e-12) == (u0, v0, None)


def test_zero_weight_keeps_u_v():
    u0, v0 = F.normalize(torch.randn(4), dim=0), F.normalize(torch.randn(3), dim=0)
    u, v, norm = power.iterate(torch.zeros(4, 3), None, u0, v0, 2, 1e-12)
    assert torch.equal(u, u0) and torch.equal(v, v0) and float(norm) == 0.0


def test_compute_dtype():
    assert power.compute_dtype(torch.float64) == torch.float64
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert power.compute_dtype(dt) == torch.float32
    assert power.compute_dtype(torch.float16, torch.float64) == torch.float64


def test_start_vectors():
    u, v, extra = power.start_vectors(None, 4, 3, seed=5, dtype=torch.float32)
    assert extra == power.N_WARMUP and torch.equal(u, torch.zeros(4))
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    _, v_again, _ = power.start_vectors(None, 4, 3, seed=5, dtype=torch.float32)
    assert torch.equal(v, v_again)  # seeded: every rank and rerun draws the same start
    prev = (torch.randn(4), torch.randn(3))
    state = torch.get_rng_state()
    u2, v2, extra2 = power.start_vectors(prev, 4, 3, seed=5, dtype=torch.float64)
    assert extra2 == 0 and u2.dtype == torch.float64 and torch.equal(u2, prev[0].double())
    assert u2.data_ptr() != prev[0].data_ptr() and torch.equal(torch.get_rng_state(), state)
    # vectors of another shape (the weight was resized) are not used
    _, _, extra3 = power.start_vectors(prev, 5, 3, seed=5, dtype=torch.float32)
    assert extra3 == power.N_WARMUP


# --------------------------------------------------------------------------------------------
# ensure_uv: one rule for the eager API, the transform and the backend
# --------------------------------------------------------------------------------------------


def test_ensure_uv_creates_float32_buffers_sized_by_the_matrix_view():
    conv_t = nn.ConvTranspose2d(4, 6, 3)  # weight (4, 6, 3, 3), dim 1: 6 rows, 36 columns
    torch.manual_seed(3)
    assert power.ensure_uv(conv_t, "weight", conv_t.weight, 1, 1e-12, "up.weight") == "create"
    assert conv_t.weight_u.shape == (6,) and conv_t.weight_v.shape == (36,)
    assert conv_t.weight_u.dtype == conv_t.weight_v.dtype == torch.float32
    assert {"weight_u", "weight_v"} <= set(conv_t.state_dict())
    torch.manual_seed(3)
    u, v = power.init_uv(conv_t.weight, 1, 1e-12)
    assert torch.equal(conv_t.weight_u, u) and torch.equal(conv_t.weight_v, v)
    # existing, fitting: kept as they are (the same tensors)
    before = conv_t.weight_u
    assert power.ensure_uv(conv_t, "weight", conv_t.weight, 1, 1e-12, "up.weight") == "keep"
    assert conv_t.weight_u is before


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_ensure_uv_casts_other_float_dtypes_back_to_float32(dtype):
    fc = nn.Linear(3, 4)
    power.ensure_uv(fc, "weight", fc.weight, 0, 1e-12, "fc.weight")
    u = fc.weight_u.clone()
    fc.to(dtype)  # a plain module converts its buffers too
    assert fc.weight_u.dtype == dtype
    assert power.ensure_uv(fc, "weight", fc.weight, 0, 1e-12, "fc.weight") == "recast"
    assert fc.weight_u.dtype == fc.weight_v.dtype == torch.float32
    torch.testing.assert_close(fc.weight_u, u.to(dtype).float(), atol=0, rtol=0)


@pytest.mark.parametrize("u,v,match", [
    (torch.zeros(5), torch.zeros(3), r"where\.weight_u must be a float32 vector of length 4"),
    (torch.zeros(4), torch.zeros(3, 1), r"where\.weight_v must be a float32 vector of length 3"),
    (torch.zeros(4, dtype=torch.int64), torch.zeros(3), r"where\.weight_u .* got torch\.int64"),
    (torch.zeros(4), None, r"where\.weight_v .* got missing"),
])
def test_ensure_uv_refuses_wrong_buffers_and_changes_nothing(u, v, match):
    fc = nn.Linear(3, 4)
    fc.register_buffer("weight_u", u)
    if v is not None:
        fc.register_buffer("weight_v", v)
    before = {k: b.clone() for k, b in fc._buffers.items()}
    with pytest.raises(ValueError, match=match):
        power.ensure_uv(fc, "weight", fc.weight, 0, 1e-12, "where.weight")
    assert fc._buffers.keys() == before.keys()
    assert all(torch.equal(fc._buffers[k], b) and fc._buffers[k].dtype == b.dtype for k, b in before.items())


def test_ensure_uv_refuses_an_attribute_that_is_not_a_buffer():
    fc = nn.Linear(3, 4)
    fc.weight_v = 5
    with pytest.raises(ValueError, match=r"net\.0\.weight_v: Linear already has an attribute 'weight_v'"):
        power.ensure_uv(fc, "weight", fc.weight, 0, 1e-12, "net.0.weight")
    assert "weight_u" not in fc._buffers


def test_backend_prepare_checks_every_weight_before_registering_any():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].register_buffer("weight_u", torch.zeros(7))  # wrong length, and no weight_v
    with pytest.raises(ValueError, match=r"spectral backend: 2\.weight_u must be a float32 vector of length 2"):
        prepare(model)
    assert "weight_u" not in model[0]._buffers  # nothing half-applied


def test_backend_prepare_casts_back_like_the_helper():
    model = nn.Sequential(nn.Linear(3, 4))
    prepare(model)
    model.double()
    owners.ensure_uv([(model[0], "0", "weight", 0, model[0].weight)], 1e-12)
    assert model[0].weight_u.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# The transform: the same rule (it used to refuse non-float32 u/v)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_u,dtype_v", [(torch.float64, torch.float64), (torch.float16, torch.float32),
                                             (torch.float32, torch.float16)])
def test_transform_casts_existing_u_v_back_to_float32(dtype_u, dtype_v):
    base = nn.Linear(6, 5)
    u0, v0 = F.normalize(torch.randn(5), dim=0), F.normalize(torch.randn(6), dim=0)
    model = nn.Sequential(copy.deepcopy(base))
    model[0].register_buffer("weight_u", u0.to(dtype_u))
    model[0].register_buffer("weight_v", v0.to(dtype_v))
    gm = transform(model)
    layer = gm.get_submodule("0")
    assert layer.weight_u.dtype == layer.weight_v.dtype == torch.float32
    assert torch.equal(layer.weight_u, u0.to(dtype_u).float()) and torch.equal(layer.weight_v, v0.to(dtype_v).float())
    # the transformed model then computes as the eager API from the same (float32) u/v
    eager = fx_spectral.spectral_norm(copy.deepcopy(base))
    with torch.no_grad():
        eager.weight_u.copy_(layer.weight_u)
        eager.weight_v.copy_(layer.weight_v)
    x = torch.randn(3, 6)
    torch.testing.assert_close(gm(x), eager(x), **TOL)
    torch.testing.assert_close(layer.weight_u, eager.weight_u, **TOL)
    assert layer.weight_u.dtype == torch.float32


def test_transform_after_double_reuses_the_cast_back_u_v():
    model = nn.Sequential(nn.Linear(4, 3))
    transform(model)  # registers float32 u/v on model[0]
    u = model[0].weight_u.clone()
    model.double()  # the plain model converts them to float64
    gm = transform(model)
    assert gm.get_submodule("0").weight_u.dtype == torch.float32
    torch.testing.assert_close(gm.get_submodule("0").weight_u, u, atol=0, rtol=0)
    assert gm(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


def test_transform_refuses_wrong_u_v_and_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].register_buffer("weight_u", torch.zeros(2))
    model[2].register_buffer("weight_v", torch.zeros(5))
    with pytest.raises(ValueError, match=r"transform: 2\.weight_v must be a float32 vector of length 4"):
        transform(model)
    assert "weight_u" not in model[0]._buffers
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].weight_u = "taken"  # not a buffer: refused while planning, not half-way through
    with pytest.raises(ValueError, match=r"transform: 2\.weight_u: Linear already has an attribute"):
        transform(model)
    assert "weight_u" not in model[0]._buffers


def test_eager_api_creates_the_same_u_v_as_the_helper():
    layer = nn.Conv1d(3, 4, 3)
    torch.manual_seed(7)
    eager = fx_spectral.spectral_norm(copy.deepcopy(layer))
    torch.manual_seed(7)
    u, v = sn._init_uv(layer.weight, 0, 1e-12)  # the old private name stays
    assert torch.equal(eager.weight_u, u) and torch.equal(eager.weight_v, v)


# --------------------------------------------------------------------------------------------
# the graph emitter runs the same iteration
# --------------------------------------------------------------------------------------------


def _emitted(weight: torch.Tensor, dim: int, n_iter: int, use_aten: bool):
    """A graph of insert_sigma on placeholders (w, u, v) -> sigma; the u/v it updates in place."""
    from fx_spectral.graph.emit import insert_sigma

    graph = torch.fx.Graph()
    w, u, v = graph.placeholder("w"), graph.placeholder("u"), graph.placeholder("v")
    sigma = insert_sigma(
        graph, w, u, v, dim=dim, n_power_iterations=n_iter, eps=1e-12, training=True, use_aten=use_aten,
        weight_dtype=weight.dtype, weight_ndim=weight.dim(),
    )
    graph.output(sigma)
    return torch.fx.GraphModule(nn.Module(), graph)


@pytest.mark.parametrize("use_aten", [False, True], ids=["torch", "aten"])
@pytest.mark.parametrize(
    "shape, dim, dtype",
    [((6, 4), 0, torch.float32), ((3, 5, 2, 2), 1, torch.float32), ((6, 4), 0, torch.float64), ((5, 3), 0, None)],
    ids=["linear", "conv_t", "float64", "zero"],
)
def test_emitted_power_iteration_equals_iterate(shape, dim, dtype, use_aten):
    """The nodes insert_sigma emits give power.iterate's u, v (bitwise) and sigma = max(||W^T u'||, eps)."""
    torch.manual_seed(0)
    weight = torch.zeros(shape) if dtype is None else torch.randn(shape, dtype=dtype)
    compute = power.compute_dtype(weight.dtype)
    u0 = F.normalize(torch.randn(weight.movedim(dim, 0).shape[0]), dim=0)
    v0 = F.normalize(torch.randn(weight.movedim(dim, 0).flatten(1).shape[1]), dim=0)
    gm = _emitted(weight, dim, 3, use_aten)
    u, v = u0.clone().to(compute), v0.clone().to(compute)
    sigma = gm(weight, u, v)  # NB: updates u, v in place
    w_mat = weight.movedim(dim, 0).flatten(1)
    ref_u, ref_v, norm = power.iterate(w_mat, None, u0.to(compute), v0.to(compute), 3, 1e-12)
    assert torch.equal(u, ref_u) and torch.equal(v, ref_v)
    if dtype is None:  # a zero weight keeps u/v; sigma is eps, and no node holds NaN/inf (not even t / ||t||)
        assert torch.equal(u, u0) and torch.equal(sigma, torch.tensor(1e-12, dtype=sigma.dtype))
        values = []
        interp = torch.fx.Interpreter(gm)
        run_node = interp.run_node
        interp.run_node = lambda n: values.append(run_node(n)) or values[-1]
        interp.run(weight, u0.clone(), v0.clone())
        assert all(torch.isfinite(x).all() for x in values if isinstance(x, torch.Tensor))
    elif use_aten:  # ATen graphs take u'^T W v' (= ||W^T u'|| up to rounding)
        torch.testing.assert_close(sigma, norm.clamp_min(1e-12), atol=0, rtol=1e-6 if dtype == torch.float32 else 1e-12)
    else:  # torch-level graphs take the last norm itself
        assert torch.equal(sigma, norm.clamp_min(1e-12))
