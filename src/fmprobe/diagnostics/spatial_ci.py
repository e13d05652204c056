"""Bootstrap CIs of the spatial probes' test scores (box IoU, mask IoU, AP@0.5), resampling test samples.

A probe is trained once; its test predictions are fixed, so the interval says how much the score depends on
which test images were drawn (what a gate must know before calling 0.62 "above 0.60"). Clip slices of one
sample are drawn together (cluster bootstrap). AP is recomputed on each resample from the per-image matches
(:func:`fmprobe.diagnostics.spatial.match_detections`), which is exactly AP on the repeated images, because
matching happens within an image and only the ranking spans images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fmprobe.diagnostics.spatial import matched_average_precision
from fmprobe.errors import FmprobeError
from fmprobe.evaluate.bootstrap import interval, resample_weights

METRICS = ("box_iou", "mask_iou", "map50")


def spatial_intervals(
    per_image: Mapping[str, Any], slices_per_sample: int, *, n_resamples: int = 1000, ci: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """``{metric: [lo, hi]}`` from ``run_spatial_probes``' ``per_image`` (sample-major slices): the interval every
    fmprobe CI is (``evaluate.bootstrap.interval``, over the samples drawn)."""
    if not 0 < ci < 1:
        raise FmprobeError(f"ci must be in (0, 1), got {ci}")
    if n_resamples < 1:
        raise FmprobeError(f"n_resamples must be >= 1, got {n_resamples}")
    box, mask = np.asarray(per_image["box_iou"]), np.asarray(per_image["mask_iou"])
    matches = [(np.asarray(s, dtype=np.float64), np.asarray(t, dtype=bool)) for s, t in per_image["ap_matches"]]
    n_gt = np.asarray(per_image["n_gt"])
    m = len(box)
    if not (len(mask) == len(matches) == len(n_gt) == m) or m % slices_per_sample:
        raise FmprobeError(
            f"per-image results do not line up: {m} box, {len(mask)} mask, {len(matches)} detection and "
            f"{len(n_gt)} ground-truth entries for {slices_per_sample} slice(s) per sample"
        )
    groups = np.arange(m) // slices_per_sample
    draws: dict[str, list[float]] = {k: [] for k in METRICS}
    for weights in resample_weights(m, groups=groups, n_resamples=n_resamples, seed=seed):
        for w in weights:
            idx = np.repeat(np.arange(m), w.astype(np.int64))
            draws["box_iou"].append(float(box[idx].mean()))
            draws["mask_iou"].append(float(mask[idx].mean()))
            draws["map50"].append(matched_average_precision([matches[i] for i in idx], n_gt[idx]))
    points = {"box_iou": float(box.mean()), "mask_iou": float(mask.mean()),
              "map50": matched_average_precision(matches, n_gt)}  # fmt: skip
    units = m // slices_per_sample
    return {k: list(interval(np.asarray(d), points[k], ci=ci, units=units)[1:]) for k, d in draws.items()}
