"""What identifies a run, and a head within it, for resuming sweeps and for the identical-predictions check.

Settings that only say where things are stored or how fast they are computed (runs and cache folders,
trackers, batch sizes for extraction, worker counts) are left out: changing them must neither re-run a
finished sweep point nor make two runs look differently configured.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fmprobe.config import Experiment

_NOT_IDENTITY: dict[str, Any] = {
    "runs_dir": True,
    "tracking": True,
    "features": {"cache_dir", "batch_size", "shard_size", "device"},
    "data": {"num_workers"},
}


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(exp: Experiment) -> dict[str, Any]:
    return exp.model_dump(mode="json", exclude=_NOT_IDENTITY)


def config_hash(exp: Experiment) -> str:
    """Identity of what a run computes."""
    return _hash(identity(exp))


# 2: a head's identity is what changes its predictions: not its name, the experiment's name, evaluation settings,
# the other extracted layers, whether tokens are stored, or (frozen) the separate segmentation decoder.
IDENTITY_VERSION = 2


def head_hash(exp: Experiment, head: str) -> str:
    """Identity of what one head's predictions depend on. Left out: the other heads and the head's own name,
    the experiment's name, the evaluation settings (which read predictions, never change them), the other
    extracted layers and whether tokens are stored (the head reads its own layer's features either way), and
    for frozen runs the segmentation decoder (trained apart, on its own). The same head re-run by
    ``fmprobe layers`` or under another name is then the same configuration: equal outputs reproduce it."""
    data = identity(exp)
    for key in ("name", "eval", "heads"):
        data.pop(key)
    cfg = next(h for h in exp.heads if h.name == head)
    data["head"] = cfg.model_dump(mode="json", exclude={"name"})
    data["model"]["layers"] = [cfg.layer]
    data["features"].pop("store_tokens")
    if exp.adapt.strategy == "frozen":
        data.pop("segmentation")
        data["data"].pop("mask_column")
    return _hash(data)


def head_identities(exp: Experiment) -> dict[str, str]:
    return {h.name: head_hash(exp, h.name) for h in exp.heads}
