"""Is one extraction point really better than another at holding boxes and masks? (`fmprobe compare-points`)

Every point of one `fmprobe spatial` run is probed on the same test shapes, so two points are compared pairwise:
the difference of their mean box / mask IoU over the test images, with a paired bootstrap CI and p-value
(evaluate.compare.paired_bootstrap; the clip slices of one sample are drawn together). Sample difficulty cancels,
so the interval of the difference is much narrower than the two points' own CIs suggest. The case it was made for:
LLaVA-NeXT's AnyRes tiles view against its base view of the same layer (``-2@tiles`` vs ``-2@base``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fmprobe.atomic import write_json
from fmprobe.diagnostics.outputs import read_output
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.evaluate.compare import paired_bootstrap

PAIRED_METRICS = ("box_iou", "mask_iou")


class MeanScore:
    """The mean of per-image scores, also over many resamples at once (a WeightedMetric)."""

    def __call__(self, y_true: Any, y_score: Any) -> float:
        return float(np.mean(y_score))

    def weighted(self, y_true: Any, y_score: Any, weights: np.ndarray) -> np.ndarray:
        return weights @ np.asarray(y_score, dtype=np.float64) / weights.sum(axis=1)


def compare_points(spatial: dict[str, Any], a: str, b: str, *, n_resamples: int = 2000, ci: float = 0.95,
                   seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """``metric(a) - metric(b)`` for box and mask IoU of two points of one spatial.json, with paired CIs."""
    rows = {r["layer"]: r for r in spatial["results"]}
    for point in (a, b):
        if point not in rows:
            raise ConfigError(f"'{point}' is not a point of {spatial['encoder']}'s spatial.json; it has: "
                              f"{', '.join(rows)}")  # fmt: skip
        if "per_image" not in rows[point]:
            raise FmprobeError(f"'{point}' has no per-image scores (spatial.json from an older fmprobe); rerun spatial")
    frames = spatial.get("frames") or 1
    groups = np.arange(len(rows[a]["per_image"]["box_iou"])) // frames
    result: dict[str, Any] = {"encoder": spatial["encoder"], "model": spatial.get("model") or spatial["encoder"],
                              "a": a, "b": b, "frames": spatial.get("frames"), "n_test": spatial["n_test"],
                              "n_resamples": n_resamples, "ci_level": ci, "metrics": {}}  # fmt: skip
    for metric in PAIRED_METRICS:
        score_a, score_b = (np.asarray(rows[p]["per_image"][metric], dtype=np.float64) for p in (a, b))
        if score_a.shape != score_b.shape:
            raise FmprobeError(f"'{a}' and '{b}' were scored on different test images ({len(score_a)} vs {len(score_b)})")
        result["metrics"][metric] = paired_bootstrap(MeanScore(), np.zeros(len(score_a)), score_a, score_b,
                                                     groups=groups, n_resamples=n_resamples, ci=ci, seed=seed)
    return result


def pair_command(spatial: str | Path, a: str, b: str, *, out: str | Path = "fmprobe-compare-points",
                 n_resamples: int = 2000, ci: float = 0.95, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Compare two points of a spatial.json (the file or its folder); write ``pair.json`` to ``out``; return it."""
    result = compare_points(read_output(spatial, "spatial.json"), a, b, n_resamples=n_resamples, ci=ci, seed=seed)
    write_json(Path(out) / "pair.json", result)
    return result
