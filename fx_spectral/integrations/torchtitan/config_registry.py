"""Config registry: ``--module fx_spectral.integrations.torchtitan --config <name>``.

Each function returns a :class:`SpectralTrainer.Config`: TorchTitan's own Qwen3 config plus a
``spectral`` section; every field can be overridden from the command line (``--spectral.w_max 2``,
``--spectral.method soft_cap``, ...) or a TOML ``[spectral]`` table.
"""

from __future__ import annotations

import dataclasses

from fx_spectral.integrations.torchtitan import _triton_shim

_triton_shim.install()

from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention  # noqa: E402
from torchtitan.models.qwen3 import config_registry as qwen3_registry  # noqa: E402

from fx_spectral.integrations.torchtitan.config import SpectralConfig  # noqa: E402
from fx_spectral.integrations.torchtitan.trainer import SpectralTrainer  # noqa: E402

__all__ = [
    "with_spectral",
    "use_sdpa_attention",
    "qwen3_debugmodel_spectral",
    "qwen3_debugmodel_spectral_sdpa",
    "qwen3_0_6b_spectral",
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


# Spectral normalization with 2 persistent power iterations: robust to any step size (the polynomial
# caps assume sigma <= ~2.5 w_max before the projection, or an honest max_update_norm for soft_cap),
# one all-reduce of a vector per iteration under FSDP2. Switch with --spectral.method.
_DEFAULT = SpectralConfig(method="spectral_normalize", w_max=1.0, n_iter=2)


def qwen3_debugmodel_spectral() -> SpectralTrainer.Config:
    """Qwen3 debugmodel (TorchTitan's ``qwen3_debugmodel``): every hidden Linear (Q, K, V blocks of
    the fused wqkv separately, wo, w1/w2/w3) kept at RMS→RMS norm ≤ 1 by spectral normalization."""
    return with_spectral(qwen3_registry.qwen3_debugmodel(), _DEFAULT)


def qwen3_debugmodel_spectral_sdpa() -> SpectralTrainer.Config:
    """As :func:`qwen3_debugmodel_spectral` with SDPA attention: trains on CPU and compiles with
    ``--compile.enable --compile.backend spectral``."""
    config = qwen3_debugmodel_spectral()
    use_sdpa_attention(config.model_spec.model)
    return config


def qwen3_0_6b_spectral() -> SpectralTrainer.Config:
    """Qwen3 0.6B (TorchTitan's ``qwen3_0_6b``) with the same ``[spectral]`` defaults as the debugmodel."""
    return with_spectral(qwen3_registry.qwen3_0_6b(), _DEFAULT)
