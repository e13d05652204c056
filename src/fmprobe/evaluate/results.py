"""What fitting produces and evaluation reads: each head x seed fit's scores per split, the split data, the
segmentation decoders' pixel counts. Plain containers, so evaluation, adaptation and orchestration share them
without depending on each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """One head trained (or fitted) with one seed: its curves, what was selected, and its scores per split.

    A trained head selects its best epoch (``best_epoch``, with ``curves``); a fitted head (knn, prototype, logreg)
    has no epochs (``best_epoch`` None, no curves) and records in ``selected`` the hyperparameter chosen on
    validation and the validation primary metric of every value tried."""

    head: str
    seed: int
    best_epoch: int | None
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
    selected: dict[str, Any] | None = None  # fitted heads: {"k": 20, "validation": {"10": 0.81, ...}} (or "C")
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
class EfficiencyPoint:
    """One head at one label budget: K labelled examples per class (``protocol`` "shots", repeated over episodes)
    or a share of the training groups (``protocol`` "fraction", repeated over seeds). Each run's ``data`` holds
    its labelled training subset (validation and test are the run's own). ``missing`` says why the budget could
    not be fitted (a class without enough groups, a share too small to hold every class); then ``runs`` is empty."""

    protocol: str
    value: float
    head: str
    runs: list[HeadRun]
    missing: str | None = None


@dataclass
class ProbeResults:
    runs: list[HeadRun] = field(default_factory=list)
    standardisation: dict[str, str] = field(default_factory=dict)
    segmentation: SegResults | None = None  # the auxiliary segmentation decoders, when configured
    training_inputs: list[dict] = field(default_factory=list)  # what each stage trained on (inputs, augmentation)
    efficiency: list[EfficiencyPoint] = field(default_factory=list)  # train.shots / train.label_fractions


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
