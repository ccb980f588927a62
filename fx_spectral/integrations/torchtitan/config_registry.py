"""Config registry: ``--module fx_spectral.integrations.torchtitan --config <name>``.

Each function returns a :class:`SpectralTrainer.Config`: TorchTitan's own Qwen3 config plus a
``spectral`` section; every field can be overridden on the command line as tyro spells it
(``--spectral.w_max 2``, ``--spectral.method soft_cap``, ``--spectral.no-exact``,
``--spectral.log-exact``). TorchTitan 0.3.0 reads no TOML file.

The debugmodel configs train on data this machine already has: a tokenizer trained here and the
``python_stdlib`` dataset (:mod:`fx_spectral.integrations.torchtitan.data`). The 0.6B config keeps
TorchTitan's (``--hf_assets_path`` with the Qwen3 tokenizer, the ``c4`` dataset).
"""

from __future__ import annotations

import dataclasses

from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention  # noqa: E402
from torchtitan.models.qwen3 import config_registry as qwen3_registry  # noqa: E402

from fx_spectral.integrations.torchtitan.config import SpectralConfig  # noqa: E402
from fx_spectral.integrations.torchtitan.trainer import SpectralTrainer  # noqa: E402

__all__ = [
    "with_spectral",
    "use_sdpa_attention",
    "use_local_data",
    "qwen3_debugmodel_spectral",
    "qwen3_debugmodel_spectral_sdpa",
    "qwen3_0_6b_spectral",
    "qwen3_0_6b_spectral_sdpa",
]


def with_spectral(config, spectral: SpectralConfig | None = None) -> SpectralTrainer.Config:
    """Turn any ``Trainer.Config`` into a :class:`SpectralTrainer.Config` with ``spectral``.

    Example::

        from torchtitan.models.qwen3.config_registry import qwen3_1_7b
        cfg = with_spectral(qwen3_1_7b(), SpectralConfig(method="hard_cap", w_max=2.0))
    """
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    values["spectral"] = spectral if spectral is not None else SpectralConfig()
    return SpectralTrainer.Config(**values)


def use_sdpa_attention(model_config) -> int:
    """Replace every FlexAttention inner attention by SDPA (trains on CPU; any compile backend).

    NB: mutates ``model_config`` in place; returns the number of layers changed.
    """
    found = list(model_config.traverse(FlexAttention.Config))
    for _, _, parent, attr in found:
        if isinstance(parent, list):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())
    return len(found)


# The exact hard cap: min(sigma_i, w_max) for every singular value, from an eigendecomposition of the
# smaller Gram matrix, so the cap holds after every step whatever the step size (measured: exact
# RMS->RMS sigma <= 1.000003 x the cap). Switch with --spectral.method / --spectral.no-exact.
_DEFAULT = SpectralConfig(method="hard_cap", w_max=1.0, exact=True)


def use_local_data(config, vocab_size: int | None = None):
    """Point ``config`` at the tokenizer trained here and the ``python_stdlib`` dataset (no download).

    ``vocab_size`` defaults to the model's vocabulary capped at 2048. NB: mutates ``config``
    (``hf_assets_path``, ``dataloader.dataset``) and TorchTitan's dataset table; returns ``config``.
    """
    from fx_spectral.integrations.torchtitan.data import DATASET, build_tokenizer, register_dataset

    if vocab_size is None:
        vocab_size = min(2048, int(config.model_spec.model.vocab_size))
    register_dataset()
    config.hf_assets_path = build_tokenizer(vocab_size)
    config.dataloader.dataset = DATASET
    return config


def qwen3_debugmodel_spectral() -> SpectralTrainer.Config:
    """Qwen3 debugmodel (TorchTitan's ``qwen3_debugmodel``): every hidden Linear (Q, K, V blocks of
    the fused wqkv separately, wo, w1/w2/w3) kept at RMS→RMS norm ≤ 1 by the exact hard cap; local
    tokenizer and ``python_stdlib`` data."""
    return use_local_data(with_spectral(qwen3_registry.qwen3_debugmodel(), _DEFAULT))


def qwen3_debugmodel_spectral_sdpa() -> SpectralTrainer.Config:
    """As :func:`qwen3_debugmodel_spectral` with SDPA attention: trains on CPU and compiles with
    ``--compile.enable --compile.backend spectral``."""
    config = qwen3_debugmodel_spectral()
    use_sdpa_attention(config.model_spec.model)
    return config


def qwen3_0_6b_spectral() -> SpectralTrainer.Config:
    """Qwen3 0.6B (TorchTitan's ``qwen3_0_6b``: its tokenizer folder and dataset) with the same
    ``spectral`` defaults as the debugmodel."""
    return with_spectral(qwen3_registry.qwen3_0_6b(), _DEFAULT)


def qwen3_0_6b_spectral_sdpa() -> SpectralTrainer.Config:
    """As :func:`qwen3_0_6b_spectral` with SDPA attention (trains on CPU). On a machine without the
    Qwen3 tokenizer: ``--hf_assets_path $(python -m fx_spectral.integrations.torchtitan.data)
    --dataloader.dataset python_stdlib``."""
    config = qwen3_0_6b_spectral()
    use_sdpa_attention(config.model_spec.model)
    return config
