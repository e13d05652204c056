"""Train every configured head, for every seed, on cached features, and predict every split.

Selection discipline: the best epoch and the decision thresholds are chosen on validation only; train,
validation and test are then predicted once with the chosen weights. Each seed changes head init, data
order and sampling; every seed's predictions are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmprobe.config import Experiment, HeadConfig
from fmprobe.evaluate.bootstrap import TaskMetric
from fmprobe.evaluate.metrics import higher_is_better
from fmprobe.evaluate.segmentation import SegResults
from fmprobe.evaluate.thresholds import tune_thresholds
from fmprobe.features.store import FeatureSet
from fmprobe.heads import build_head
from fmprobe.train.losses import build_loss
from fmprobe.train.trainer import HeadData, TrainResult, predict, train_head

SPLITS = ("train", "val", "test")


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

    @property
    def member(self) -> str:
        """Label of this (fold, seed) member in metrics.json."""
        return str(self.seed) if self.fold is None else f"fold{self.fold}/seed{self.seed}"


@dataclass
class ProbeResults:
    runs: list[HeadRun] = field(default_factory=list)
    standardisation: dict[str, str] = field(default_factory=dict)
    segmentation: SegResults | None = None  # the auxiliary segmentation decoders, when configured


def output_dim(exp: Experiment, class_names: list[str] | None) -> int:
    task = exp.task
    if task.type == "binary":
        return 1
    if task.type == "multiclass":
        assert class_names is not None
        return len(class_names)
    return len(task.targets)


def head_inputs(features: FeatureSet, head: HeadConfig) -> np.ndarray:
    """Pooled vectors for linear/MLP heads, patch tokens for the attentive pooler."""
    layer = str(head.layer)
    if head.pooling == "attentive":
        return np.asarray(features.tokens(layer))
    return features.pooled(layer, head.pooling)


def _standardise(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Z-score pooled features with statistics of the training split only (no test information leaks in)."""
    mean = x["train"].mean(axis=0, keepdims=True)
    std = x["train"].std(axis=0, keepdims=True) + 1e-6
    return {k: ((v - mean) / std).astype(np.float32) for k, v in x.items()}


@dataclass
class FitTargets:
    """What heads are fitted to, and how an epoch's outputs are scored.

    Regression heads fit standardised targets (training mean/std) and answer in the original units;
    classification targets pass through unchanged. Scoring uses the vectorised metrics (tested equal
    to scikit-learn's) because it runs every epoch.
    """

    targets: dict[str, np.ndarray]
    shift: np.ndarray | float
    scale: np.ndarray | float
    metric: TaskMetric

    @classmethod
    def for_task(cls, exp: Experiment, targets: dict[str, np.ndarray], class_names: list[str] | None,
                 results: ProbeResults) -> "FitTargets":
        task = exp.task
        shift, scale = 0.0, 1.0
        if task.type == "regression":
            shift = targets["train"].mean(axis=0)
            scale = targets["train"].std(axis=0) + 1e-12
            results.standardisation["targets"] = "z-score with training-split mean/std; outputs mapped back"
        label_names = class_names if task.type == "multiclass" else task.targets
        return cls(
            targets={s: ((y - shift) / scale).astype(y.dtype) for s, y in targets.items()},
            shift=shift, scale=scale,
            metric=TaskMetric(task.type, class_names=label_names, target_names=task.targets),
        )

    def to_units(self, scores: np.ndarray) -> np.ndarray:
        return scores * self.scale + self.shift

    def score(self, y_fit: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        out = self.metric.weighted(self.to_units(y_fit), self.to_units(scores), np.ones((1, len(y_fit))))
        return {k: float(v[0]) for k, v in out.items()}


def train_heads(
    exp: Experiment,
    features: FeatureSet,
    split_ids: dict[str, list[str]],
    targets: dict[str, np.ndarray],
    class_names: list[str] | None,
    checkpoint_root: Path | None = None,
) -> ProbeResults:
    task = exp.task
    primary = task.primary_metric

    results = ProbeResults()
    fitting = FitTargets.for_task(exp, targets, class_names, results)
    fit_targets, score_fn = fitting.targets, fitting.score
    out_dim = output_dim(exp, class_names)
    for head_cfg in exp.heads:
        inputs = head_tensors(features, split_ids, head_cfg, [head_cfg.name], results)
        in_dim = inputs["train"].shape[-1]
        for seed in exp.train.seeds:
            torch.manual_seed(seed)
            head = build_head(head_cfg, in_dim, out_dim)
            loss, loss_info = build_loss(exp.loss, task, targets["train"],
                                         num_classes=len(class_names) if class_names else None)
            fit = train_head(
                head,
                HeadData(inputs["train"], fit_targets["train"]),
                HeadData(inputs["val"], fit_targets["val"]),
                task_type=task.type,
                loss=loss,
                cfg=exp.train,
                seed=seed,
                score_fn=score_fn,
                primary=primary,
                higher_is_better=higher_is_better(primary),
            )
            head.load_state_dict(fit.best_state)
            scores = {s: fitting.to_units(predict(head, inputs[s], task.type, exp.train.batch_size)) for s in SPLITS}
            results.runs.append(head_run(exp, head_cfg.name, seed, fit, scores, targets["val"], loss_info=loss_info,
                                         trainable=sum(p.numel() for p in head.parameters() if p.requires_grad),
                                         checkpoint_root=checkpoint_root))  # fmt: skip
    return results


def head_tensors(features: FeatureSet, split_ids: dict[str, list[str]], head_cfg: HeadConfig, names: list[str],
                 results: ProbeResults) -> dict[str, torch.Tensor]:  # fmt: skip
    """A head's inputs per split: pooled vectors z-scored on train (recorded for ``names``), tokens as stored."""
    raw = {s: head_inputs(features.subset(ids), head_cfg) for s, ids in split_ids.items()}
    if head_cfg.pooling != "attentive":
        raw = _standardise(raw)
        results.standardisation.update({name: "z-score with training-split mean/std" for name in names})
    return {s: torch.from_numpy(np.ascontiguousarray(v)) for s, v in raw.items()}


def head_run(exp: Experiment, name: str, seed: int, fit: TrainResult, scores: dict[str, np.ndarray], y_val: np.ndarray,
             *, loss_info: dict, trainable: int, checkpoint_root: Path | None) -> HeadRun:  # fmt: skip
    """A trained head's record: thresholds tuned on validation, best/last checkpoints saved under ``name``."""
    task = exp.task
    thresholds = None
    if task.type in ("binary", "multilabel"):
        thresholds = tune_thresholds(task.type, y_val, scores["val"], mode=exp.eval.thresholds,
                                     class_names=task.targets)  # fmt: skip
    ckpt_dir = None
    if checkpoint_root is not None:
        ckpt_dir = checkpoint_root / name / f"seed{seed}"
        save_checkpoints(ckpt_dir, fit.best_state, fit.last_state)
    return HeadRun(
        head=name, seed=seed, best_epoch=fit.best_epoch, best_val_score=fit.best_val_score,
        stopped_early=fit.stopped_early, curves=fit.curves, scores=scores,
        thresholds=None if thresholds is None else [float(t) for t in np.atleast_1d(thresholds)],
        loss_info=loss_info, trainable_params=trainable, checkpoint_dir=ckpt_dir,
    )  # fmt: skip


def save_checkpoints(folder: Path, best: dict, last: dict) -> None:
    from fmprobe.atomic import atomic_path

    for name, state in (("best", best), ("last", last)):
        with atomic_path(folder / f"{name}.pt") as tmp:
            torch.save(state, tmp)


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
