"""Segmentation scores: per-class IoU from per-sample counts, mIoU, its group-bootstrap CI and a location prior.

IoU of class c = (sum over samples of intersections) / (sum over samples of unions), pixels counted at the
preprocessed mask resolution; ``miou`` = mean IoU over the foreground classes 1..K-1 (background IoU is listed,
not averaged in; a class absent from both truth and prediction has no IoU and is left out of the mean).
Keeping the counts per sample makes a bootstrap resample one matrix product: ``W [b, n] @ counts [n, K]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fmprobe.evaluate.bootstrap import BootstrapResult, MemberMean, bootstrap_metrics, member_summary
from fmprobe.evaluate.results import SegCounts, SegResults

MIOU_DEFINITION = (
    "IoU per class = summed intersections / summed unions over the samples with a mask (pixels at the "
    "preprocessed mask resolution); miou = mean over the foreground classes 1..K-1 — background IoU is listed "
    "but not in the mean; a class absent from both truth and prediction is left out"
)
BASELINE_DESCRIPTION = (
    "location prior: every pixel predicted as the class most frequent at that pixel position over the training "
    "masks (all background when background dominates everywhere, which gives mIoU 0)"
)


def iou_counts(pred: np.ndarray, true: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Intersections and unions ``[n, K]`` of label maps ``pred``, ``true`` ``[n, H, W]``."""
    n = len(true)
    k = num_classes
    code = (np.arange(n)[:, None] * k * k + true.reshape(n, -1).astype(np.int64) * k
            + pred.reshape(n, -1).astype(np.int64))  # fmt: skip
    confusion = np.bincount(code.ravel(), minlength=n * k * k).reshape(n, k, k)  # [sample, true, pred]
    inter = np.einsum("nkk->nk", confusion)
    union = confusion.sum(axis=2) + confusion.sum(axis=1) - inter
    return inter.astype(np.int64), union.astype(np.int64)


def class_iou(inter: np.ndarray, union: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``[K]`` IoU (``[b, K]`` with resample weights ``[b, n]``); NaN where the class has no union."""
    i, u = (inter.sum(0), union.sum(0)) if weights is None else (weights @ inter, weights @ union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(u > 0, i / np.where(u > 0, u, 1), np.nan)


def _miou(iou: np.ndarray) -> np.ndarray:
    fg = iou[..., 1:]
    ok = ~np.isnan(fg)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok.any(-1), np.where(ok, fg, 0).sum(-1) / ok.sum(-1), np.nan)


def seg_metrics(inter: np.ndarray, union: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """``{"miou", "iou/<class>" for every class}``."""
    iou = class_iou(inter, union)
    return {"miou": float(_miou(iou)), **{f"iou/{name}": float(v) for name, v in zip(class_names, iou)}}


@dataclass(frozen=True)
class SegMetric:
    """``seg_metrics`` as a bootstrap metric: called with (sample ids, ``SegCounts``), resampled by weights."""

    class_names: tuple[str, ...]

    def __call__(self, ids: Any, counts: SegCounts) -> dict[str, float]:
        return seg_metrics(counts.inter, counts.union, list(self.class_names))

    def weighted(self, ids: Any, counts: SegCounts, weights: np.ndarray) -> dict[str, np.ndarray]:
        iou = class_iou(counts.inter, counts.union, weights)
        return {"miou": _miou(iou), **{f"iou/{name}": iou[:, c] for c, name in enumerate(self.class_names)}}


def seed_mean_ci(counts: list[SegCounts], class_names: list[str], *, groups: list[str] | None, n_resamples: int,
                 ci: float, seed: int = 0) -> BootstrapResult:  # fmt: skip
    """(point, lo, hi) of the mean-over-seeds metrics: the CI every head score has (``bootstrap.MemberMean``)."""
    return bootstrap_metrics(MemberMean((SegMetric(tuple(class_names)),)), counts[0].ids, counts, groups=groups,
                             n_resamples=n_resamples, ci=ci, seed=seed)  # fmt: skip


def location_prior(train_masks: np.ndarray, num_classes: int) -> np.ndarray:
    """``[H, W]``: each pixel's most frequent class over the training masks (ties: the lower index)."""
    counts = np.stack([(train_masks == c).sum(0) for c in range(num_classes)])
    return counts.argmax(0)


def summarise_segmentation(seg: SegResults, class_names: list[str], *, test_groups: dict[str, str] | None,
                           n_resamples: int, ci: float) -> dict[str, Any]:  # fmt: skip
    """The ``segmentation`` section of metrics.json: one block per decoder, with the baseline and definitions."""
    decoders: dict[str, Any] = {}
    for name in dict.fromkeys(r.name for r in seg.runs):
        runs = sorted((r for r in seg.runs if r.name == name), key=lambda r: r.seed)
        splits = {}
        for split in runs[0].counts:
            per_seed = [seg_metrics(r.counts[split].inter, r.counts[split].union, class_names) for r in runs]
            values, mean, sd = member_summary(per_seed)
            splits[split] = {"per_seed": values, "mean": mean, "sd": sd}
        test = [r.counts["test"] for r in runs]
        groups = None if test_groups is None else [test_groups[i] for i in test[0].ids]
        test_ci = seed_mean_ci(test, class_names, groups=groups, n_resamples=n_resamples, ci=ci)
        decoders[name] = {
            "members": [str(r.seed) for r in runs],
            "selected_epochs": {str(r.seed): r.best_epoch for r in runs},
            "stopped_early": {str(r.seed): r.stopped_early for r in runs},
            "trainable_params": runs[0].trainable_params,
            "splits": splits,
            "test_ci": {k: [lo, hi] for k, (_, lo, hi) in test_ci.items()},
            "test_ci_used": test_ci.used,
        }
    return {
        "path": seg.path,
        "trained": seg.trained,
        "class_names": class_names,
        "miou_definition": MIOU_DEFINITION,
        "n_with_mask": seg.n_with_mask,
        "bootstrap_unit": "group" if test_groups is not None else "sample",
        "baseline": {"description": BASELINE_DESCRIPTION,
                     "test": seg_metrics(seg.baseline.inter, seg.baseline.union, class_names)},
        "decoders": decoders,
    }
