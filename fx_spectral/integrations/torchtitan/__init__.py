"""fx_spectral for TorchTitan: spectral constraints on Qwen3 (and other decoders), FSDP2 / TP ready.

Install with ``pip install -e ".[torchtitan]"`` from a clone of the repository. Then either

* train with the config registry here::

      torchrun --nproc_per_node 8 -m torchtitan.train \\
          --module fx_spectral.integrations.torchtitan --config qwen3_0_6b_spectral \\
          --spectral.method soft_cap --spectral.max_update_norm 0.05

* or build your own ``SpectralTrainer.Config`` (a ``Trainer.Config`` with a ``spectral`` section),
  or chain :func:`spectral_post_optimizer_build_fn` into your ``ModelSpec``.

On machines without ``triton`` (CPU only) a small import shim stands in for TorchTitan's MoE GPU
kernels module so that TorchTitan's models import (see ``_triton_shim``).
"""

try:
    import torchtitan  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "fx_spectral.integrations.torchtitan needs TorchTitan, which is not installed: "
        'pip install -e ".[torchtitan]" in a clone of fx_spectral'
    ) from e

from fx_spectral.integrations.torchtitan import _triton_shim

_triton_shim.install()

from fx_spectral.integrations.torchtitan.config import SpectralConfig  # noqa: E402
from fx_spectral.integrations.torchtitan.config_registry import (  # noqa: E402
    qwen3_0_6b_spectral,
    qwen3_debugmodel_spectral,
    qwen3_debugmodel_spectral_sdpa,
    use_sdpa_attention,
    with_spectral,
)
from fx_spectral.integrations.torchtitan.hooks import (  # noqa: E402
    SpectralRun,
    attach,
    chain,
    fused_qkv_split,
    qwen3_w_max,
    spectral_post_optimizer_build_fn,
)
from fx_spectral.integrations.torchtitan.state import SpectralState  # noqa: E402
from fx_spectral.integrations.torchtitan.trainer import SpectralTrainer, check_compile_backend  # noqa: E402

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
    "qwen3_debugmodel_spectral",
    "qwen3_debugmodel_spectral_sdpa",
    "qwen3_w_max",
    "spectral_post_optimizer_build_fn",
    "use_sdpa_attention",
    "with_spectral",
]
