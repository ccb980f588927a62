"""The graph side of :func:`fx_spectral.certify`: tracing, one recorded run, and the per-node rules.

Each call node is canonicalized (:func:`fx_spectral.certify_rules.canonical`) to ``(name, kw)``:
a short op name shared by the functional, the Tensor-method and the aten spelling of an op
(``"conv2d"``, ``"relu"``, ``"add"``), and its arguments bound to names. The rules then see one
op, whichever way the model wrote it.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import Tensor, nn

from fx_spectral import certify_rules as R
from fx_spectral.conv_bounds import SVD_MARGIN
from fx_spectral.kinds import CONV_TRANSPOSE, kind_of
from fx_spectral.models import Attention, Block, LipschitzTransformer
from fx_spectral.operator_norms import conv_upper_bound, effective_weight

__all__ = ["analyze_graph", "trace_model"]


class _Tracer(torch.fx.Tracer):
    """Default leaves (torch.nn modules) plus the transformer pieces, so they get a clear error."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Attention, Block, LipschitzTransformer)) or super().is_leaf_module(m, qualname)


def trace_model(model: nn.Module, x: Tensor) -> tuple[torch.fx.GraphModule, str]:
    try:
        graph = _Tracer().trace(model)
        return torch.fx.GraphModule(model, graph), "symbolic_trace"
    except Exception as trace_error:  # noqa: BLE001 - fall back to export, report both if it fails too
        try:
            return torch.export.export(model, (x,)).module(), "torch.export"
        except Exception as export_error:
            raise TypeError(
                f"certify: {type(model).__name__} neither traces with torch.fx.symbolic_trace ({trace_error}) "
                f"nor exports with torch.export ({export_error})"
            ) from export_error


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once; keeps the values of input-independent nodes and every node's shape."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.dependent: set[torch.fx.Node] = set()
        self.const: dict[torch.fx.Node, object] = {}
        self.shape: dict[torch.fx.Node, object] = {}

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        has_tensor = isinstance(out, Tensor) or (
            isinstance(out, (tuple, list)) and any(isinstance(o, Tensor) for o in out))
        # Shapes and other Python values read off a tensor do not depend on its values: constants.
        if n.op == "placeholder" or (has_tensor and any(a in self.dependent for a in n.all_input_nodes)):
            self.dependent.add(n)
        else:
            self.const[n] = out
        self.shape[n] = (tuple(out.shape) if isinstance(out, Tensor)
                         else tuple(tuple(o.shape) if isinstance(o, Tensor) else None for o in out)
                         if isinstance(out, (tuple, list)) else None)
        return out


class _Err(Exception):
    pass


def analyze_graph(gm: torch.fx.GraphModule, x: Tensor, *, dense_limit: int) -> tuple[list[tuple], float]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TypeError(f"certify: the traced forward takes {len(placeholders)} inputs; expected exactly one tensor")
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(x)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    # Only nodes the output depends on matter (asserts, guards and unused branches do not).
    needed, stack = set(), [out_node]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    ctx = _Ctx(gm, rec, x.shape[0], dense_limit)
    ctx.L[placeholders[0]] = 1.0
    rows: list[tuple] = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr") or n not in needed or n not in rec.dependent:
            continue
        try:
            op, factor, bound, rule = ctx.node_bound(n)
        except _Err as e:
            raise TypeError(f"certify: node {n.name!r} ({_describe(n)}): {e}") from None
        ctx.L[n] = bound
        rows.append((n.name, op, factor, bound, rule))
    outs = [a for a in torch.fx.node.map_arg(out_node.args[0], lambda a: a) if isinstance(a, torch.fx.Node)] \
        if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    dep = [ctx.L[a] for a in outs if isinstance(a, torch.fx.Node) and a in rec.dependent]
    if len(outs) != 1:
        raise TypeError(f"certify: the model returns {len(outs)} values; expected one tensor")
    return rows, (dep[0] if dep else 0.0)


def _describe(n: torch.fx.Node) -> str:
    if n.op == "call_module":
        return f"module {n.target!r}"
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    return f"function {getattr(n.target, '__module__', '') or ''}.{getattr(n.target, '__name__', n.target)}".lstrip(".")


def _ints(v, d: int) -> tuple[int, ...]:
    return (int(v),) * d if isinstance(v, int) else tuple(int(i) for i in v) if len(v) == d else (int(v[0]),) * d


