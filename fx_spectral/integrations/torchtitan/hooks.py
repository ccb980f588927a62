r"""Wire :func:`fx_spectral.constrain` into TorchTitan: roles, the fused-QKV split, the chained hook.

TorchTitan calls ``ModelSpec.post_optimizer_build_fn(optimizers, model_parts, parallel_dims)`` once,
right after building its ``OptimizersContainer``. :func:`spectral_post_optimizer_build_fn` returns
such a function that first runs the model's own hook (Qwen3's MoE load balancing) and then calls
``constrain()`` on every model part with the container, so the projection runs as a step post-hook
of the container after every ``optimizers.step()``, on plain or DTensor (FSDP2 / TP) weights.

Fused QKV: TorchTitan's ``FusedQKVLinear.wqkv.weight`` has rows ordered
``(n_kv, R, head_dim)`` with ``R = heads_per_kv + 2``: per KV group its Q heads, then K, then V.
:func:`fused_qkv_split` views it as ``(n_kv, R, head_dim, dim)`` and hands ``constrain`` the Q block
``[:, :heads_per_kv]`` (``n_heads·head_dim × dim``, the matrix of an unfused ``wq``), the K block
``[:, heads_per_kv]`` and the V block ``[:, heads_per_kv + 1]``; each is projected on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fx_spectral.constraint import Constraint, constrain
from fx_spectral.integrations.torchtitan.config import SpectralConfig
from fx_spectral.integrations.torchtitan.state import SpectralState, canonical_name
from fx_spectral.selection import match as _match  # the glob rule constrain uses (only * and ? are wildcards)

__all__ = [
    "SpectralRun",
    "attach",
    "chain",
    "fused_qkv_split",
    "qwen3_w_max",
    "spectral_post_optimizer_build_fn",
]


def qwen3_w_max(config: SpectralConfig, names: Sequence[str] | None = None) -> dict[str, float] | float:
    """Per-role ``w_max`` patterns for TorchTitan Qwen3/Llama parameter names (a float if no override).

    ``names``: the weight names that will be constrained (``fqn`` / ``fqn[key]``); patterns matching
    none of them are dropped (``constrain`` rejects a pattern that matches nothing).

    Example::

        qwen3_w_max(SpectralConfig(w_max=1.0, w_max_qk=2.0))
        # {'*.wqkv.weight[q]': 2.0, '*.wqkv.weight[k]': 2.0, ..., '*': 1.0}  (constrain's globs: only * and ?)
    """
    roles = {"qk": config.w_max_qk, "vo": config.w_max_vo, "mlp": config.w_max_mlp}
    if all(v is None for v in roles.values()) and config.w_max_lm_head is None:
        return float(config.w_max)
    qk = config.w_max_qk if config.w_max_qk is not None else config.w_max
    vo = config.w_max_vo if config.w_max_vo is not None else config.w_max
    mlp = config.w_max_mlp if config.w_max_mlp is not None else config.w_max
    out = {
        "*.wqkv.weight[q]": qk,
        "*.wqkv.weight[k]": qk,
        "*.attention.*wq.weight": qk,
        "*.attention.*wk.weight": qk,
        "*.wqkv.weight[v]": vo,
        "*.attention.*wv.weight": vo,
        "*.attention.wo.weight": vo,
        "*.feed_forward.w1.weight": mlp,
        "*.feed_forward.w2.weight": mlp,
        "*.feed_forward.w3.weight": mlp,
    }
    if config.w_max_lm_head is not None:
        out["lm_head.weight"] = config.w_max_lm_head
        out["tok_embeddings.weight"] = config.w_max_lm_head  # the tied head
    if names is not None:
        out = {k: v for k, v in out.items() if any(_match(n, k) for n in names)}
    out["*"] = config.w_max
    return {k: float(v) for k, v in out.items()}


def fused_qkv_split(model: nn.Module) -> Callable[[str, torch.Tensor], dict | None]:
    """A ``constrain(split=...)`` callable for every fused ``wqkv`` of a TorchTitan model.

    Finds modules with a ``wqkv`` Linear and ``heads_per_kv`` / ``head_dim`` attributes
    (``FusedQKVLinear``) and returns ``split(fqn, weight) -> {"q", "k", "v"} views | None``.
    """
    layouts: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        wqkv = getattr(mod, "wqkv", None)
        if isinstance(wqkv, nn.Linear) and hasattr(mod, "heads_per_kv") and hasattr(mod, "head_dim"):
            layouts[f"{name}.wqkv.weight" if name else "wqkv.weight"] = (int(mod.heads_per_kv), int(mod.head_dim))

    def split(fqn: str, weight: torch.Tensor) -> dict | None:
        layout = layouts.get(fqn)
        if layout is None:
            return None
        hpk, hd = layout
        w = weight.view(-1, hpk + 2, hd, weight.shape[-1])
        return {"q": w[:, :hpk], "k": w[:, hpk], "v": w[:, hpk + 1]}

    split.layouts = layouts  # type: ignore[attr-defined]
    return split


def _head_includes(model: nn.Module) -> list[str]:
    # The output head as named_parameters spells it: with tied weights, the embedding's name.
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for mod_name, mod in model.named_modules():
        if mod_name.rsplit(".", 1)[-1] in ("lm_head", "output") and isinstance(
            getattr(mod, "weight", None), torch.Tensor
        ):
            out.append(names[id(mod.weight)])
    return out


class SpectralRun:
    """What :func:`attach` sets up: one :class:`~fx_spectral.constraint.Constraint` per model part,
    step timing, metrics (:meth:`metrics`) and checkpoint state (:attr:`state`).

    Attributes:
        config: the :class:`SpectralConfig`.
        handles: the constrain handles, one per model part.
        state: a ``Stateful`` with the power-iteration vectors (register it with the checkpointer).
    """

    def __init__(self, config: SpectralConfig, handles: list[Constraint]):

        self.config = config
        self.handles = handles
        self.state = SpectralState(handles)
        self._t_pre = self._t_opt = 0.0
        self._projection_s: list[float] = []
        self._optimizer_s: list[float] = []
        self._logs = 0
        self._steps = 0
        self._timed = False

    # --- timing hooks (registered around constrain's own post-hook), every timing_interval steps -
    def _sync(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _pre(self, *args) -> None:
        every = self.config.timing_interval
        self._timed = every > 0 and self._steps % every == 0
        self._steps += 1
        if self._timed:
            self._sync()
            self._t_pre = time.perf_counter()

    def _post_optimizer(self, *args) -> None:
        if self._timed:
            self._sync()
            self._t_opt = time.perf_counter()
            self._optimizer_s.append(self._t_opt - self._t_pre)

    def _post_projection(self, *args) -> None:
        if self._timed:
            self._sync()
            self._projection_s.append(time.perf_counter() - self._t_opt)

    # --- metrics -------------------------------------------------------------------------------
    def metrics(self, *, per_layer: bool | None = None, exact: bool | None = None) -> dict[str, float]:
        """``spectral/*`` metrics: per-weight RMS→RMS sigma, max / mean, projection and optimizer
        step time (mean over the steps since the last call). Collective for DTensor weights."""
        per_layer = self.config.log_per_layer if per_layer is None else per_layer
        exact = self.config.log_exact if exact is None else exact
        out: dict[str, float] = {}
        sigmas = []
        for handle in self.handles:
            for name, entry in handle.report(exact=exact, activations=False).items():
                sigmas.append(entry["sigma"])
                if per_layer:
                    out[f"spectral/sigma/{canonical_name(name)}"] = entry["sigma"]
        if sigmas:
            out["spectral/sigma_max"] = max(sigmas)
            out["spectral/sigma_mean"] = sum(sigmas) / len(sigmas)
        if self._projection_s:
            proj = sum(self._projection_s) / len(self._projection_s)
            opt = sum(self._optimizer_s) / max(len(self._optimizer_s), 1)
            out["spectral/projection_ms"] = 1e3 * proj
            out["spectral/optimizer_step_ms"] = 1e3 * opt
            if opt > 0:
                out["spectral/projection_vs_optimizer"] = proj / opt
            self._projection_s.clear()
            self._optimizer_s.clear()
        return out

    def should_log(self) -> bool:
        """True every ``log_interval``-th call (one call per TorchTitan metrics-logging step)."""
        if self.config.log_interval == 0:
            return False
        self._logs += 1
        return (self._logs - 1) % self.config.log_interval == 0


def attach(
    config: SpectralConfig, optimizers: torch.optim.Optimizer, model_parts: Sequence[nn.Module]
) -> SpectralRun | None:
    """Constrain every model part's weights after each ``optimizers.step()``; None if disabled.

    Selection: TorchTitan's hidden Linear weights (``constrain``'s default: no embeddings, no
    ``lm_head``/``output``; a weight tied to the embedding is left alone), ``config.include``
    replacing it, ``config.exclude`` removing from it, and the head when ``w_max_lm_head`` is set.
    """
    if not config.enable:
        return None
    run_box: list[SpectralRun] = []
    pre = optimizers.register_step_pre_hook(lambda *a: run_box[0]._pre(*a))
    mid = optimizers.register_step_post_hook(lambda *a: run_box[0]._post_optimizer(*a))
    handles = []
    try:
        for part in model_parts:
            include = list(config.include) or None
            if config.w_max_lm_head is not None:
                heads = _head_includes(part)
                if heads:
                    include = (include or _default_names(part)) + heads
            split = fused_qkv_split(part) if config.split_fused_qkv else None
            handles.append(
                constrain(
                    part,
                    optimizers,
                    config.method,
                    w_max=qwen3_w_max(config, _candidate_names(part, include, config.exclude, split)),
                    include=include,
                    exclude=list(config.exclude) or None,
                    split=split,
                    **config.method_options(),
                )
            )
    except Exception:
        pre.remove()
        mid.remove()
        for h in handles:
            h.remove()
        raise
    run = SpectralRun(config, handles)
    run_box.append(run)
    post = optimizers.register_step_post_hook(run._post_projection)
    run._hooks = [pre, mid, post]
    return run


def _default_names(model: nn.Module) -> list[str]:
    # constrain's default selection (needed when the head is added to it): the same function.
    from fx_spectral.selection import default_names

    return default_names(model)


def _candidate_names(model: nn.Module, include, exclude, split) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    chosen = [n for n in names if any(_match(n, p) for p in include)] if include else _default_names(model)
    chosen = [n for n in chosen if not any(_match(n, p) for p in exclude)]
    layouts = getattr(split, "layouts", {})
    return [name for n in chosen for name in ([f"{n}[{k}]" for k in ("q", "k", "v")] if n in layouts else [n])]


def chain(*fns: Callable | None) -> Callable:
    """One ``post_optimizer_build_fn`` calling each non-None function in order."""
    fns = tuple(f for f in fns if f is not None)

    def chained(optimizers, model_parts, parallel_dims) -> None:
        for fn in fns:
            fn(optimizers, model_parts, parallel_dims)

    chained.chained = fns  # type: ignore[attr-defined]
    return chained


def spectral_post_optimizer_build_fn(
    config: SpectralConfig,
    previous: Callable | None = None,
    *,
    on_attach: Callable[[SpectralRun | None], None] | None = None,
) -> Callable:
    """A ``ModelSpec.post_optimizer_build_fn`` running ``previous`` (e.g. Qwen3's MoE hook), then :func:`attach`.

    Args:
        config: the ``spectral`` section.
        previous: the model's own hook, kept (chained, not replaced).
        on_attach: receives the :class:`SpectralRun` (None when disabled), e.g. to log its metrics.

    Example::

        spec = model_registry("debugmodel")
        spec.post_optimizer_build_fn = spectral_post_optimizer_build_fn(SpectralConfig(), spec.post_optimizer_build_fn)
    """

    def spectral(optimizers, model_parts, parallel_dims) -> None:
        run = attach(config, optimizers, model_parts)
        if on_attach is not None:
            on_attach(run)

    return chain(previous, spectral)
