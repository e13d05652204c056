"""What identifies a run, and a head within it, for resuming sweeps and for the identical-predictions check.

Settings that only say where things are stored or how fast they are computed (runs and cache folders,
trackers, batch sizes for extraction, worker counts) are left out: changing them must neither re-run a
finished sweep point nor make two runs look differently configured.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fmprobe.config import FITTED_HEADS, Experiment

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


# train: keys of the label-efficiency protocol, which refits heads on subsets but never changes the run's own fits
EFFICIENCY_KEYS = ("shots", "episodes", "trained_episodes", "label_fractions")


def head_hash(exp: Experiment, head: str) -> str:
    """Identity of what one head's predictions depend on: everything but the other heads, the
    experiment's name, the evaluation settings (which read predictions, never change them) and the
    label-efficiency protocol (its refits on labelled subsets leave the run's predictions as they are). A fitted
    head (knn, prototype, logreg) has no SGD training: the train settings do not enter, nor the loss for knn and
    prototype, so a sweep over learning rates does not flag their (rightly) unchanged predictions."""
    data = identity(exp)
    data.pop("name")
    data.pop("eval")
    for key in EFFICIENCY_KEYS:
        data["train"].pop(key)
    data["heads"] = [h for h in data["heads"] if h["name"] == head]
    kind = data["heads"][0]["type"]
    if kind in FITTED_HEADS:
        data.pop("train")
        if kind != "logreg":
            data.pop("loss")
    return _hash(data)


def head_identities(exp: Experiment) -> dict[str, str]:
    return {h.name: head_hash(exp, h.name) for h in exp.heads}


def previous_prediction_hashes(runs_dir: Path, exclude: Path) -> dict[str, tuple[str, str]]:
    """{run/head: (head config hash, test output hash)} of every earlier run under ``runs_dir``."""
    out: dict[str, tuple[str, str]] = {}
    for path in sorted(runs_dir.glob("*/*/metrics.json")):
        if path.parent == exclude:
            continue
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for head, (cfg, out_hash) in m.get("prediction_hashes", {}).items():
            out[f"{path.parent.parent.name}/{path.parent.name}/{head}"] = (cfg, out_hash)
    return out
