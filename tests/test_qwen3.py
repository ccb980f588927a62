"""HF transformers Qwen3 (built offline from a config): constrain()'s default selection and the
per-role caps of fx_spectral.integrations.hf.qwen3_roles, checked with torch.linalg.matrix_norm."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen3_config

from fx_spectral.constraint import constrain
from fx_spectral.integrations.hf import qwen3_roles

transformers = pytest.importorskip("transformers")

HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # One intra-op thread: on a busy 2-core machine OpenMP's spinning threads slow these down a lot.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _qwen3(tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(tiny_qwen3_config(tie_word_embeddings=tie))
    with torch.no_grad():  # large enough that every cap engages
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5)
    return model


def _train(model, opt, steps=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 12), generator=g)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def _rms_sigma(w: torch.Tensor) -> float:
    w = w.detach().float()
    return float(torch.linalg.matrix_norm(w, ord=2)) / (w.shape[0] / w.shape[1]) ** 0.5


def test_default_selection_is_the_hidden_linears():
    model = _qwen3()
    handle = constrain(model, torch.optim.AdamW(model.parameters(), lr=1e-3), "spectral_normalize", w_max=qwen3_roles())
    expected = sorted(
        f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}.weight"
        for i in range(2)
        for p in HIDDEN
    )
    assert sorted(handle.names) == expected  # no embed_tokens, no lm_head, no norms


@pytest.mark.parametrize("tie", [False, True])
def test_roles_cap_each_projection_after_adamw_steps(tie):
    model = _qwen3(tie=tie)
    embed_before = model.model.embed_tokens.weight.detach().clone()
    roles = qwen3_roles(w_qk=2.0, w_vo=1.0, w_mlp=1.5, w_lm_head=3.0, model=model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle = constrain(model, opt, "pure_svd", w_max=roles, include=list(roles))
    _train(model, opt)
    caps = {
        "q_proj": 2.0,
        "k_proj": 2.0,
        "v_proj": 1.0,
        "o_proj": 1.0,
        "gate_proj": 1.5,
        "up_proj": 1.5,
        "down_proj": 1.5,
    }
    for name, p in model.named_parameters():
        role = name.split(".")[-2]
        if role in caps:
            assert _rms_sigma(p) <= caps[role] * (1 + 1e-4), name
            assert _rms_sigma(p) >= caps[role] * (1 - 1e-3), name  # started above: sits at the cap
    assert _rms_sigma(model.lm_head.weight) <= 3.0 * (1 + 1e-4)
    report = handle.report()
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"  # the tied weight's one name
    assert report[head]["w_max"] == 3.0
    if not tie:  # an untied embedding is left alone (AdamW moves it, no projection)
        assert "model.embed_tokens.weight" not in report
        assert not torch.equal(model.model.embed_tokens.weight, embed_before)


def test_roles_validate():
    with pytest.raises(ValueError, match="w_qk"):
        qwen3_roles(w_qk=0.0)
    assert "lm_head.weight" not in qwen3_roles()
    assert "model.embed_tokens.weight" in qwen3_roles(w_lm_head=1.0, model=_qwen3(tie=True))
    assert "lm_head.weight" in qwen3_roles(w_lm_head=1.0, model=_qwen3(tie=False))


def test_exact_spectral_normalize_holds_the_caps_at_every_step():
    """spectral_normalize(exact=True): the exact sigma never exceeds the cap (the power-iteration
    default can under-read after AdamW moves the top direction; see docs/constraints.md)."""
    model = _qwen3()
    roles = qwen3_roles(w_qk=1.0, w_vo=1.0, w_mlp=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle = constrain(model, opt, "spectral_normalize", w_max=roles, exact=True)
    params = dict(model.named_parameters())
    for _ in range(3):
        for name in handle.names:
            assert _rms_sigma(params[name]) <= 1.0 * (1 + 1e-5), name
        _train(model, opt, steps=1)
    report = handle.report()
    assert max(r["sigma"] for r in report.values()) <= 1.0 * (1 + 1e-5)
    assert min(r["sigma"] for r in report.values()) >= 0.99  # started far above: sits at the cap
