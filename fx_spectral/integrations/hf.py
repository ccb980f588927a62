"""Default roles for Hugging Face transformers decoders (Qwen3, Llama, Mistral naming).

HF decoders name their hidden Linear layers ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` and
``model.layers.{i}.mlp.{gate,up,down}_proj``; ``model.embed_tokens`` and ``lm_head`` are the
embedding and the output head. :func:`qwen3_roles` gives :func:`fx_spectral.constrain` one cap per
role, the split the Lipschitz-transformer paper uses (Q/K, V/O and MLP caps may differ).
"""

from __future__ import annotations

__all__ = ["qwen3_roles"]


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
