"""Hugging Face transformers: spectral normalization under ``transformers.Trainer``, and default
roles for HF decoders (Qwen3, Llama, Mistral naming).

**Trainer.** The supported path is eager: :func:`spectral_normalize_hf` normalizes the model's
Linear / Conv layers in place before the model is handed to ``Trainer``. The model keeps its class
(``Trainer`` reads its ``forward`` signature, ``remove_unused_columns`` works) and its
``state_dict`` keys, with float32 ``{name}_u`` / ``{name}_v`` buffers beside each normalized
weight, so ``save_pretrained`` / Trainer checkpoints carry them under the model's own names;
:func:`load_spectral_checkpoint` loads such a checkpoint (u/v included, strictly) into a model
normalized the same way. (``TrainingArguments(torch_compile_backend="spectral")`` is refused by
accelerate, which accepts only its own backend names, and a ``torch.compile``-d model handed to
``Trainer`` saves ``_orig_mod.``-prefixed keys: neither is a supported path.)

**Roles.** HF decoders name their hidden Linear layers ``model.layers.{i}.self_attn.{q,k,v,o}_proj``
and ``model.layers.{i}.mlp.{gate,up,down}_proj``; ``model.embed_tokens`` and ``lm_head`` are the
embedding and the output head. :func:`qwen3_roles` gives :func:`fx_spectral.constrain` one cap per
role, the split the Lipschitz-transformer paper uses (Q/K, V/O and MLP caps may differ).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from fx_spectral.nn import apply_spectral_norm

__all__ = ["load_spectral_checkpoint", "qwen3_roles", "spectral_normalize_hf"]


def spectral_normalize_hf(
    model: nn.Module,
    *,
    head: bool = False,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
) -> list[str]:
    r"""Spectral-normalize a Hugging Face model in place, eagerly: every Linear / Conv layer computes
    with :math:`W / \hat\sigma(W)` (see :func:`fx_spectral.apply_spectral_norm`).

    The output head (``model.get_output_embeddings()``, e.g. ``lm_head``) is left alone unless
    ``head=True``: normalizing it bounds the logits' scale. A head tied to the input embedding
    (``tie_word_embeddings=True``) is refused with ``head=True``: the embedding would keep reading
    the raw shared weight while the head reads the normalized one.

    Args:
        model: the HF model (any ``nn.Module`` works; the head is found through
            ``get_output_embeddings`` when the model has it).
        head: normalize the output head too. Default False.
        filter_fn: ``filter_fn(module, fqn) -> bool``, a further selection among the layers.
        n_power_iterations, eps: as in :func:`fx_spectral.spectral_norm`.

    Returns:
        the FQNs of the weights normalized now, e.g. ``["model.layers.0.self_attn.q_proj.weight", ...]``.

    Example::

        >>> model = transformers.Qwen3ForCausalLM(config)  # doctest: +SKIP
        >>> spectral_normalize_hf(model)                   # doctest: +SKIP
        >>> transformers.Trainer(model=model, args=args, train_dataset=data).train()  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"spectral_normalize_hf: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(head, bool):
        raise TypeError(f"spectral_normalize_hf: expected head to be a bool, got {head!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"spectral_normalize_hf: expected filter_fn(module, fqn) -> bool, got {filter_fn!r}")
    out_head = _output_head(model)
    if head and out_head is not None:
        inp = getattr(model, "get_input_embeddings", lambda: None)()
        if inp is not None and getattr(inp, "weight", None) is getattr(out_head, "weight", False):
            raise ValueError(
                "spectral_normalize_hf: head=True, but the output head shares its weight with the input "
                "embedding (tie_word_embeddings=True): the embedding would read the raw weight and the head the "
                "normalized one. Untie them (tie_word_embeddings=False) or keep head=False"
            )

    def select(module: nn.Module, fqn: str) -> bool:
        if module is out_head and not head:
            return False
        return filter_fn is None or bool(filter_fn(module, fqn))

    return apply_spectral_norm(model, filter_fn=select, n_power_iterations=n_power_iterations, eps=eps)


def load_spectral_checkpoint(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a ``save_pretrained`` / Trainer checkpoint of a spectral-normalized model into ``model``.

    ``model`` must be normalized the same way (build it from the config, then
    :func:`spectral_normalize_hf` with the same options) so that it has the same ``{name}_u`` /
    ``{name}_v`` buffers; every key is then loaded strictly, u/v included, and the model computes
    what the saved one computed. Weights that ``save_pretrained`` left out because they are tied to
    another saved one (a tied ``lm_head.weight``) are the only keys allowed to be missing.

    Args:
        model: the model to load into (in place).
        checkpoint: a directory with ``model.safetensors`` (or sharded ``model-*.safetensors``, or
            ``pytorch_model*.bin``), e.g. ``output_dir/checkpoint-500``; or one such file.

    Returns:
        ``model``.

    Example::

        >>> fresh = transformers.Qwen3ForCausalLM(config)  # doctest: +SKIP
        >>> spectral_normalize_hf(fresh)                   # doctest: +SKIP
        >>> load_spectral_checkpoint(fresh, "out/checkpoint-3")  # doctest: +SKIP
    """
    state = _read_checkpoint(os.fspath(checkpoint))
    prefixed = sorted(k for k in state if k.startswith("_orig_mod."))
    if prefixed:
        raise ValueError(
            f"load_spectral_checkpoint: {checkpoint}: keys carry torch.compile's '_orig_mod.' prefix "
            f"({prefixed[0]!r}, ...): this checkpoint was saved from a compiled wrapper, not the model; strip the "
            "prefix first (save the model itself, see fx_spectral.integrations.hf)"
        )
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in _tied_aliases(model)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        uv = [k for k in missing if k.endswith(("_u", "_v"))]
        hint = (" (the model lacks u/v buffers the checkpoint has: normalize it first with spectral_normalize_hf, "
                "same options)") if any(k.endswith(("_u", "_v")) for k in unexpected) else ""
        hint += " (the checkpoint has no u/v for some weights: was it saved from a normalized model?)" if uv else ""
        raise ValueError(
            f"load_spectral_checkpoint: {checkpoint} does not match the model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}{hint}"
        )
    # NB: in place; strict=False only for the tied aliases checked above.
    model.load_state_dict(state, strict=False)
    return model


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are the same tensor as an earlier-named one (save_pretrained drops them)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        else:
            seen[id(p)] = name
    return aliases


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        files = [n for n in names if n.endswith(".safetensors") and n.startswith("model")]
        files = files or [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
        if not files:
            raise FileNotFoundError(
                f"load_spectral_checkpoint: no model.safetensors / pytorch_model.bin in {path!r} (found {names})"
            )
        paths = [os.path.join(path, n) for n in files]
    elif os.path.isfile(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"load_spectral_checkpoint: {path!r} is neither a checkpoint directory nor a file")
    state: dict[str, torch.Tensor] = {}
    for p in paths:
        if p.endswith(".safetensors"):
            from safetensors.torch import load_file

            state.update(load_file(p))
        else:
            state.update(torch.load(p, map_location="cpu", weights_only=True))
    return state


def qwen3_roles(
    w_qk: float = 1.0,
    w_vo: float = 1.0,
    w_mlp: float = 1.0,
    *,
    w_lm_head: float | None = None,
    model=None,
) -> dict[str, float]:
    r"""``{glob pattern: w_max}`` for the weights of an HF Qwen3 / Llama-style decoder.

    Use it as ``constrain(..., w_max=roles)``. The embeddings and ``lm_head`` are not constrained
    by default (``constrain`` leaves them out); with ``w_lm_head`` the head gets its own cap, and
    the patterns double as the selection: pass ``include=list(roles)``. With tied embeddings
    (``tie_word_embeddings=True``) the one shared weight is named ``model.embed_tokens.weight``
    (pass ``model=`` so the head's pattern uses the name ``named_parameters()`` gives it): it is
    then capped as the head matrix (``vocab × hidden``), which rescales embedding rows too.

    Args:
        w_qk: cap of ``q_proj`` and ``k_proj`` (RMS→RMS).
        w_vo: cap of ``v_proj`` and ``o_proj``.
        w_mlp: cap of ``gate_proj``, ``up_proj``, ``down_proj``.
        w_lm_head: cap of the output head, or None to leave it alone.
        model: the HF model, to name a tied head correctly (optional).

    Example::

        >>> roles = qwen3_roles(w_qk=2.0, w_vo=1.0, w_mlp=1.0)
        >>> handle = fx_spectral.constrain(model, muon, "soft_cap", w_max=roles)  # doctest: +SKIP
    """
    for name, value in (("w_qk", w_qk), ("w_vo", w_vo), ("w_mlp", w_mlp), ("w_lm_head", w_lm_head)):
        if value is None and name == "w_lm_head":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"qwen3_roles: {name} must be a number > 0, got {value!r}")
    roles = {
        "*.self_attn.q_proj.weight": w_qk,
        "*.self_attn.k_proj.weight": w_qk,
        "*.self_attn.v_proj.weight": w_vo,
        "*.self_attn.o_proj.weight": w_vo,
        "*.mlp.gate_proj.weight": w_mlp,
        "*.mlp.up_proj.weight": w_mlp,
        "*.mlp.down_proj.weight": w_mlp,
    }
    if w_lm_head is not None:
        roles[_head_name(model)] = w_lm_head
    return {k: float(v) for k, v in roles.items()}


def _head_name(model) -> str:
    head = getattr(model, "get_output_embeddings", lambda: None)() if model is not None else None
    if head is None:
        return "lm_head.weight"
    names = {id(p): n for n, p in model.named_parameters()}
    return names.get(id(head.weight), "lm_head.weight")
