"""Attentive probe on tokens: learned queries cross-attend over the backbone's tokens (after vjepa2's pooler).

One block: queries attend to layer-normed tokens (residual), then a pre-norm MLP (residual), then a linear
readout. With ``query_per_class`` there is one query per output and each query has its own linear readout to
one logit, so every class pools its own tokens and its attention map can be inspected per class. Otherwise the
``num_queries`` pooled vectors are concatenated and read out by one linear layer. ``hidden`` is the MLP width;
``dropout`` applies inside the MLP (never to the attention weights, which diagnostics read).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fmprobe.errors import ConfigError


class QueryAttention(nn.Module):
    """Multi-head cross-attention from a few learned queries to many tokens, computed in the cheap order.

    Same function as ``nn.MultiheadAttention(q, x, x)`` (a test checks it), but the key projection is folded
    into the queries (``q·W_k x = (W_kᵀ q)·x``; the key bias shifts every logit of a query equally and cancels
    in the softmax) and the value projection is applied after pooling (attention rows sum to 1). Per sample
    that costs ``O(N·D·Q·heads)`` instead of ``O(N·D²)``: for one query and 8 heads over 384-d tokens, ~50x
    fewer operations, which is what makes training attentive probes on CPU practical.

    ``affine`` (a LayerNorm's scale and shift) makes it attend over ``tokens·scale + shift`` without forming
    them: the scale folds into the keys' direction, the shift's logit is the same for every token (it cancels in
    the softmax) and is added to the pooled vector after pooling. On cached features the normalised tokens then
    need no gradient, which saves the backward passes over every token (~1.4x per training step).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.out_proj.reset_parameters()
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor,
                affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D], tokens [B, N, D] (attended as ``tokens·scale + shift`` with ``affine = (scale, shift)``,
        both [D]) -> (output [B, Q, D], attention weights [B, heads, Q, N])."""
        h, dh = self.num_heads, self.head_dim
        b, n, dim = tokens.shape
        q = self.q_proj(queries).view(-1, h, dh) / math.sqrt(dh)  # [Q, h, dh]
        folded = torch.einsum("qhd,hdD->qhD", q, self.k_proj.weight.view(h, dh, dim)).reshape(-1, dim)  # [Q*h, D]
        if affine is not None:
            folded = folded * affine[0]
        # every token against every (query, head) in one matrix product over the batch's B*N tokens
        logits = (tokens.reshape(b * n, dim) @ folded.t()).view(b, n, -1).transpose(1, 2)  # [B, Q*h, N]
        weights = logits.softmax(dim=-1)
        pooled = torch.bmm(weights, tokens)  # [B, Q*h, D]
        if affine is not None:
            pooled = pooled * affine[0] + affine[1]  # attention rows sum to 1
        pooled = pooled.view(b, -1, h, dim)  # [B, Q, h, D]
        values = torch.einsum("bqhD,hdD->bqhd", pooled, self.v_proj.weight.view(h, dh, dim))
        values = values + self.v_proj.bias.view(h, dh)
        return self.out_proj(values.flatten(2)), weights.view(b, -1, h, n).transpose(1, 2)


class AttentiveHead(nn.Module):
    """Cross-attention pooler + readout; ``last_attention`` holds the last forward's weights [B, heads, Q, N]."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        num_heads: int,
        num_queries: int,
        query_per_class: bool,
        hidden: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        if in_dim % num_heads:
            raise ConfigError(
                f"attentive head: num_heads={num_heads} must divide the feature dimension {in_dim}; "
                f"choose one of {[h for h in range(1, min(in_dim, 64) + 1) if in_dim % h == 0]}"
            )
        if query_per_class and num_queries != 1:
            raise ConfigError(
                "attentive head: num_queries cannot be set together with query_per_class "
                "(query_per_class uses one query per output); set one of them"
            )
        self.query_per_class = query_per_class
        n_queries = out_dim if query_per_class else num_queries
        self.queries = nn.Parameter(torch.empty(n_queries, in_dim))
        self.norm_tokens = nn.LayerNorm(in_dim)
        self.attn = QueryAttention(in_dim, num_heads)
        self.norm_mlp = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, in_dim), nn.Dropout(dropout)
        )
        if query_per_class:
            self.readout_weight = nn.Parameter(torch.empty(n_queries, in_dim))
            self.readout_bias = nn.Parameter(torch.empty(n_queries))
        else:
            self.readout = nn.Linear(n_queries * in_dim, out_dim)
        self.last_attention: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.norm_tokens.reset_parameters()
        self.norm_mlp.reset_parameters()
        self.attn.reset_parameters()
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        if self.query_per_class:
            bound = 1 / math.sqrt(self.readout_weight.shape[1])  # nn.Linear's default init, per query
            nn.init.uniform_(self.readout_weight, -bound, bound)
            nn.init.uniform_(self.readout_bias, -bound, bound)
        else:
            self.readout.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise ValueError(
                f"attentive head takes token features [B, N, D], got shape {tuple(tokens.shape)}; "
                "pooled features go to a linear or mlp head"
            )
        norm = self.norm_tokens  # its affine is folded into the attention (QueryAttention's ``affine``)
        # an identity affine, given: torch's CPU layer_norm without one takes twice as long
        unit = tokens.new_ones(norm.normalized_shape), tokens.new_zeros(norm.normalized_shape)
        normed = nn.functional.layer_norm(tokens, norm.normalized_shape, *unit, eps=norm.eps)
        attended, weights = self.attn(self.queries, normed, (norm.weight, norm.bias))
        self.last_attention = weights.detach()
        x = self.queries + attended
        x = x + self.mlp(self.norm_mlp(x))
        if self.query_per_class:
            return (x * self.readout_weight).sum(-1) + self.readout_bias
        return self.readout(x.flatten(1))
