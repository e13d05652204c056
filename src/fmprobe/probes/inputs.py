"""What a probe reads from the feature cache: pooled vectors z-scored on train, or tokens as stored."""

from __future__ import annotations

import numpy as np
import torch

from fmprobe.config import HeadConfig
from fmprobe.features.store import FeatureSet

STANDARDISED = "z-score with training-split mean/std"  # how pooled head inputs are recorded in metrics.json


def head_inputs(features: FeatureSet, head: HeadConfig) -> np.ndarray:
    """Pooled vectors for linear/MLP heads, patch tokens for the attentive pooler."""
    layer = str(head.layer)
    if head.pooling == "attentive":
        return np.asarray(features.tokens(layer))
    return features.pooled(layer, head.pooling)


def standardise(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Z-score pooled features with statistics of the training split only (no test information leaks in)."""
    mean = x["train"].mean(axis=0, keepdims=True)
    std = x["train"].std(axis=0, keepdims=True) + 1e-6
    return {k: ((v - mean) / std).astype(np.float32) for k, v in x.items()}


def head_tensors(features: FeatureSet, split_ids: dict[str, list[str]], head_cfg: HeadConfig
                 ) -> dict[str, torch.Tensor]:  # fmt: skip
    """A head's inputs per split: pooled vectors z-scored on train (``STANDARDISED``), tokens as stored."""
    raw = {s: head_inputs(features.subset(ids), head_cfg) for s, ids in split_ids.items()}
    if head_cfg.pooling != "attentive":
        raw = standardise(raw)
    return {s: torch.from_numpy(np.ascontiguousarray(v)) for s, v in raw.items()}
