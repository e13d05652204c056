"""Heads fitted on cached pooled features without SGD — ``knn``, ``prototype``, ``logreg`` — for any number of
labelled subsets at once, each with its hyperparameter (k, C) chosen on validation.

They read the same z-scored pooled features as the trained heads (``probes.inputs``) and leave the same
``HeadRun`` records, so metrics, CIs, baselines, flags, reports and leaderboards treat them like any head. What
differs is recorded with each run: no epochs (``best_epoch`` None, no curves), ``selected`` holds the k or C
chosen on the validation primary metric (ties: the smallest k, the smallest C, i.e. the strongest L2) and the
validation value of every one tried. They are deterministic: fitted on the same labelled rows, every seed gives
the same fit, so a run's seeds repeat one fit (sd 0); the seed matters where it draws the labelled rows (few-shot
episodes, label fractions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fmprobe.config import FITTED_HEADS, Experiment, HeadConfig, LossConfig, TaskConfig
from fmprobe.errors import ConfigError
from fmprobe.evaluate.kernels import ranked
from fmprobe.evaluate.results import HeadRun
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.evaluate.thresholds import tune_thresholds
from fmprobe.heads import check_head_keys
from fmprobe.probes.logreg import (
    LinearFit,
    fit_logistic,
    fit_ridge,
    linear_outputs,
    subset_outputs,
)
from fmprobe.probes.nonparametric import GridScores, knn_scores, prototype_scores
from fmprobe.train.losses import build_loss, element_weights

METHOD = {
    "knn": "k-nearest neighbours: cosine similarity of the z-scored pooled features, the k most similar labelled "
           "rows vote with weights exp(similarity / T) normalised over the k (DINOv2); training-split scores are "
           "leave-one-out",
    "prototype": "nearest class mean (SimpleShot, CL2N): z-scored pooled features (centred on the training mean) "
                 "L2-normalised, one prototype per class (binary, multilabel: per label, positive and negative); "
                 "scores: softmax of minus the squared distances (a ranking, not a calibrated probability)",
    "logreg": "L2-regularised logistic regression solved to convergence by batched L-BFGS (scikit-learn's "
              "LogisticRegression(solver='lbfgs') objective: multinomial for multiclass, one-vs-rest for binary "
              "and multilabel, intercept unpenalised)",
    "ridge": "ridge regression in closed form (scikit-learn's Ridge objective, alpha = 1 / C, intercept "
             "unpenalised) on the z-scored pooled features",
}  # fmt: skip
SEEDS_NOTE = ("deterministic: fitted on the same labelled rows every seed gives the same fit (sd 0); a seed only "
              "matters where it draws the labelled rows (few-shot episodes, label fractions)")  # fmt: skip


@dataclass
class Fitted:
    """One subset's fit at its chosen hyperparameter: scores per split in the task's convention."""

    scores: dict[str, np.ndarray]
    selected: dict[str, Any]
    best_val_score: float
    trainable_params: int


def check_fitted(exp: Experiment) -> None:
    """Refuse, before any work, what a fitted head cannot honour."""
    for head in (h for h in exp.heads if h.type in FITTED_HEADS):
        check_head_keys(head)
        if exp.adapt.strategy != "frozen":
            raise ConfigError(f"head '{head.name}': a {head.type} head is fitted on cached features; it cannot be "
                              f"adapted end to end (adapt.strategy {exp.adapt.strategy}): use adapt.strategy: "
                              "frozen or a trained head type")  # fmt: skip
        if head.type == "prototype" and exp.task.type == "regression":
            raise ConfigError(f"head '{head.name}': a prototype head needs classes; for regression use knn or "
                              "logreg (ridge regression)")  # fmt: skip
        if head.type == "logreg":
            _check_logreg_loss(head, exp.loss, exp.task.type)


def _check_logreg_loss(head: HeadConfig, loss: LossConfig, task_type: str) -> None:
    """logreg fits the log loss (ridge: squared error) with class / positive weights; nothing else."""
    unsupported = {"type": loss.type not in ("auto", "ce", "bce", "mse"), "label_smoothing": loss.label_smoothing > 0}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"head '{head.name}': logreg fits L2 logistic regression (ridge for regression) with "
                          f"class_weights / pos_weight only; loss.{bad[0]} ({getattr(loss, bad[0])}) cannot apply: "
                          "remove it, or run logreg in a config of its own")  # fmt: skip


def vote_values(task: ResolvedTask, y: np.ndarray) -> torch.Tensor:
    """What a labelled row contributes ``[n, out]``: one-hot class, 0/1 labels, or the target values."""
    y = np.asarray(y)
    if task.type == "multiclass":
        assert task.num_classes is not None
        return torch.from_numpy(np.eye(task.num_classes)[y.astype(np.int64)])
    return torch.from_numpy(y.reshape(len(y), -1).astype(np.float64))


def _task_scores(task: ResolvedTask, out: np.ndarray) -> np.ndarray:
    """``[..., N, out]`` -> the task's convention (binary: ``[..., N]``)."""
    return out[..., 0] if task.type == "binary" else out


