"""Bootstrap CIs of per-image test scores (box / mask IoU, AP@0.5 of the spatial probes; LPIPS, SSIM, edge F1,
spatial IoU, AP@0.5 of reconstructions), resampling test samples — alone, or paired against a control.

A probe is trained once; its test predictions are fixed, so the interval says how much the score depends on
which test images were drawn (what a gate must know before calling 0.62 "above 0.60"). Clip slices of one
sample are drawn together (cluster bootstrap). Every score but AP is a mean over images; AP is recomputed on each
resample from the per-image matches (:func:`fmprobe.diagnostics.spatial.match_detections`), which is exactly AP on
the repeated images, because matching happens within an image and only the ranking spans images.

Paired: two sets of per-image scores on the same test images (a point and a control) are resampled with the same
draws, so image difficulty cancels in the difference (p-value as in :func:`fmprobe.evaluate.compare.paired_bootstrap`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fmprobe.diagnostics.spatial import matched_average_precision
from fmprobe.errors import FmprobeError
from fmprobe.evaluate.bootstrap import interval, p_value, resample_weights

METRICS = ("box_iou", "mask_iou", "map50")
_AP_PARTS = ("ap_matches", "n_gt")


class _Scores:
    """Per-image scores of one model: means over images, and AP from the matches when present."""

    def __init__(self, per_image: Mapping[str, Any]):
        self.means = {k: np.asarray(v, dtype=np.float64) for k, v in per_image.items() if k not in _AP_PARTS}
        self.matches = None
        if "ap_matches" in per_image:
            self.matches = [(np.asarray(s, dtype=np.float64), np.asarray(t, dtype=bool))
                            for s, t in per_image["ap_matches"]]  # fmt: skip
            self.n_gt = np.asarray(per_image["n_gt"])
        sizes = {len(v) for v in self.means.values()} | ({len(self.matches), len(self.n_gt)} if self.matches is not None else set())
        if len(sizes) != 1:
            raise FmprobeError(f"per-image results do not line up: lengths {sorted(sizes)} across {list(per_image)}")
        self.n = sizes.pop()

    @property
    def names(self) -> list[str]:
        return list(self.means) + (["map50"] if self.matches is not None else [])

    def values(self, idx: np.ndarray) -> dict[str, float]:
        out = {k: float(v[idx].mean()) for k, v in self.means.items()}
        if self.matches is not None:
            out["map50"] = matched_average_precision([self.matches[i] for i in idx], self.n_gt[idx])
        return out


def _resamples(n: int, slices_per_sample: int, n_resamples: int, ci: float, seed: int) -> Iterator[np.ndarray]:
    if not 0 < ci < 1:
        raise FmprobeError(f"ci must be in (0, 1), got {ci}")
    if n_resamples < 1:
        raise FmprobeError(f"n_resamples must be >= 1, got {n_resamples}")
    if n % slices_per_sample:
        raise FmprobeError(f"{n} per-image results do not split into samples of {slices_per_sample} slice(s)")
    for weights in resample_weights(n, groups=np.arange(n) // slices_per_sample, n_resamples=n_resamples, seed=seed):
        for w in weights:
            yield np.repeat(np.arange(n), w.astype(np.int64))


def spatial_intervals(
    per_image: Mapping[str, Any], slices_per_sample: int, *, n_resamples: int = 1000, ci: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """``{metric: [lo, hi]}`` of every per-image score (and AP) in ``per_image`` (sample-major slices): the interval
    every fmprobe CI is (``evaluate.bootstrap.interval``, over the samples drawn)."""
    scores = _Scores(per_image)
    draws: dict[str, list[float]] = {k: [] for k in scores.names}
    for idx in _resamples(scores.n, slices_per_sample, n_resamples, ci, seed):
        for k, v in scores.values(idx).items():
            draws[k].append(v)
    points, units = scores.values(np.arange(scores.n)), scores.n // slices_per_sample
    return {k: list(interval(np.asarray(d), points[k], ci=ci, units=units)[1:]) for k, d in draws.items()}


def paired_differences(
    per_a: Mapping[str, Any], per_b: Mapping[str, Any], slices_per_sample: int, *, n_resamples: int = 1000,
    ci: float = 0.95, seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{metric: {diff, lo, hi, p_value}}``: A minus B for every score both have, on the same test images."""
    a, b = _Scores(per_a), _Scores(per_b)
    if a.n != b.n:
        raise FmprobeError(f"paired scores need the same test images; got {a.n} and {b.n} per-image results")
    names = [k for k in a.names if k in b.names]
    everything = np.arange(a.n)
    point = {k: a.values(everything)[k] - b.values(everything)[k] for k in names}
    diffs: dict[str, list[float]] = {k: [] for k in names}
    for idx in _resamples(a.n, slices_per_sample, n_resamples, ci, seed):
        va, vb = a.values(idx), b.values(idx)
        for k in names:
            diffs[k].append(va[k] - vb[k])
    units = a.n // slices_per_sample
    out = {}
    for k, d in diffs.items():
        _, lo, hi = interval(np.asarray(d), point[k], ci=ci, units=units)
        out[k] = {"diff": float(point[k]), "lo": lo, "hi": hi, "p_value": p_value(np.asarray(d), units=units)}
    return out


def ratio_interval(hits: Any, counts: Any, *, n_resamples: int = 1000, ci: float = 0.95, seed: int = 0) -> list[float]:
    """``[lo, hi]`` percentile CI of sum(hits) / sum(counts), resampling samples (e.g. clips with their objects)."""
    hits, counts = np.asarray(hits, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    values = [float(hits[idx].sum() / counts[idx].sum()) for idx in _resamples(len(hits), 1, n_resamples, ci, seed)
              if counts[idx].sum() > 0]  # fmt: skip
    point = float(hits.sum() / counts.sum()) if counts.sum() > 0 else float("nan")
    return list(interval(np.asarray(values), point, ci=ci, units=len(hits))[1:])
