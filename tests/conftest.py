"""Shared pytest configuration: hypothesis profiles, seeding, and a module-snapshot helper."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI: few examples, no per-example deadline (the first example pays for torch's lazy imports).
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (spectral_norm draws its u/v from it)."""
    torch.manual_seed(0)
    yield


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed call must leave untouched, per submodule: class, ``__dict__`` keys,
    parameter/buffer names, identities and values, and the state_dict."""
    snap = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        snap[fqn] = {
            "class": type(m),
            "dict_keys": sorted(m.__dict__),
            "sn_params": dict(m.__dict__.get("_sn_params", {})),
            "params": [(n, id(p), _copy(p)) for n, p in m._parameters.items()],
            "buffers": [(n, id(b), _copy(b)) for n, b in m._buffers.items()],
        }
    snap[""]["state_dict"] = {k: _copy(v) for k, v in model.state_dict(keep_vars=True).items()}
    return snap


def _copy(t):
    if t is None or isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
        return type(t).__name__
    return t.detach().clone()


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), "the set of submodules changed"
    for fqn in before:
        b, a = before[fqn], after[fqn]
        assert a["class"] is b["class"], f"{fqn!r}: class changed {b['class']} -> {a['class']}"
        assert a["dict_keys"] == b["dict_keys"], f"{fqn!r}: __dict__ keys changed"
        assert a["sn_params"] == b["sn_params"], f"{fqn!r}: _sn_params changed"
        for kind in ("params", "buffers", "state_dict"):
            if kind not in b:
                continue
            bi = b[kind].items() if isinstance(b[kind], dict) else [(n, (i, t)) for n, i, t in b[kind]]
            ai = a[kind].items() if isinstance(a[kind], dict) else [(n, (i, t)) for n, i, t in a[kind]]
            assert [k for k, _ in bi] == [k for k, _ in ai], f"{fqn!r}: {kind} names changed"
            for (k, vb), (_, va) in zip(bi, ai):
                if kind != "state_dict":
                    assert vb[0] == va[0], f"{fqn!r}: {kind[:-1]} {k!r} was replaced"
                    vb, va = vb[1], va[1]
                if isinstance(vb, str) or isinstance(va, str):
                    assert vb == va, f"{fqn!r}: {k!r} changed"
                else:
                    assert vb.dtype == va.dtype and vb.shape == va.shape, f"{fqn!r}: {k!r} changed dtype/shape"
                    assert torch.equal(vb, va), f"{fqn!r}: {k!r} changed value"


@pytest.fixture
def module_snapshot():
    """``(snapshot, assert_same_snapshot)``: take a snapshot, later assert nothing changed."""
    return snapshot, assert_same_snapshot


def tiny_qwen3_config(**overrides):
    """A Hugging Face ``Qwen3Config`` small enough for CPU tests (2 layers, hidden 64, 4 query / 2 KV
    heads of 16, MLP 128, vocab 256); ``overrides`` set further fields. Skips without transformers."""
    transformers = pytest.importorskip("transformers")
    fields = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    return transformers.Qwen3Config(**{**fields, **overrides})


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny ops (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
