"""A small paper-style Lipschitz transformer (arXiv 2507.13338).

The architecture is chosen so that a Lipschitz bound can be read off the weights
(see :func:`fx_spectral.lipschitz.lipschitz_bound`):

* no LayerNorm, no QK-norm, no biases;
* token embedding rows capped in l2 norm by ``embed_max_norm`` (``nn.Embedding(max_norm=...)``
  renormalizes each looked-up row before use), so every input token has ``||x_i||_2 <= r``;
* rotary position embeddings on queries and keys (a rotation per position: norm preserving) and a
  learned per-head bias on the logits by relative distance (ALiBi-like, initialized to
  ``-slope_h * (i - j)``): it does not depend on the input, so it costs nothing in the bound, and it
  lets heads attend sharply to nearby tokens, which the ``1/d_head`` logits alone cannot afford;
* attention logits scaled by ``1/d_head`` (not ``1/sqrt(d_head)``);
* the MLP activation is ``GELU(x) / 1.1289`` (1.1289 is GELU's largest slope, so the scaled
  activation is 1-Lipschitz and ``|act(x)| <= |x|``);
* residual connections are convex combinations, ``x <- (1 - 1/(2L)) x + (1/(2L)) block(x)``,
  with ``L`` the number of layers (so ``2L`` sub-blocks in all);
* optionally (``attn_input_radius=R``) every token is projected onto the l2 ball of radius ``R``
  before each attention, ``x_i -> x_i min(1, R / ||x_i||_2)`` (:func:`ball_project`): a projection
  onto a convex set is 1-Lipschitz, so it costs nothing in the bound, and the attention's softmax
  term (which grows with the square of its input radius) stays at ``R`` however the residual
  stream grows with depth;
* a bias-free LM head.

Example::

    >>> cfg = LipschitzTransformerConfig(vocab_size=98, dim=64, n_layers=2, n_heads=2)
    >>> model = LipschitzTransformer(cfg)
    >>> logits = model(torch.randint(0, 98, (4, 32)))   # (batch, seq, vocab)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GELU_LIPSCHITZ",
    "Attention",
    "Block",
    "LipschitzTransformer",
    "LipschitzTransformerConfig",
    "MLP",
    "ScaledGELU",
    "ball_project",
]

#: The largest slope of GELU, ``Phi(sqrt 2) + sqrt 2 * phi(sqrt 2)`` (exact GELU, not tanh).
GELU_LIPSCHITZ = 1.1289


@dataclass(frozen=True, kw_only=True)
class LipschitzTransformerConfig:
    """Shape of a :class:`LipschitzTransformer`.

    Args:
        vocab_size: number of tokens.
        dim: model width ``d``.
        n_layers: number of blocks ``L`` (each is attention then MLP, ``2L`` residual sub-blocks).
        n_heads: attention heads; ``dim`` must be divisible by it.
        mlp_ratio: hidden width of the MLP is ``mlp_ratio * dim``.
        max_seq_len: longest sequence (rotary tables are built for it).
        embed_max_norm: l2 cap of every embedding row, i.e. the input radius ``r`` the Lipschitz
            bound is certified for. ``None`` leaves the rows free (no certificate then).
        rope_base: base of the rotary frequencies.
        attn_input_radius: ``R``: each attention sees its input tokens projected onto the l2 ball
            of radius ``R`` (the residual stream itself is not projected). ``None``: no projection.
    """

    vocab_size: int
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 2
    mlp_ratio: int = 4
    max_seq_len: int = 256
    embed_max_norm: float | None = 1.0
    rope_base: float = 10000.0
    attn_input_radius: float | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "mlp_ratio", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LipschitzTransformerConfig.{name}: expected a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LipschitzTransformerConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"LipschitzTransformerConfig: head dim {self.dim // self.n_heads} must be even for rotary embeddings"
            )
        if self.embed_max_norm is not None and not self.embed_max_norm > 0:
            raise ValueError(
                f"LipschitzTransformerConfig.embed_max_norm: expected > 0 or None, got {self.embed_max_norm!r}"
            )
        r = self.attn_input_radius
        if r is not None and not (isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < math.inf):
            raise ValueError(
                f"LipschitzTransformerConfig.attn_input_radius: expected a finite float > 0 or None, got {r!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def residual_weight(self) -> float:
        """``a = 1/(2L)``: weight of a sub-block in its residual convex combination."""
        return 1.0 / (2 * self.n_layers)


class ScaledGELU(nn.Module):
    """``GELU(x) / 1.1289``: 1-Lipschitz and ``|f(x)| <= |x|``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x) / GELU_LIPSCHITZ