def _logreg_grid(head: HeadConfig, task: ResolvedTask, x: dict[str, torch.Tensor], y_train: np.ndarray,
                 subsets: Sequence[np.ndarray], loss_cfg: LossConfig, task_cfg: TaskConfig
                 ) -> tuple[GridScores, LinearFit]:  # fmt: skip
    values = vote_values(task, y_train)
    if task.type == "regression":
        fit = fit_ridge(x["train"], values, subsets, head.C)
    else:
        weights = [element_weights(build_loss(loss_cfg, task_cfg, y_train[s], num_classes=task.num_classes)[0],
                                   y_train[s]) for s in subsets]  # fmt: skip
        fit = fit_logistic(x["train"], values, subsets, head.C, multinomial=task.type == "multiclass",
                           weights=weights)  # fmt: skip

    def activate(out: torch.Tensor) -> np.ndarray:
        if task.type == "multiclass":
            out = torch.softmax(out, -1)
        elif task.type != "regression":
            out = torch.sigmoid(out)
        return out.numpy()

    grid = {s: list(activate(linear_outputs(fit, v))) for s, v in x.items() if s != "train"}
    grid["train"] = [activate(o) for o in subset_outputs(fit, x["train"], subsets)]
    return grid, fit


def fit_subsets(head: HeadConfig, task: ResolvedTask, x: dict[str, torch.Tensor], y: dict[str, np.ndarray],
                subsets: Sequence[np.ndarray], *, loss_cfg: LossConfig, task_cfg: TaskConfig,
                cells: int = 2**24) -> list[Fitted]:  # fmt: skip
    """Fit ``head`` on each subset of training rows (``x``: z-scored pooled features per split, ``y``: targets in
    the task's convention) and choose its k / C on the validation primary metric. Subsets go in chunks whose
    scores (every split, every k / C) hold about ``cells`` values."""
    grid_size = len(head.k) if head.type == "knn" else len(head.C) if head.type == "logreg" else 1
    per_subset = grid_size * task.out_dim * (len(y["val"]) + len(y["test"]) + max(len(s) for s in subsets))
    step = max(1, cells // per_subset)
    return [f for i in range(0, len(subsets), step)
            for f in _fit_chunk(head, task, x, y, subsets[i : i + step], loss_cfg, task_cfg)]  # fmt: skip


def _fit_chunk(head: HeadConfig, task: ResolvedTask, x: dict[str, torch.Tensor], y: dict[str, np.ndarray],
               subsets: Sequence[np.ndarray], loss_cfg: LossConfig, task_cfg: TaskConfig) -> list[Fitted]:  # fmt: skip
    linear: LinearFit | None = None
    if head.type == "knn":
        grid, effective = knn_scores(x, vote_values(task, y["train"]), subsets, head.k, head.temperature)
        name, values = "k", [list(map(int, row)) for row in effective]
    elif head.type == "prototype":
        grid = prototype_scores(x, vote_values(task, y["train"]), subsets, multiclass=task.type == "multiclass")
        name, values = None, [[None]] * len(subsets)
    else:
        grid, linear = _logreg_grid(head, task, x, y["train"], subsets, loss_cfg, task_cfg)
        name, values = "C", [list(head.C)] * len(subsets)
    val = np.stack([_task_scores(task, g) for g in grid["val"]])  # [S, G, Nval, ...]
    primary = task.metric().stacked(y["val"], val.reshape(-1, *val.shape[2:]),
                                    rank=ranked(task.primary))[task.primary].reshape(val.shape[:2])  # fmt: skip
    preference = np.where(np.isnan(primary), -np.inf, -primary if task.lower_is_better else primary)
    dim = x["train"].shape[1]
    fits = []
    for i in range(len(subsets)):
        ties = np.flatnonzero(preference[i] == preference[i].max())
        g = int(ties[0] if name is None else min(ties, key=lambda t: values[i][t]))  # ties: the smallest k / C
        selected: dict[str, Any] = {}
        if name is not None:
            selected = {name: values[i][g], "validation": {str(v): float(p) for v, p in zip(values[i], primary[i])}}
        if linear is not None and task.type != "regression":
            selected.update(converged=bool(linear.converged[i, g]), iterations=int(linear.iterations[i, g]))
        fits.append(Fitted({s: _task_scores(task, grid[s][i][g]) for s in grid}, selected, float(primary[i, g]),
                           _parameters(head, task, dim)))  # fmt: skip
    return fits


def _parameters(head: HeadConfig, task: ResolvedTask, dim: int) -> int:
    """Fitted values: none for knn (it keeps the labelled rows), the prototypes, the weights and intercepts."""
    if head.type == "knn":
        return 0
    if head.type == "prototype":
        return dim * (task.out_dim if task.type == "multiclass" else 2 * task.out_dim)
    return (dim + 1) * task.out_dim


def loss_info(head: HeadConfig, task: ResolvedTask, loss_cfg: LossConfig) -> dict[str, Any]:
    """What a fitted head minimised (metrics.json's ``loss`` of the head)."""
    method = "ridge" if head.type == "logreg" and task.type == "regression" else head.type
    info: dict[str, Any] = {"type": "none" if head.type != "logreg" else "squared error" if method == "ridge"
                            else "log loss", "fit": METHOD[method]}  # fmt: skip
    if head.type == "knn":
        info.update(k=list(head.k), temperature=head.temperature)
    if head.type == "logreg":
        info.update(C=list(head.C))
        if task.type != "regression":
            info.update(class_weights=loss_cfg.class_weights, pos_weight=loss_cfg.pos_weight,
                        weights="scikit-learn's class_weight: each sample's loss times its weight, summed")  # fmt: skip
    return info


def fitted_run(exp: Experiment, task: ResolvedTask, head: HeadConfig, seed: int, fitted: Fitted,
               y_val: np.ndarray) -> HeadRun:  # fmt: skip
    """A fitted head's record: decision thresholds tuned on validation, as for a trained head."""
    thresholds = None
    if task.type in ("binary", "multilabel"):
        thresholds = tune_thresholds(task.type, y_val, fitted.scores["val"], mode=exp.eval.thresholds,
                                     class_names=list(task.targets))  # fmt: skip
    assert head.name is not None
    return HeadRun(
        head=head.name, seed=seed, best_epoch=None, best_val_score=fitted.best_val_score, stopped_early=False,
        curves=[], scores=fitted.scores,
        thresholds=None if thresholds is None else [float(t) for t in np.atleast_1d(thresholds)],
        loss_info=loss_info(head, task, exp.loss), trainable_params=fitted.trainable_params,
        selected=fitted.selected,
    )  # fmt: skip
