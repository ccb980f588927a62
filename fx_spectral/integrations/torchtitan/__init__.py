"""fx_spectral for TorchTitan: spectral constraints on Qwen3 (and other decoders), FSDP2 / TP ready.

Install with ``pip install -e ".[torchtitan]"`` from a clone of the repository. Then either

* train through the entry point (TorchTitan's own ``main``; on a CPU-only machine it first applies
  what TorchTitan 0.3.0 lacks there, see :mod:`.compat`; on GPUs it changes nothing but a missing
  ``torch.distributed.set_timeout``)::

      torchrun --nproc_per_node 8 -m fx_spectral.integrations.torchtitan.train \\
          --module fx_spectral.integrations.torchtitan --config qwen3_0_6b_spectral \\
          --spectral.method hard_cap --spectral.w_max 1.0

* or build your own ``SpectralTrainer.Config`` (a ``Trainer.Config`` with a ``spectral`` section),
  or chain :func:`spectral_post_optimizer_build_fn` into your ``ModelSpec``.

Importing this package imports nothing from TorchTitan and patches nothing: names are loaded on
first use. Without ``triton`` (CPU only) TorchTitan's model package does not import; the entry point
(or :func:`.compat.apply`) registers a stand-in for the one kernels module that needs it.
"""

import importlib

try:
    import torchtitan  # noqa: F401  (its __init__ only reads its version: nothing is patched or loaded)
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "fx_spectral.integrations.torchtitan needs TorchTitan, which is not installed: "
        'pip install -e ".[torchtitan]" in a clone of fx_spectral'
    ) from e

# Names are imported on first use (PEP 562), so that importing this package imports nothing from
# TorchTitan and changes nothing in torch or TorchTitan (the CPU workarounds live in ``compat`` and
# are applied by the ``train`` entry point only).
_EXPORTS = {
    "SpectralConfig": "config",
    "qwen3_0_6b_spectral": "config_registry",
    "qwen3_0_6b_spectral_sdpa": "config_registry",
    "use_local_data": "config_registry",
    "qwen3_debugmodel_spectral": "config_registry",
    "qwen3_debugmodel_spectral_sdpa": "config_registry",
    "use_sdpa_attention": "config_registry",
    "with_spectral": "config_registry",
    "SpectralRun": "hooks",
    "attach": "hooks",
    "chain": "hooks",
    "fused_qkv_split": "hooks",
    "qwen3_w_max": "hooks",
    "spectral_post_optimizer_build_fn": "hooks",
    "SpectralState": "state",
    "SpectralTrainer": "trainer",
    "check_compile_backend": "trainer",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise ImportError(
            f"fx_spectral.integrations.torchtitan.{name}: TorchTitan 0.3.0 imports triton (its MoE GPU kernels), "
            "which is not installed. On a CPU-only machine train through "
            "`python -m fx_spectral.integrations.torchtitan.train ...`, or call "
            "`fx_spectral.integrations.torchtitan.compat.apply()` first; on a GPU machine `pip install triton`."
        ) from e
    globals()[name] = value
    return value


__all__ = [
    "SpectralConfig",
    "SpectralRun",
    "SpectralState",
    "SpectralTrainer",
    "attach",
    "chain",
    "check_compile_backend",
    "fused_qkv_split",
    "qwen3_0_6b_spectral",
    "qwen3_0_6b_spectral_sdpa",
    "use_local_data",
    "qwen3_debugmodel_spectral",
    "qwen3_debugmodel_spectral_sdpa",
    "qwen3_w_max",
    "spectral_post_optimizer_build_fn",
    "use_sdpa_attention",
    "with_spectral",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
