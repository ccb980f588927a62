# ruff: noqa: E501  (the golden graphs are FX's code, one op per line)
"""Golden graphs: what the pass emits, as code. These are the documentation of the rewrite.

Regenerate with ``EXPECTTEST_ACCEPT=1 pytest tests/test_graph_golden.py`` and read the diff.
FX's ``x = None`` bookkeeping (freeing values early) is stripped to keep them readable.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch import nn

import fx_spectral
from fx_spectral.graph import transform


def code(text: str) -> str:
    lines = (re.sub(r";  (\w+ = )+None$", "", line.rstrip()) for line in text.strip().splitlines())
    return "\n".join(lines)


class Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class TestGolden(TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_linear(self):
        gm = transform(Net(nn.Linear(4, 3)))
        self.assertExpectedInline(code(gm.code), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_weight_u = self.layer.weight_u
    layer_weight_v = self.layer.weight_v
    layer_bias = self.layer.bias
    layer_weight_nograd = layer_weight.detach()
    layer_weight_nograd_t = layer_weight_nograd.t()
    layer_weight_Wv = torch.mv(layer_weight_nograd, layer_weight_v)
    layer_weight_u_new_norm = torch._C._linalg.linalg_vector_norm(layer_weight_Wv)
    layer_weight_u_new_nonzero = layer_weight_u_new_norm > 1e-12
    layer_weight_u_new_safe = layer_weight_u_new_norm.clamp_min(1e-12)
    layer_weight_u_new_unit = layer_weight_Wv / layer_weight_u_new_safe
    layer_weight_u_new = torch.where(layer_weight_u_new_nonzero, layer_weight_u_new_unit, layer_weight_u)
    layer_weight_Wtu = torch.mv(layer_weight_nograd_t, layer_weight_u_new)
    layer_weight_v_new_norm = torch._C._linalg.linalg_vector_norm(layer_weight_Wtu)
    layer_weight_v_new_nonzero = layer_weight_v_new_norm > 1e-12
    layer_weight_v_new_safe = layer_weight_v_new_norm.clamp_min(1e-12)
    layer_weight_v_new_unit = layer_weight_Wtu / layer_weight_v_new_safe
    layer_weight_v_new = torch.where(layer_weight_v_new_nonzero, layer_weight_v_new_unit, layer_weight_v)
    layer_weight_u_update = torch.ops.aten.copy_.default(layer_weight_u, layer_weight_u_new)
    layer_weight_v_update = torch.ops.aten.copy_.default(layer_weight_v, layer_weight_v_new)
    layer_weight_and_sigma = fx_spectral_graph_emit_weight_and_sigma(layer_weight, layer_weight_u_new, layer_weight_v_new, layer_weight_v_new_norm, 1e-12, 0)
    layer_weight_for_op = layer_weight_and_sigma[0]
    layer_weight_sigma = layer_weight_and_sigma[1]
    layer_weight_normalized = layer_weight_for_op / layer_weight_sigma
    layer = torch._C._nn.linear(x, layer_weight_normalized, layer_bias)
    return layer""")

    def test_linear_eval(self):
        gm = transform(Net(nn.Linear(4, 3))).eval()
        self.assertExpectedInline(code(gm.code), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_weight_u = self.layer.weight_u
    layer_weight_v = self.layer.weight_v
    layer_bias = self.layer.bias
    layer_weight_u_const = layer_weight_u.clone()
    layer_weight_v_const = layer_weight_v.clone()
    layer_weight_W_v = torch.mv(layer_weight, layer_weight_v_const)
    layer_weight_uWv = torch.dot(layer_weight_u_const, layer_weight_W_v)
    layer_weight_uWv_zero = layer_weight_uWv == 0
    layer_weight_sigma = layer_weight_uWv.masked_fill(layer_weight_uWv_zero, 1e-12)
    layer_weight_normalized = layer_weight / layer_weight_sigma
    layer = torch._C._nn.linear(x, layer_weight_normalized, layer_bias)
    return layer""")

    def test_conv2d(self):
        gm = transform(Net(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)))
        self.assertExpectedInline(code(gm.code), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_weight_u = self.layer.weight_u
    layer_weight_v = self.layer.weight_v
    layer_weight_mat = layer_weight.flatten(1)
    layer_weight_nograd = layer_weight_mat.detach()
    layer_weight_nograd_t = layer_weight_nograd.t()
    layer_weight_Wv = torch.mv(layer_weight_nograd, layer_weight_v)
    layer_weight_u_new_norm = torch._C._linalg.linalg_vector_norm(layer_weight_Wv)
    layer_weight_u_new_nonzero = layer_weight_u_new_norm > 1e-12
    layer_weight_u_new_safe = layer_weight_u_new_norm.clamp_min(1e-12)
    layer_weight_u_new_unit = layer_weight_Wv / layer_weight_u_new_safe
    layer_weight_u_new = torch.where(layer_weight_u_new_nonzero, layer_weight_u_new_unit, layer_weight_u)
    layer_weight_Wtu = torch.mv(layer_weight_nograd_t, layer_weight_u_new)
    layer_weight_v_new_norm = torch._C._linalg.linalg_vector_norm(layer_weight_Wtu)
    layer_weight_v_new_nonzero = layer_weight_v_new_norm > 1e-12
    layer_weight_v_new_safe = layer_weight_v_new_norm.clamp_min(1e-12)
    layer_weight_v_new_unit = layer_weight_Wtu / layer_weight_v_new_safe
    layer_weight_v_new = torch.where(layer_weight_v_new_nonzero, layer_weight_v_new_unit, layer_weight_v)
    layer_weight_u_update = torch.ops.aten.copy_.default(layer_weight_u, layer_weight_u_new)
    layer_weight_v_update = torch.ops.aten.copy_.default(layer_weight_v, layer_weight_v_new)
    layer_weight_and_sigma = fx_spectral_graph_emit_weight_and_sigma(layer_weight, layer_weight_u_new, layer_weight_v_new, layer_weight_v_new_norm, 1e-12, 0)
    layer_weight_for_op = layer_weight_and_sigma[0]
    layer_weight_sigma = layer_weight_and_sigma[1]
    layer_weight_normalized = layer_weight_for_op / layer_weight_sigma
    layer = torch.conv2d(x, layer_weight_normalized, None, (2, 2), (1, 1), (1, 1), 1)
    return layer""")

    def test_conv_transpose2d_dim1(self):
        gm = transform(Net(nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)))
        self.assertExpectedInline(code(gm.code), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_weight_u = self.layer.weight_u
    layer_weight_v = self.layer.weight_v
    layer_bias = self.layer.bias
    layer_weight_moved = layer_weight.movedim(1, 0)
    layer_weight_mat = layer_weight_moved.flatten(1)
    layer_weight_nograd = layer_weight_mat.detach()
    layer_weight_nograd_t = layer_weight_nograd.t()
    layer_weight_Wv = torch.mv(layer_weight_nograd, layer_weight_v)
    layer_weight_u_new_norm = torch._C._linalg.linalg_vector_norm(layer_weight_Wv)
    layer_weight_u_new_nonzero = layer_weight_u_new_norm > 1e-12
    layer_weight_u_new_safe = layer_weight_u_new_norm.clamp_min(1e-12)
    layer_weight_u_new_unit = layer_weight_Wv / layer_weight_u_new_safe
    layer_weight_u_new = torch.where(layer_weight_u_new_nonzero, layer_weight_u_new_unit, layer_weight_u)
    layer_weight_Wtu = torch.mv(layer_weight_nograd_t, layer_weight_u_new)
    layer_weight_v_new_norm = torch._C._linalg.linalg_vector_norm(layer_weight_Wtu)
    layer_weight_v_new_nonzero = layer_weight_v_new_norm > 1e-12
    layer_weight_v_new_safe = layer_weight_v_new_norm.clamp_min(1e-12)
    layer_weight_v_new_unit = layer_weight_Wtu / layer_weight_v_new_safe
    layer_weight_v_new = torch.where(layer_weight_v_new_nonzero, layer_weight_v_new_unit, layer_weight_v)
    layer_weight_u_update = torch.ops.aten.copy_.default(layer_weight_u, layer_weight_u_new)
    layer_weight_v_update = torch.ops.aten.copy_.default(layer_weight_v, layer_weight_v_new)
    layer_weight_and_sigma = fx_spectral_graph_emit_weight_and_sigma(layer_weight, layer_weight_u_new, layer_weight_v_new, layer_weight_v_new_norm, 1e-12, 1)
    layer_weight_for_op = layer_weight_and_sigma[0]
    layer_weight_sigma = layer_weight_and_sigma[1]
    layer_weight_normalized = layer_weight_for_op / layer_weight_sigma
    layer = torch.conv_transpose2d(x, layer_weight_normalized, layer_bias, (2, 2), (1, 1), (0, 0), 1, (1, 1))
    return layer""")

    def test_functional_linear(self):
        class Functional(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.randn(3, 4))

            def forward(self, x):
                return F.linear(x, self.w).relu()

        gm = transform(Functional(), name="w")
        self.assertExpectedInline(code(gm.code), """\
def forward(self, x):
    w = self.w
    w_u = self.w_u
    w_v = self.w_v
    w_nograd = w.detach()
    w_nograd_t = w_nograd.t()
    w_Wv = torch.mv(w_nograd, w_v)
    w_u_new_norm = torch._C._linalg.linalg_vector_norm(w_Wv)
    w_u_new_nonzero = w_u_new_norm > 1e-12
    w_u_new_safe = w_u_new_norm.clamp_min(1e-12)
    w_u_new_unit = w_Wv / w_u_new_safe
    w_u_new = torch.where(w_u_new_nonzero, w_u_new_unit, w_u)
    w_Wtu = torch.mv(w_nograd_t, w_u_new)
    w_v_new_norm = torch._C._linalg.linalg_vector_norm(w_Wtu)
    w_v_new_nonzero = w_v_new_norm > 1e-12
    w_v_new_safe = w_v_new_norm.clamp_min(1e-12)
    w_v_new_unit = w_Wtu / w_v_new_safe
    w_v_new = torch.where(w_v_new_nonzero, w_v_new_unit, w_v)
    w_u_update = torch.ops.aten.copy_.default(w_u, w_u_new)
    w_v_update = torch.ops.aten.copy_.default(w_v, w_v_new)
    w_and_sigma = fx_spectral_graph_emit_weight_and_sigma(w, w_u_new, w_v_new, w_v_new_norm, 1e-12, 0)
    w_for_op = w_and_sigma[0]
    w_sigma = w_and_sigma[1]
    w_normalized = w_for_op / w_sigma
    linear = torch._C._nn.linear(x, w_normalized)
    relu = linear.relu()
    return relu""")

    def test_exported_aten_graph(self):
        # export records the shapes: output 2×3 < weight 3×4, so the op's output is divided by sigma
        model = Net(nn.Linear(4, 3, bias=False))
        ep = torch.export.export(model, (torch.randn(2, 4),))
        gm = transform(ep.module())
        self.assertExpectedInline(code(gm.code), """\
def forward(self, x):
    x, = fx_pytree.tree_flatten_spec(([x], {}), self._in_spec)
    layer_weight = self.layer.weight
    layer_weight_u = self.layer.weight_u
    layer_weight_v = self.layer.weight_v
    _guards_fn = self._guards_fn(x)
    layer_weight_nograd = torch.ops.aten.detach.default(layer_weight)
    layer_weight_nograd_t = torch.ops.aten.t.default(layer_weight_nograd)
    layer_weight_Wv = torch.ops.aten.mv.default(layer_weight_nograd, layer_weight_v)
    layer_weight_u_new_norm = torch.ops.aten.linalg_vector_norm.default(layer_weight_Wv)
    layer_weight_u_new_nonzero = torch.ops.aten.gt.Scalar(layer_weight_u_new_norm, 1e-12)
    layer_weight_u_new_safe = torch.ops.aten.clamp_min.default(layer_weight_u_new_norm, 1e-12)
    layer_weight_u_new_unit = torch.ops.aten.div.Tensor(layer_weight_Wv, layer_weight_u_new_safe)
    layer_weight_u_new = torch.ops.aten.where.self(layer_weight_u_new_nonzero, layer_weight_u_new_unit, layer_weight_u)
    layer_weight_Wtu = torch.ops.aten.mv.default(layer_weight_nograd_t, layer_weight_u_new)
    layer_weight_v_new_norm = torch.ops.aten.linalg_vector_norm.default(layer_weight_Wtu)
    layer_weight_v_new_nonzero = torch.ops.aten.gt.Scalar(layer_weight_v_new_norm, 1e-12)
    layer_weight_v_new_safe = torch.ops.aten.clamp_min.default(layer_weight_v_new_norm, 1e-12)
    layer_weight_v_new_unit = torch.ops.aten.div.Tensor(layer_weight_Wtu, layer_weight_v_new_safe)
    layer_weight_v_new = torch.ops.aten.where.self(layer_weight_v_new_nonzero, layer_weight_v_new_unit, layer_weight_v)
    layer_weight_u_update = torch.ops.aten.copy_.default(layer_weight_u, layer_weight_u_new)
    layer_weight_v_update = torch.ops.aten.copy_.default(layer_weight_v, layer_weight_v_new)
    layer_weight_W_v = torch.ops.aten.mv.default(layer_weight, layer_weight_v_new)
    layer_weight_uWv = torch.ops.aten.dot.default(layer_weight_u_new, layer_weight_W_v)
    layer_weight_sigma = torch.ops.aten.clamp_min.default(layer_weight_uWv, 1e-12)
    linear = torch.ops.aten.linear.default(x, layer_weight)
    linear_over_sigma = torch.ops.aten.div.Tensor(linear, layer_weight_sigma)
    return pytree.tree_unflatten((linear_over_sigma,), self._out_spec)""")

    def test_exported_output_scaling_with_bias(self):
        # the shapes recorded by export decide per op: output 2×3 < weight 3×4 -> divide the output,
        # then add the bias (split off the op)
        model = Net(nn.Linear(4, 3))
        ep = torch.export.export(model, (torch.randn(1, 4),))
        gm = transform(ep.module())
        self.assertExpectedInline(code(gm.code).split("layer_weight_sigma = ")[1], """\
torch.ops.aten.clamp_min.default(layer_weight_uWv, 1e-12)
    linear = torch.ops.aten.linear.default(x, layer_weight, None)
    linear_over_sigma = torch.ops.aten.div.Tensor(linear, layer_weight_sigma)
    linear_biased = torch.ops.aten.add.Tensor(linear_over_sigma, layer_bias)
    return pytree.tree_unflatten((linear_biased,), self._out_spec)""")

    def test_exported_weight_division_at_large_batch(self):
        # output 16×3 > weight 3×4: the weight is divided (fewer elements to touch), the bias stays in the op
        model = Net(nn.Linear(4, 3))
        ep = torch.export.export(model, (torch.randn(16, 4),))
        gm = transform(ep.module())
        self.assertExpectedInline(code(gm.code).split("layer_weight_sigma = ")[1], """\
torch.ops.aten.clamp_min.default(layer_weight_uWv, 1e-12)
    layer_weight_normalized = torch.ops.aten.div.Tensor(layer_weight, layer_weight_sigma)
    linear = torch.ops.aten.linear.default(x, layer_weight_normalized, layer_bias)
    return pytree.tree_unflatten((linear,), self._out_spec)""")

    def test_exported_conv_output_scaling(self):
        # a late, wide conv: output 16×2×2 < weight 16×8×3×3; the bias is added as (C, 1, 1)
        model = Net(nn.Conv2d(8, 16, 3, stride=2))
        ep = torch.export.export(model, (torch.randn(1, 8, 5, 5),))
        gm = transform(ep.module())
        self.assertExpectedInline(code(gm.code).split("layer_weight_sigma = ")[1], """\
torch.ops.aten.clamp_min.default(layer_weight_uWv, 1e-12)
    conv2d = torch.ops.aten.conv2d.default(x, layer_weight, None, [2, 2])
    conv2d_over_sigma = torch.ops.aten.div.Tensor(conv2d, layer_weight_sigma)
    conv2d_bias_view = torch.ops.aten.view.default(layer_bias, [-1, 1, 1])
    conv2d_biased = torch.ops.aten.add.Tensor(conv2d_over_sigma, conv2d_bias_view)
    return pytree.tree_unflatten((conv2d_biased,), self._out_spec)""")

    def test_output_scaling_computes_the_weight_division(self):
        # the graphs above compute op(x, W / sigma) + b: same output, weight and bias gradients, u/v
        for layer, shape in ((nn.Linear(4, 3), (1, 4)), (nn.Conv2d(8, 16, 3, stride=2), (1, 8, 5, 5))):
            x = torch.randn(shape)
            ref_layer = copy.deepcopy(layer)
            gm = transform(torch.export.export(Net(layer), (x,)).module())
            u, v = gm.layer.weight_u.clone(), gm.layer.weight_v.clone()
            self.assertIn("_over_sigma", gm.code)
            y = gm(x)
            w = fx_spectral.nn.normalize_weight(ref_layer.weight, u, v)
            ref = F.linear(x, w, ref_layer.bias) if isinstance(layer, nn.Linear) else ref_layer._conv_forward(
                x, w, ref_layer.bias)
            torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(gm.layer.weight_u, u)
            g = torch.randn_like(y)
            y.backward(g)
            ref.backward(g)
            for name in ("weight", "bias"):
                got, want = getattr(gm.layer, name).grad, getattr(ref_layer, name).grad
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    def test_bf16_weights(self):
        gm = transform(Net(nn.Linear(4, 3, bias=False).to(torch.bfloat16)))
        self.assertExpectedInline(code(gm.code), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_weight_u = self.layer.weight_u
    layer_weight_v = self.layer.weight_v
    layer_weight_f32 = layer_weight.float()
    layer_weight_nograd = layer_weight_f32.detach()
    layer_weight_nograd_t = layer_weight_nograd.t()
    layer_weight_Wv = torch.mv(layer_weight_nograd, layer_weight_v)
    layer_weight_u_new_norm = torch._C._linalg.linalg_vector_norm(layer_weight_Wv)
    layer_weight_u_new_nonzero = layer_weight_u_new_norm > 1e-12
    layer_weight_u_new_safe = layer_weight_u_new_norm.clamp_min(1e-12)
    layer_weight_u_new_unit = layer_weight_Wv / layer_weight_u_new_safe
    layer_weight_u_new = torch.where(layer_weight_u_new_nonzero, layer_weight_u_new_unit, layer_weight_u)
    layer_weight_Wtu = torch.mv(layer_weight_nograd_t, layer_weight_u_new)
    layer_weight_v_new_norm = torch._C._linalg.linalg_vector_norm(layer_weight_Wtu)
    layer_weight_v_new_nonzero = layer_weight_v_new_norm > 1e-12
    layer_weight_v_new_safe = layer_weight_v_new_norm.clamp_min(1e-12)
    layer_weight_v_new_unit = layer_weight_Wtu / layer_weight_v_new_safe
    layer_weight_v_new = torch.where(layer_weight_v_new_nonzero, layer_weight_v_new_unit, layer_weight_v)
    layer_weight_u_update = torch.ops.aten.copy_.default(layer_weight_u, layer_weight_u_new)
    layer_weight_v_update = torch.ops.aten.copy_.default(layer_weight_v, layer_weight_v_new)
    layer_weight_and_sigma = fx_spectral_graph_emit_weight_and_sigma(layer_weight_f32, layer_weight_u_new, layer_weight_v_new, layer_weight_v_new_norm, 1e-12, 0)
    layer_weight_for_op = layer_weight_and_sigma[0]
    layer_weight_sigma = layer_weight_and_sigma[1]
    layer_weight_normalized_f32 = layer_weight_for_op / layer_weight_sigma
    layer_weight_normalized = layer_weight_normalized_f32.to(torch.bfloat16)
    layer = torch._C._nn.linear(x, layer_weight_normalized, None)
    return layer""")

    def test_shared_weight(self):
        class Tied(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Linear(4, 4, bias=False)

            def forward(self, x):
                return F.linear(self.emb(x).tanh(), self.emb.weight)

        gm = transform(Tied())
        self.assertExpectedInline(code(gm.code), """\
def forward(self, x):
    emb_weight = self.emb.weight
    emb_weight_u = self.emb.weight_u
    emb_weight_v = self.emb.weight_v
    emb_weight_nograd = emb_weight.detach()
    emb_weight_nograd_t = emb_weight_nograd.t()
    emb_weight_Wv = torch.mv(emb_weight_nograd, emb_weight_v)
    emb_weight_u_new_norm = torch._C._linalg.linalg_vector_norm(emb_weight_Wv)
    emb_weight_u_new_nonzero = emb_weight_u_new_norm > 1e-12
    emb_weight_u_new_safe = emb_weight_u_new_norm.clamp_min(1e-12)
    emb_weight_u_new_unit = emb_weight_Wv / emb_weight_u_new_safe
    emb_weight_u_new = torch.where(emb_weight_u_new_nonzero, emb_weight_u_new_unit, emb_weight_u)
    emb_weight_Wtu = torch.mv(emb_weight_nograd_t, emb_weight_u_new)
    emb_weight_v_new_norm = torch._C._linalg.linalg_vector_norm(emb_weight_Wtu)
    emb_weight_v_new_nonzero = emb_weight_v_new_norm > 1e-12
    emb_weight_v_new_safe = emb_weight_v_new_norm.clamp_min(1e-12)
    emb_weight_v_new_unit = emb_weight_Wtu / emb_weight_v_new_safe
    emb_weight_v_new = torch.where(emb_weight_v_new_nonzero, emb_weight_v_new_unit, emb_weight_v)
    emb_weight_u_update = torch.ops.aten.copy_.default(emb_weight_u, emb_weight_u_new)
    emb_weight_v_update = torch.ops.aten.copy_.default(emb_weight_v, emb_weight_v_new)
    emb_weight_and_sigma = fx_spectral_graph_emit_weight_and_sigma(emb_weight, emb_weight_u_new, emb_weight_v_new, emb_weight_v_new_norm, 1e-12, 0)
    emb_weight_for_op = emb_weight_and_sigma[0]
    emb_weight_sigma = emb_weight_and_sigma[1]
    emb_weight_normalized = emb_weight_for_op / emb_weight_sigma
    emb = torch._C._nn.linear(x, emb_weight_normalized, None)
    tanh = emb.tanh()
    linear = torch._C._nn.linear(tanh, emb_weight_normalized)
    return linear""")

    def test_eager_normalized_module_untouched(self):
        model = nn.Sequential(fx_spectral.spectral_norm(nn.Linear(4, 3)), nn.ReLU())
        gm = transform(model)
        self.assertExpectedInline(code(gm.code), """\
def forward(self, input):
    input_1 = input
    _0 = getattr(self, "0")(input_1)
    _1 = getattr(self, "1")(_0)
    return _1""")


if __name__ == "__main__":
    import unittest

    unittest.main()