def ball_project(x: torch.Tensor, radius: float) -> torch.Tensor:
    r"""Project every row (token) of ``x`` onto the l2 ball of radius ``radius``.

    :math:`x_i \mapsto x_i \min(1, R / \lVert x_i\rVert_2)`: the Euclidean projection onto a
    convex set, so 1-Lipschitz per token (and in the norm :math:`\max_i \lVert x_i\rVert_2`).
    Rows already inside are returned unchanged; a zero row stays zero.

    Example::

        >>> ball_project(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0)  # rows (0.6, 0.8), (0.3, 0.4)
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * (radius / norm.clamp_min(radius))


def _rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, dh/2)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, dh); pairs (x[2i], x[2i+1]) are rotated by the position's angle (an isometry).
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    """Causal multi-head attention, logits ``q_i.k_j / d_head + pos_bias[h, i - j]``, rotary q/k."""

    def __init__(self, cfg: LipschitzTransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        cos, sin = _rotary_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        slopes = 2.0 ** (-2.0 * torch.arange(cfg.n_heads, dtype=torch.float32))
        self.pos_bias = nn.Parameter(-slopes[:, None] * torch.arange(cfg.max_seq_len, dtype=torch.float32))

    def _logit_bias(self, T: int, dtype: torch.dtype) -> torch.Tensor:
        """(H, T, T): ``pos_bias[h, i - j]`` where ``j <= i``, ``-inf`` above the diagonal."""
        i = torch.arange(T, device=self.pos_bias.device)
        dist = i[:, None] - i[None, :]
        bias = self.pos_bias[:, dist.clamp(min=0)].to(dtype)
        return bias.masked_fill(dist < 0, float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        bias = self._logit_bias(T, q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / self.head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """``fc_out(GELU(fc_in(x)) / 1.1289)``, no biases."""

    def __init__(self, cfg: LipschitzTransformerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim, bias=False)
        self.act = ScaledGELU()
        self.fc_out = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    """``x <- (1-a) x + a attn(P_R(x))`` then ``x <- (1-a) x + a mlp(x)`` with ``a = 1/(2L)``.

    ``P_R`` is :func:`ball_project` with ``R = attn_input_radius`` (the identity when ``None``).
    """

    def __init__(self, cfg: LipschitzTransformerConfig) -> None:
        super().__init__()
        self.a = cfg.residual_weight
        self.attn_input_radius = cfg.attn_input_radius
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.attn_input_radius is None else ball_project(x, self.attn_input_radius)
        x = (1 - self.a) * x + self.a * self.attn(h)
        return (1 - self.a) * x + self.a * self.mlp(x)


class LipschitzTransformer(nn.Module):
    """Paper-style transformer: ``logits = lm_head(blocks(embed(tokens)))``.

    :meth:`forward_embeddings` runs the network on already-embedded inputs ``(B, T, dim)``; that
    map is the one :func:`fx_spectral.lipschitz.lipschitz_bound` certifies (for inputs whose rows
    have l2 norm at most ``embed_max_norm``).
    """

    def __init__(self, cfg: LipschitzTransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim, max_norm=cfg.embed_max_norm)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Orthogonal hidden weights (every singular value 1 in RMS->RMS units), small head,
        embedding rows drawn on the sphere of radius ``embed_max_norm`` (or unit RMS)."""
        cfg = self.config
        for block in self.layers:
            for lin in (block.attn.wq, block.attn.wk, block.attn.wv, block.attn.wo, block.mlp.fc_in, block.mlp.fc_out):
                nn.init.orthogonal_(lin.weight)
                out_f, in_f = lin.weight.shape
                lin.weight.mul_(math.sqrt(out_f / in_f))  # l2 norm sqrt(out/in) == RMS->RMS norm 1
        radius = cfg.embed_max_norm if cfg.embed_max_norm is not None else math.sqrt(cfg.dim)
        emb = torch.randn_like(self.tok_emb.weight)
        self.tok_emb.weight.copy_(emb * (radius / emb.norm(dim=1, keepdim=True)))
        nn.init.normal_(self.lm_head.weight, std=1.0 / cfg.dim)

    def forward_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks and head on embedded inputs ``x`` of shape ``(B, T, dim)``."""
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_embeddings(self.tok_emb(tokens))
