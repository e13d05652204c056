"""What a tracker receives of a run: the flattened config, the summary numbers, per-epoch series and tags."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from fmprobe.config import Experiment

ARTIFACTS = ("metrics.json", "config.resolved.yaml", "env.json", "report.html", "predictions.parquet", "curves.parquet")


def clean_key(key: str) -> str:
    """Tracker-safe names: letters, digits, ``_ - . / `` and spaces; anything else becomes ``_``."""
    return re.sub(r"[^\w\-./ ]", "_", key)


def flat_params(exp: Experiment) -> dict[str, str]:
    """The resolved config as ``section.key`` -> text (lists as JSON)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        else:
            out[clean_key(prefix[:-1])] = node if isinstance(node, str) else json.dumps(node)

    walk(exp.model_dump(mode="json"), "")
    return out


def summary_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``<split>/<head>/<metric>`` seed means, ``test/<head>/<metric>/ci_lo|ci_hi``, the selected head's
    headline metrics as ``selected/<metric>``, the baseline and the wall time (finite numbers only)."""
    out: dict[str, float] = {}
    best = metrics["selection"]["best_head"]
    for head, h in metrics["heads"].items():
        for split, s in h["splits"].items():
            for name, value in s["mean"].items():
                out[f"{split}/{head}/{name}"] = value
        for name, (lo, hi) in h["test_ci"].items():
            out[f"test/{head}/{name}/ci_lo"] = lo
            out[f"test/{head}/{name}/ci_hi"] = hi
        out[f"{head}/trainable_params"] = h["trainable_params"]
    for name in metrics["task"]["headline_metrics"]:
        value = metrics["heads"][best]["splits"]["test"]["mean"].get(name)
        if value is not None:
            out[f"selected/{name}"] = value
    for name, value in metrics["baseline"]["test"].items():
        out[f"baseline/{name}"] = value
    if "wall_seconds" in metrics:
        out["wall_seconds"] = metrics["wall_seconds"]
    return {clean_key(k): float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def epoch_series(curves: pd.DataFrame) -> list[tuple[str, int, float]]:
    """(``<head>/seed<k>/<column>``, epoch, value) for every per-epoch number in curves.parquet."""
    if curves.empty:
        return []
    cols = [c for c in curves.columns if c not in ("head", "seed", "epoch") and pd.api.types.is_numeric_dtype(curves[c])]
    out = []
    for row in curves.to_dict("records"):
        for col in cols:
            value = row[col]
            if value is not None and math.isfinite(float(value)):
                out.append((clean_key(f"{row['head']}/seed{row['seed']}/{col}"), int(row["epoch"]), float(value)))
    return out


def tags(metrics: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """The run's tags; ``fmprobe.flags`` names its concerns (an info flag such as ``reproduced`` casts no doubt,
    as in every flags column)."""
    return {
        "fmprobe.run_dir": str(run_dir),
        "fmprobe.config_hash": metrics["config_hash"],
        "fmprobe.task": metrics["task"]["type"],
        "fmprobe.selected_head": metrics["selection"]["best_head"],
        "fmprobe.flags": ", ".join(sorted({f["name"] for f in metrics["flags"] if f["severity"] != "info"})) or "none",
    }