class _Ctx:
    def __init__(self, gm, rec: _Recorder, batch: int, dense_limit: int):
        self.gm, self.rec, self.B, self.dense_limit = gm, rec, batch, dense_limit
        self.L: dict[torch.fx.Node, float] = {}

    # -- helpers -----------------------------------------------------------------------------
    def dep(self, a) -> bool:
        return isinstance(a, torch.fx.Node) and a in self.rec.dependent

    def const(self, a, what: str):
        if isinstance(a, torch.fx.Node):
            if a in self.rec.dependent:
                raise _Err(f"{what} depends on the input; only a constant {what} has a known bound")
            return self.rec.const[a]
        return a

    def in_shape(self, a) -> tuple[int, ...]:
        s = self.rec.shape[a]
        if s is None or (s and isinstance(s[0], tuple)):
            raise _Err("expected a tensor input")
        if not s or s[0] != self.B:
            raise _Err(f"its input of shape {s} has no batch dimension of size {self.B} in dim 0")
        return s

    def out_shape(self, n) -> tuple[int, ...]:
        s = self.rec.shape[n]
        if not isinstance(s, tuple) or not s or isinstance(s[0], tuple) or s[0] != self.B:
            if isinstance(s, tuple) and s and isinstance(s[0], tuple):
                return s
            raise _Err(f"its output of shape {s} does not keep the batch of {self.B} in dim 0 (it mixes examples)")
        return s

    def single(self, n) -> torch.fx.Node:
        deps = [a for a in n.all_input_nodes if self.dep(a)]
        if len(deps) != 1:
            raise _Err("more than one argument depends on the input; no bound is known for such a product")
        return deps[0]

    # -- the rules ---------------------------------------------------------------------------
    def node_bound(self, n: torch.fx.Node) -> tuple[str, float | None, float, str]:
        if n.op == "call_module":
            result = self.module_bound(n, self.gm.get_submodule(n.target))
        else:
            name, kw = R.canonical(n)
            result = self.function_bound(n, name, kw)
        factor = result[1]
        if (factor is None or factor > 1) and self.mutates(n):
            # The op overwrites its input; a bound > 1 is only safe if nothing else reads that input.
            first = n.args[0] if n.args else None
            if isinstance(first, torch.fx.Node) and len(first.users) > 1:
                raise _Err(f"an in-place op with factor > 1 overwrites {first.name!r}, which other nodes also read")
        return result

    def mutates(self, n: torch.fx.Node) -> bool:
        if n.op == "call_module":
            return bool(getattr(self.gm.get_submodule(n.target), "inplace", False))
        return n.target in R.INPLACE_OPS or bool(n.kwargs.get("inplace", False))

    def unary(self, n, op: str, factor: float, rule: str) -> tuple[str, float, float, str]:
        a = self.single(n)
        self.out_shape(n)
        return op, factor, factor * self.L[a], rule

    def module_bound(self, n, m: nn.Module):
        typ = getattr(type(m), "_sn_base", type(m)).__name__
        a = self.single(n)
        in_shape = self.in_shape(a)
        if isinstance(m, (Attention, Block, LipschitzTransformer)):
            raise _Err(f"{type(m).__name__} is only Lipschitz on bounded inputs; certify the whole "
                       "LipschitzTransformer (its embedding bounds every token), not a model that contains it")
        kind = kind_of(m)
        if kind is not None and kind.operator_norm == "matrix":  # Linear
            w = kind.matrix(effective_weight(m, n.target), kind.dim).to(torch.float64)
            return self.unary(n, typ, _matrix_norm(w), "exact spectral norm of the weight")
        if kind is not None and kind.operator_norm == "conv":
            transposed = kind is CONV_TRANSPOSE
            out = self.out_shape(n)
            op = _output_padding(m.stride, m.padding, m.dilation, m.kernel_size, in_shape, out) if transposed else 0
            up, method, _ = conv_upper_bound(
                effective_weight(m, n.target), in_shape[1:], stride=m.stride, padding=m.padding,
                dilation=m.dilation, groups=m.groups, transposed=transposed, output_padding=op,
                padding_mode=m.padding_mode, dense_limit=self.dense_limit, where=n.target)
            return self.unary(n, typ, up, f"operator norm upper bound ({method})")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return self.unary(n, typ, _bn_factor(m.running_mean, m.running_var, m.weight if m.affine else None, m.eps),
                              "max |gamma| / sqrt(running_var + eps)")
        slope = R.activation_module_slope(m)
        if slope is not None:
            return self.unary(n, typ, slope, "largest slope")
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                          nn.Flatten, nn.Unflatten)):
            return self.unary(n, typ, 1.0, "identity in eval / a reshape")
        if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                          nn.ConstantPad3d)):
            return self.unary(n, typ, 1.0, "constant padding is an isometric embedding (plus a constant)")
        for kind, base in (("reflect", nn.modules.padding._ReflectionPadNd),
                           ("replicate", nn.modules.padding._ReplicationPadNd),
                           ("circular", nn.modules.padding._CircularPadNd)):
            if isinstance(m, base):
                return self.unary(n, typ, _pad_factor(in_shape, m.padding, kind), "sqrt(max copies) per dim")
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            kw = {k: getattr(m, k, None) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                                   "count_include_pad", "divisor_override")}
            kind = "max" if "Max" in typ else "avg"
            return self.unary(n, typ, self.pool(n, a, kind, kw, len(in_shape) - 2), f"{kind} pooling")
        if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            kind = "max" if "Max" in typ else "avg"
            return self.unary(n, typ, self.adaptive(n, a, kind), f"adaptive {kind} pooling")
        raise _Err(f"no Lipschitz bound is known for {typ}")

    def function_bound(self, n, name: str, kw: dict):
        fam = R.family(name)
        if name in R.FUNCTION_SLOPES:
            return self.unary(n, name, R.FUNCTION_SLOPES[name](kw), "largest slope")
        if name in ("sort", "msort"):
            # Sorting each fiber is 1-Lipschitz in l2 (rearrangement inequality); the fibers are disjoint.
            a = self.single(n)
            dim = kw.get("dim", kw.get("args", (-1,))[0] if kw.get("args") else -1)
            if name == "sort" and int(dim) % len(self.in_shape(a)) == 0 or name == "msort":
                raise _Err("sorting along dim 0 mixes the batch")
            return name, 1.0, self.L[a], "sorting is 1-Lipschitz (GroupSort / MaxMin)"
        if name in ("slice", "select", "narrow"):
            a = self.single(n)
            dim = kw.get("dim", 0)
            if dim % len(self.in_shape(a)) == 0 and self.out_shape(n)[0] != self.B:
                raise _Err(f"{name} along dim 0 mixes the batch")
            if dim % len(self.in_shape(a)) == 0 and name == "select":
                raise _Err("select along dim 0 picks one example")
            return name, 1.0, self.L[a], "slicing is a coordinate projection"
        if name in R.SHAPE_OPS or name in ("getitem", "getattr"):
            return self.shape_op(n, name, kw)
        if fam == "dropout" or name == "dropout":
            if kw.get("training", name in ("dropout1d", "dropout2d", "dropout3d")) is not False:
                raise _Err("dropout in training mode is random; pass training=False")
            return self.unary(n, name, 1.0, "identity in eval")
        if name in ("add", "sub"):
            return self.add(n, name, kw)
        if name in ("mul", "div"):
            return self.mul(n, name, kw)
        if name == "neg":
            return self.unary(n, name, 1.0, "negation")
        if name in ("cat", "stack"):
            return self.cat(n, name, kw)
        if name in ("mean", "sum"):
            return self.reduce(n, name, kw)
        if name in ("linear", "matmul", "mm"):
            return self.linear(n, name, kw)
        if fam in ("conv", "conv_transpose") or name == "convolution":
            return self.conv(n, name, kw)
        if name in ("batch_norm", "batch_norm_no_training"):
            if name == "batch_norm" and kw.get("training", False):
                raise _Err("batch norm in training mode (batch statistics mix examples); use eval mode")
            w = self.const(kw.get("weight"), "weight")
            mean, var = self.const(kw.get("running_mean"), "mean"), self.const(kw.get("running_var"), "var")
            if var is None:
                raise _Err("batch norm without running statistics uses batch statistics (mixes examples)")
            del mean
            return self.unary(n, "batch_norm", _bn_factor(None, var, w, kw.get("eps", 1e-5)),
                              "max |gamma| / sqrt(running_var + eps)")
        if fam in ("max_pool", "avg_pool"):
            a = self.single(n)
            d = int(name[-2])
            return self.unary(n, name, self.pool(n, a, fam[:3], kw, d), f"{fam[:3]} pooling")
        if fam == "adaptive":
            return self.unary(n, name, self.adaptive(n, self.single(n), "max" if "max" in name else "avg"),
                              "adaptive pooling")
        if name in ("pad", "constant_pad_nd"):
            a = self.single(n)
            mode = kw.get("mode", "constant") or "constant"
            if mode == "constant":
                return self.unary(n, name, 1.0, "constant padding is an isometric embedding (plus a constant)")
            return self.unary(n, name, _pad_factor(self.in_shape(a), tuple(kw["pad"]), mode, reversed_pairs=True),
                              "sqrt(max copies) per dim")
        raise _Err(f"no Lipschitz bound is known for the op {name!r}")

    def shape_op(self, n, name, kw):
        a = self.single(n)
        s = self.rec.shape[a]
        if name in ("getitem", "getattr") and isinstance(s, tuple) and s and isinstance(s[0], tuple):
            if name == "getattr" and kw.get("attr") != "values":
                raise _Err(f"attribute {kw.get('attr')!r} of a tuple result has no bound here")
            self.out_shape(n)
            return name, 1.0, self.L[a], "one output of a tuple (values)"
        in_s = self.in_shape(a)
        out = self.out_shape(n)
        nd = len(in_s)
        if name == "getattr":
            raise _Err(f"attribute {kw.get('attr')!r} of a tensor has no bound here")
        if name == "getitem":
            idx = kw.get("index")
            idx = idx if isinstance(idx, tuple) else (idx,)
            if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in idx):
                raise _Err("indexing with tensors or lists (a gather) has no bound here")
            first = next((i for i in idx if i is not None), slice(None))
            if first is not Ellipsis and first != slice(None):
                raise _Err("indexing touches the batch dimension (dim 0)")
            return name, 1.0, self.L[a], "slicing is a coordinate projection"
        if name in ("permute",):
            dims = kw.get("dims") or (kw.get("args") or ())
            dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
            if dims and dims[0] % nd != 0:
                raise _Err("the permutation moves the batch dimension (dim 0)")
        if name == "transpose":
            d0, d1 = kw.get("dim0", 0), kw.get("dim1", 0)
            if d0 % nd == 0 or d1 % nd == 0:
                raise _Err("the transpose moves the batch dimension (dim 0)")
        if name in ("transpose2d", "movedim"):
            raise _Err(f"{name} may move the batch dimension; use permute with dim 0 first")
        if math.prod(out) != math.prod(in_s) or out[0] != in_s[0]:
            raise _Err(f"shape op {in_s} -> {out} changes the number of entries per example")
        return name, 1.0, self.L[a], "a reshape / permutation of coordinates"

    def add(self, n, name, kw):
        out = self.out_shape(n)
        alpha = abs(float(kw.get("alpha", 1) or 1))
        total, parts = 0.0, 0
        for i, arg in enumerate((kw.get("input"), kw.get("other"))):
            if self.dep(arg):
                s = self.in_shape(arg)
                copies = math.prod(out) / math.prod(s)  # broadcasting repeats each entry this often
                total += (alpha if i == 1 else 1.0) * math.sqrt(copies) * self.L[arg]
                parts += 1
        rule = "sum of the branches' bounds" if parts > 1 else "adding a constant is a translation"
        return name, None if parts > 1 else 1.0, total, rule

    def mul(self, n, name, kw):
        x, c = kw.get("input"), kw.get("other")
        if self.dep(c) and self.dep(x):
            raise _Err(f"both operands of {name} depend on the input; no bound is known for such a product")
        if name == "div":
            if self.dep(c):
                raise _Err("division by a computed tensor has no bound here")
            cv = self.const(c, "divisor")
            lo = float(torch.as_tensor(cv, dtype=torch.float64).abs().min())
            if lo == 0:
                raise _Err("division by a constant with a zero entry")
            return self.unary(n, name, 1.0 / lo, "1 / min |constant|")
        if self.dep(c):
            x, c = c, x
        cv = self.const(c, "factor")
        return self.unary(n, name, float(torch.as_tensor(cv, dtype=torch.float64).abs().max()), "max |constant|")

    def cat(self, n, name, kw):
        out = self.out_shape(n)
        dim = int(kw.get("dim", 0))
        if dim % len(out) == 0:
            raise _Err(f"{name} along dim 0 mixes the batch")
        sq = sum(self.L[t] ** 2 for t in kw["tensors"] if self.dep(t))
        return name, None, math.sqrt(sq), "sqrt of the sum of the squared parts' bounds"

    def reduce(self, n, name, kw):
        a = self.single(n)
        in_s = self.in_shape(a)
        dims = kw.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = kw.get("args", ())[:1]
            dims = dims[0] if dims else None
        if dims is None:
            raise _Err(f"{name} over all dims mixes the batch")
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if any(d % len(in_s) == 0 for d in dims):
            raise _Err(f"{name} over dim 0 mixes the batch")
        c = math.prod(in_s[d] for d in dims)
        self.out_shape(n)
        f = 1 / math.sqrt(c) if name == "mean" else math.sqrt(c)
        return name, f, f * self.L[a], f"{name} of {c} entries"

    def linear(self, n, name, kw):
        x, w = kw.get("input"), kw.get("weight", kw.get("other"))
        if name == "linear":
            wv = self.const(w, "weight")
        elif self.dep(x) and not self.dep(w):
            wv = self.const(w, "matrix")
            if wv.dim() != 2:
                raise _Err("x @ W needs a constant 2-d W")
        elif self.dep(w) and not self.dep(x):
            wv = self.const(x, "matrix")
            if wv.dim() != 2 or len(self.in_shape(w)) < 3:
                raise _Err("W @ x needs a constant 2-d W and x with the batch outside its last two dims")
        else:
            raise _Err("both operands of matmul depend on the input; no bound is known for such a product")
        return self.unary(n, name, _matrix_norm(torch.as_tensor(wv).to(torch.float64)),
                          "exact spectral norm of the weight")

    def conv(self, n, name, kw):
        a = self.single(n)
        in_s = self.in_shape(a)
        w = self.const(kw.get("weight"), "weight")
        d = w.dim() - 2
        transposed = bool(kw.get("transposed", False)) or name.startswith("conv_transpose")
        stride, padding, dilation = kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1)
        groups = int(kw.get("groups", 1))
        op = 0
        if transposed:
            op = _output_padding(_ints(stride, d), _ints(padding, d), _ints(dilation, d), tuple(w.shape[2:]),
                                 in_s, self.out_shape(n))
        if not isinstance(padding, str):
            padding = _ints(padding, d)
        up, method, _ = conv_upper_bound(w, in_s[1:], stride=_ints(stride, d), padding=padding,
                                         dilation=_ints(dilation, d), groups=groups, transposed=transposed,
                                         output_padding=op, dense_limit=self.dense_limit, where=n.name)
        return self.unary(n, name, up, f"operator norm upper bound ({method})")

    def pool(self, n, a, kind: str, kw: dict, d: int) -> float:
        in_s, out = self.in_shape(a), self.out_shape(n)
        if isinstance(out[0], tuple):
            out = out[0]
        k = _ints(kw["kernel_size"], d)
        s = _ints(kw.get("stride") or k, d)
        p = _ints(kw.get("padding", 0) or 0, d)
        dil = _ints(kw.get("dilation", 1) or 1, d) if kind == "max" else (1,) * d
        cip = kw.get("count_include_pad", True)
        cip = True if cip is None else bool(cip)
        n_in, n_out = in_s[-d:], out[-d:]
        per = [R.pool_windows(kind, n_in[i], n_out[i], k[i], s[i], p[i], dil[i], cip) for i in range(d)]
        if kind == "max":
            return R.max_pool_factor([w for w, _ in per], list(n_in))
        divisor = kw.get("divisor_override")
        if divisor:
            mats = R.avg_pool_matrices([w for w, _ in per], list(n_in), [[1] * len(w) for w, _ in per])
            return R.avg_pool_factor(mats, 1.0 / float(divisor))
        return R.avg_pool_factor(R.avg_pool_matrices([w for w, _ in per], list(n_in), [dv for _, dv in per]))

    def adaptive(self, n, a, kind: str) -> float:
        in_s, out = self.in_shape(a), self.out_shape(n)
        if isinstance(out[0], tuple):
            out = out[0]
        d = len(out) - 2
        wins = [R.adaptive_windows(in_s[-d + i], out[-d + i]) for i in range(d)]
        if kind == "max":
            return R.max_pool_factor(wins, list(in_s[-d:]))
        return R.avg_pool_factor(R.avg_pool_matrices(wins, list(in_s[-d:]), [[len(w) for w in ws] for ws in wins]))


def _matrix_norm(w: Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().to(torch.float64), ord=2)) * (1 + SVD_MARGIN)


def _bn_factor(mean, var, weight, eps) -> float:
    scale = 1.0 / torch.sqrt(var.detach().to(torch.float64) + float(eps))
    if weight is not None:
        scale = scale * weight.detach().to(torch.float64).abs()
    return float(scale.max()) * (1 + 1e-12)


def _pad_factor(in_s, padding, mode: str, reversed_pairs: bool = False) -> float:
    """``padding``: module form (l, r, t, b, ...) last dim first, like F.pad."""
    pads = tuple(padding) if not isinstance(padding, int) else (padding,) * (2 * (len(in_s) - 2))
    out = 1.0
    for i in range(len(pads) // 2):
        n = in_s[-1 - i]
        out *= R.padding_map_norm(n, pads[2 * i], pads[2 * i + 1], mode)
    return out


def _output_padding(stride, padding, dilation, k, in_s, out) -> tuple[int, ...]:
    d = len(k)
    stride, padding, dilation = _ints(stride, d), _ints(padding, d), _ints(dilation, d)
    return tuple(out[2 + i] - ((in_s[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
                 for i in range(d))
