"""The supported Hugging Face path: eager spectral normalization under the real transformers.Trainer.

A tiny Qwen3 is normalized with :func:`spectral_normalize_hf`, trained by ``Trainer`` for a few
steps (default ``remove_unused_columns``), checkpointed, and the checkpoint is loaded into a freshly
built model normalized the same way: the keys are the model's own (no ``_orig_mod.``), u/v
included, and the reloaded model computes what the trained one computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fx_spectral import is_spectral_normalized, spectral_sigma  # noqa: E402
from fx_spectral.integrations.hf import load_spectral_checkpoint, spectral_normalize_hf  # noqa: E402
from fx_spectral.nn import weight_matrix  # noqa: E402

STEPS = 3
VOCAB = 256


def _config(**kw):
    return transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, **kw,
    )


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_trainer")
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(_config())
    done = spectral_normalize_hf(model)
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("_u", "_v"))}
    weights_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
        save_strategy="steps", save_steps=STEPS, logging_steps=1, report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(2 * STEPS))
    result = trainer.train()
    return model, done, before, weights_before, result, out / f"checkpoint-{STEPS}"


def test_normalizes_every_linear_but_the_head(trained):
    model, done, *_ = trained
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(done) == linears - {"lm_head.weight"}
    assert len(done) == 2 * 7 and not is_spectral_normalized(model.lm_head)


def test_trainer_trains_the_normalized_model(trained):
    model, done, before, weights_before, result, _ = trained
    assert result.global_step == STEPS and torch.isfinite(torch.tensor(result.training_loss))
    q = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.weight.detach(), weights_before), "the optimizer did not move the raw weight"
    assert any(not torch.equal(dict(model.named_buffers())[n], b) for n, b in before.items()), "u/v never updated"
    # sigma_hat = u^T W v never exceeds the true norm; one power-iteration step per forward tracks it
    exact = torch.linalg.matrix_norm(q.weight.detach().double(), ord=2).item()
    assert 0.5 * exact < spectral_sigma(q).item() <= exact * (1 + 1e-5)
    # more training forwards (on a copy: the checkpoint tests need this state) converge to it
    q2 = copy.deepcopy(q).train()
    with torch.no_grad():
        for _ in range(200):
            q2(torch.randn(1, q2.in_features))
    w_bar = weight_matrix(q2.weight.detach().double(), 0) / spectral_sigma(q2).double()
    assert abs(torch.linalg.matrix_norm(w_bar, ord=2).item() - 1) < 1e-2


def test_checkpoint_keys_are_the_models_own_with_uv(trained):
    model, done, *_, ckpt = trained
    from safetensors.torch import load_file

    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert not [k for k in keys if k.startswith("_orig_mod.")]
    assert {f"{fqn}_u" for fqn in done} | {f"{fqn}_v" for fqn in done} <= keys
    assert keys == set(model.state_dict())


def test_checkpoint_reloads_into_a_fresh_model_and_outputs_match(trained):
    model, *_, ckpt = trained
    torch.manual_seed(123)  # other initial weights and u/v: everything must come from the checkpoint
    fresh = transformers.Qwen3ForCausalLM(_config())
    spectral_normalize_hf(fresh)
    load_spectral_checkpoint(fresh, ckpt)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, atol=0, rtol=0, msg=k)
    model.eval(), fresh.eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)
    model.train()


def test_reload_refuses_a_model_without_uv(trained):
    *_, ckpt = trained
    plain = transformers.Qwen3ForCausalLM(_config())
    with pytest.raises(ValueError, match="normalize it first with spectral_normalize_hf"):
        load_spectral_checkpoint(plain, ckpt)


def test_head_option_and_tied_head():
    model = transformers.Qwen3ForCausalLM(_config())
    assert "lm_head.weight" in spectral_normalize_hf(model, head=True)
    tied = transformers.Qwen3ForCausalLM(_config(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        spectral_normalize_hf(tied, head=True)
    assert not any(is_spectral_normalized(m) for m in tied.modules()), "a refused call changes nothing"
    assert "lm_head.weight" not in spectral_normalize_hf(tied)
