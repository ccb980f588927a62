"""The "spectral" backend on HF transformers models built from tiny configs (they do not symbolic_trace).

Qwen3 and BERT: backend vs the eager API vs torch's spectral_norm over 3 SGD steps then eval
(aot_eager, 1e-6). Llama and ViT: every nn.Linear normalized, state_dict keys as with the eager API.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen3_config
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fx_spectral
from fx_spectral.graph.backend import backend

transformers = pytest.importorskip("transformers")

# the shared protocol of the backend tests (tests/ is on sys.path under pytest's default import mode)
from test_backend import check_protocol  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _qwen3():
    return transformers.Qwen3ForCausalLM(tiny_qwen3_config(use_cache=False))


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def _vit():
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTModel(cfg)


def _linear_weights(model: nn.Module) -> set[str]:
    return {f"{fqn}.weight" for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}


def _normalized(model: nn.Module) -> set[str]:
    return {k[: -len("_u")] for k in model.state_dict() if k.endswith("_u")}


@pytest.mark.parametrize(
    "make, inputs, out",
    [
        (_qwen3, lambda: (torch.randint(0, 256, (2, 8)),), lambda y: y.logits),
        (_bert, lambda: (torch.randint(0, 100, (2, 8)),), lambda y: y.last_hidden_state),
    ],
    ids=["qwen3", "bert"],
)
def test_hf_matches_torch_spectral_norm(make, inputs, out):
    model = make()
    cnt = check_protocol(model, inputs(), backend(inner="aot_eager"), atol=1e-6, out=out)
    assert _normalized(model) == _linear_weights(model)  # every nn.Linear, nothing else
    # one graph, no breaks; HF forward reads self.training, so eval() is one more graph, not one per step
    assert not torch._dynamo.utils.counters["graph_break"]
    assert cnt.frame_count == 2


@pytest.mark.parametrize(
    "make, x, convs",
    [
        (_llama, lambda: torch.randint(0, 256, (2, 8)), set()),
        # ViT's patch embedding is a Conv2d: normalized too, as apply_spectral_norm does
        (_vit, lambda: torch.randn(2, 3, 16, 16), {"embeddings.patch_embeddings.projection.weight"}),
    ],
    ids=["llama", "vit"],
)
def test_hf_every_linear_normalized_with_eager_api_keys(make, x, convs):
    torch.manual_seed(0)
    model = make()
    eager = make()
    fx_spectral.apply_spectral_norm(eager)
    cnt = CompileCounterWithBackend(backend(inner="eager"))
    torch.compile(model, backend=cnt)(x())
    assert _normalized(model) == _linear_weights(model) | convs
    assert sorted(model.state_dict()) == sorted(eager.state_dict())
    assert cnt.frame_count == 1 and not torch._dynamo.utils.counters["graph_break"]
