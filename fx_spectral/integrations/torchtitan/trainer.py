"""``SpectralTrainer``: TorchTitan's ``Trainer`` with a ``spectral`` config section (``--spectral.*`` flags).

It changes nothing in TorchTitan's training loop. Before the parent ``__init__`` runs it chains
:func:`~fx_spectral.integrations.torchtitan.hooks.spectral_post_optimizer_build_fn` after the model
spec's own ``post_optimizer_build_fn``; afterwards it registers the power-iteration vectors with the
checkpointer (key ``"spectral"``) and adds ``spectral/*`` metrics to TorchTitan's metric logging.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from fx_spectral.integrations.torchtitan.config import SpectralConfig
from fx_spectral.integrations.torchtitan.hooks import SpectralRun, spectral_post_optimizer_build_fn

__all__ = ["SpectralTrainer", "check_compile_backend"]


def check_compile_backend(config) -> None:
    """Validate ``--compile.backend spectral`` against the attention backend; register the backend.

    The ``"spectral"`` backend (spectral normalization in the forward graph) compiles each
    TransformerBlock through aot_autograd. FlexAttention only has an inductor lowering (TorchTitan
    accepts it under ``inductor`` / ``aot_eager`` only), so ``spectral`` needs a non-flex attention.

    Raises:
        ValueError: compile backend ``"spectral"`` with FlexAttention layers.
    """
    compile_cfg = config.compile
    if not (compile_cfg.enable and "model" in compile_cfg.components and compile_cfg.backend == "spectral"):
        return
    from torchtitan.models.common.attention import FlexAttention

    spec = config.model_spec
    if spec is not None and any(True for _ in spec.model.traverse(FlexAttention.Config)):
        raise ValueError(
            "compile.backend='spectral' cannot compile this model: its attention is FlexAttention, which "
            "only lowers through TorchTitan's 'inductor' or 'aot_eager' backends (the flex region has no "
            "kernel under another backend). Use a config with SDPA attention (e.g. --module "
            "fx_spectral.integrations.torchtitan --config qwen3_debugmodel_spectral_sdpa), or keep "
            "compile.backend='inductor' and use the --spectral.* constraints instead."
        )
    import fx_spectral.graph.backend  # noqa: F401  (registers "spectral" with dynamo)


class SpectralTrainer(Trainer):
    """TorchTitan ``Trainer`` + spectral constraints configured by ``config.spectral``.

    Attributes:
        spectral: the :class:`~fx_spectral.integrations.torchtitan.hooks.SpectralRun` (None when
            ``spectral.enable`` is false): handles, metrics, checkpoint state.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        spectral: SpectralConfig = field(default_factory=SpectralConfig)
        """Spectral weight regulation after every optimizer step (fx_spectral)."""

    spectral: SpectralRun | None

    def __init__(self, config: Config):
        self.spectral = None
        check_compile_backend(config)
        spec = config.model_spec
        if spec is not None and config.spectral.enable:
            # NB: replaces config.model_spec by a copy whose hook chains the model's own one.
            config.model_spec = dataclasses.replace(
                spec,
                post_optimizer_build_fn=spectral_post_optimizer_build_fn(
                    config.spectral, spec.post_optimizer_build_fn, on_attach=self._on_attach
                ),
            )
        super().__init__(config)
        if self.spectral is None:
            return
        states = getattr(self.checkpointer, "states", None)
        if states is not None:
            states["spectral"] = self.spectral.state
        self._wrap_metrics()

    def _on_attach(self, run: SpectralRun | None) -> None:
        self.spectral = run
        if run is not None:
            n = sum(len(h.names) for h in run.handles)
            options = ", ".join(f"{k}={v!r}" for k, v in run.config.method_options().items())
            logger.info(
                f"fx_spectral: {run.config.method}({options}) on {n} weight matrices after every optimizer step"
            )

    def _wrap_metrics(self) -> None:
        processor = self.metrics_processor
        log = processor.log
        run = self.spectral

        def log_with_spectral(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
            extra = dict(extra_metrics or {})
            if run.should_log():  # collective for sharded weights: every rank logs
                metrics = run.metrics()
                extra.update(metrics)
                if "spectral/sigma_max" in metrics:
                    msg = (
                        f"spectral: sigma max {metrics['spectral/sigma_max']:.4f}"
                        f" mean {metrics['spectral/sigma_mean']:.4f}"
                    )
                    if "spectral/projection_ms" in metrics:
                        msg += (
                            f", projection {metrics['spectral/projection_ms']:.1f} ms"
                            f" vs optimizer step {metrics['spectral/optimizer_step_ms']:.1f} ms"
                        )
                    logger.info(msg)
            return log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)

        # NB: instance attribute shadows MetricsProcessor.log for this trainer only.
        processor.log = log_with_spectral
