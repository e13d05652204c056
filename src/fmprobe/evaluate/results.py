"""What fitting produces and evaluation reads: each head x seed fit's scores per split, the split data, the
segmentation decoders' pixel counts. Plain containers, so evaluation, adaptation and orchestration share them
without depending on each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fmprobe.data.manifest import SPLITS


@dataclass
class SplitData:
    """Sample ids, groups and targets of each split."""

    ids: dict[str, list[str]]
    groups: dict[str, list[str]]
    targets: dict[str, np.ndarray]


@dataclass
class HeadRun:
    """One head trained with one seed: its curves, what was selected, and its scores per split."""

    head: str
    seed: int
    best_epoch: int
    best_val_score: float
    stopped_early: bool
    curves: list[dict]
    scores: dict[str, np.ndarray]  # split -> [n, ...] scores in the task's convention
    thresholds: list[float] | None
    loss_info: dict
    trainable_params: int
    checkpoint_dir: Path | None = None
    fold: int | None = None  # split.mode kfold: which train/val fold (the test set is the same for all)
    data: SplitData | None = None  # the fold's samples; None = the run's one split
    total_params: int | None = None  # backbone + head (+ adapters); set by experiments.params.record_parameters
    last_epoch: int | None = None  # the last epoch training allowed (numbered as best_epoch); None: unknown

    @property
    def member(self) -> str:
        """Label of this (fold, seed) member in metrics.json."""
        return str(self.seed) if self.fold is None else f"fold{self.fold}/seed{self.seed}"


@dataclass
class SegCounts:
    """Per-sample intersections and unions ``[n, K]`` (int64) of the samples ``ids``."""

    ids: list[str]
    inter: np.ndarray
    union: np.ndarray


@dataclass
class SegRun:
    """One decoder and one seed; ``name`` is ``segmentation`` (frozen) or the head it shares a backbone with."""

    name: str
    seed: int
    best_epoch: int
    best_val_miou: float
    stopped_early: bool
    curves: list[dict[str, float]]
    counts: dict[str, SegCounts]  # split -> counts at the chosen epoch
    trainable_params: int
    checkpoint_dir: Path | None = None


@dataclass
class SegResults:
    path: str  # frozen | adapted
    trained: str  # how the decoders were trained, for the report
    runs: list[SegRun]
    baseline: SegCounts  # the location prior on test
    n_with_mask: dict[str, int]
    test_masks: dict[str, np.ndarray] = field(default_factory=dict)  # seed-0 predicted test masks per decoder


@dataclass
class ProbeResults:
    runs: list[HeadRun] = field(default_factory=list)
    standardisation: dict[str, str] = field(default_factory=dict)
    segmentation: SegResults | None = None  # the auxiliary segmentation decoders, when configured


def predictions_table(
    results: ProbeResults,
    split: SplitData,
    score_names: list[str],
    target_names: list[str],
) -> pd.DataFrame:
    """Long table: one row per (head, fold, seed, sample). Everything else can be recomputed from it."""
    frames = []
    for run in results.runs:
        own = run.data or split
        for part in SPLITS:
            n = len(own.ids[part])
            data: dict[str, object] = {
                "sample_id": own.ids[part],
                "split": part,
                "group": own.groups[part],
                "head": run.head,
                "fold": -1 if run.fold is None else run.fold,
                "seed": run.seed,
            }
            y = own.targets[part].reshape(n, -1)
            for j, name in enumerate(target_names):
                data[f"y/{name}"] = y[:, j]
            s = run.scores[part].reshape(n, -1)
            for j, name in enumerate(score_names):
                data[f"p/{name}"] = s[:, j]
            frames.append(pd.DataFrame(data))
    return pd.concat(frames, ignore_index=True)
