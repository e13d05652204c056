"""Probe heads on cached features: linear and MLP on pooled [B, D], attentive pooler on tokens [B, N, D].

Every head emits raw logits [B, out_dim] and has ``reset_parameters()`` so the trainer can re-initialise it
from each seed.
"""

from __future__ import annotations

from torch import nn

from fmprobe.config import FITTED_HEADS, HeadConfig
from fmprobe.errors import ConfigError
from fmprobe.heads.attentive import AttentiveHead
from fmprobe.heads.linear import LinearHead
from fmprobe.heads.mlp import MLPHead

# HeadConfig keys each head type honours; setting any other (away from its default) is an error, not ignored.
_KEYS_USED = {
    "linear": {"dropout"},
    "mlp": {"hidden", "dropout"},
    "attentive": {"hidden", "dropout", "num_heads", "num_queries", "query_per_class"},
    "knn": {"k", "temperature"},
    "prototype": set(),
    "logreg": {"C"},
}
_TUNABLE = ("hidden", "dropout", "num_heads", "num_queries", "query_per_class", "k", "temperature", "C")


def check_head_keys(cfg: HeadConfig) -> None:
    """Refuse a key set on a head type that does not use it."""
    for key in _TUNABLE:
        if key not in _KEYS_USED[cfg.type] and getattr(cfg, key) != HeadConfig.model_fields[key].get_default(
                call_default_factory=True):  # fmt: skip
            users = [t for t, keys in _KEYS_USED.items() if key in keys]
            raise ConfigError(
                f"head '{cfg.name}': key '{key}' does not apply to a {cfg.type} head (only to {', '.join(users)}); "
                "remove it or change the head type"
            )


def build_head(cfg: HeadConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The head ``cfg`` describes, for features of width ``in_dim`` and ``out_dim`` logits."""
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"head '{cfg.name}': in_dim and out_dim must be positive, got {in_dim}, {out_dim}")
    check_head_keys(cfg)
    if cfg.type in FITTED_HEADS:
        raise ConfigError(f"head '{cfg.name}': a {cfg.type} head is fitted on cached features (fmprobe.probes), "
                          "not built as a trained module")  # fmt: skip
    if cfg.type == "linear":
        return LinearHead(in_dim, out_dim, dropout=cfg.dropout)
    if cfg.type == "mlp":
        return MLPHead(in_dim, out_dim, hidden=cfg.hidden, dropout=cfg.dropout)
    return AttentiveHead(
        in_dim,
        out_dim,
        num_heads=cfg.num_heads,
        num_queries=cfg.num_queries,
        query_per_class=cfg.query_per_class,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
    )


__all__ = ["AttentiveHead", "LinearHead", "MLPHead", "build_head", "check_head_keys"]
