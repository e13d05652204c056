"""Every configured head, for every seed, trained on cached features; every split predicted once.

Selection discipline: the best epoch and the decision thresholds are chosen on validation only; train,
validation and test are then predicted once with the chosen weights. Each seed changes head init, data
order and sampling (``train.balanced_sampler``: class-balanced draws); every seed's predictions are kept.
With ``train.grid`` every head trains as several members (learning rate x weight decay), and the heads reading
the same input share one HeadBank per seed. Fitted heads (knn, prototype, logreg) are fitted by ``probes.fitted``
on the same inputs, k / C chosen on validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmprobe.atomic import atomic_path
from fmprobe.config import FITTED_HEADS, Experiment
from fmprobe.evaluate.results import SPLITS, HeadRun, ProbeResults
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.evaluate.thresholds import tune_thresholds
from fmprobe.features.store import FeatureSet
from fmprobe.heads.bank import BankMember
from fmprobe.probes.fitted import fit_subsets, fitted_run
from fmprobe.probes.grid import grid_members
from fmprobe.probes.inputs import head_tensors
from fmprobe.probes.targets import TARGETS_NOTE, FitTargets
from fmprobe.train.core import Fit
from fmprobe.train.heads import fit_heads, predict_scores
from fmprobe.train.losses import build_loss
from fmprobe.train.sampling import balanced_weights
from fmprobe.train.sources import HeadData


def cached_inputs(exp: Experiment) -> dict[str, Any]:
    """What a probe on cached features trains on (recorded in metrics.json beside the curves)."""
    return {"inputs": "cached features of the un-augmented inputs (resized and centre-cropped as for evaluation, "
                      "no flip): the same vectors every epoch",
            "augmentation": None,
            "sampling": "class-balanced draws" if exp.train.balanced_sampler else "a permutation per epoch"}


def member_groups(exp: Experiment) -> list[list[BankMember]]:
    """The members that fit together: each head on its own, or (``train.grid``) every grid member of the trained
    heads that read the same input (layer and pooling); fitted heads (knn, prototype, logreg) always alone, their
    own k / C grid chosen on validation instead of the learning-rate grid."""
    if exp.train.grid is None:
        return [[BankMember(h.name, h, exp.train.lr, exp.train.weight_decay)] for h in exp.heads]
    by_input: dict[tuple[str, str], list[BankMember]] = {}
    alone = []
    for head in exp.heads:
        if head.type in FITTED_HEADS:
            alone.append([BankMember(head.name, head, exp.train.lr, exp.train.weight_decay)])
        else:
            by_input.setdefault((str(head.layer), head.pooling), []).extend(grid_members(exp, head))
    return list(by_input.values()) + alone


def train_heads(exp: Experiment, task: ResolvedTask, features: FeatureSet, split_ids: dict[str, list[str]],
                targets: dict[str, np.ndarray], checkpoint_root: Path | None = None) -> ProbeResults:  # fmt: skip
    """One HeadRun per member and seed (a grid member is named ``<head>/lr<lr>/wd<wd>``); a fitted head is fitted
    once and its fit repeated for every seed (it is deterministic)."""
    results = ProbeResults(training_inputs=[{"stage": "all epochs", **cached_inputs(exp)}])
    if task.type == "regression":
        trained = [h.name for h in exp.heads if h.type not in FITTED_HEADS]
        results.standardisation["targets"] = "; ".join(
            ([f"{', '.join(trained)}: {TARGETS_NOTE}"] if trained else [])
            + (["knn, logreg (ridge): the targets as they are"] if len(trained) < len(exp.heads) else []))
    for members in member_groups(exp):
        head = members[0].head
        inputs = head_tensors(features, split_ids, head, list(dict.fromkeys(m.head.name for m in members)), results)
        if head.type in FITTED_HEADS:
            fitted = fit_subsets(head, task, inputs, targets, [np.arange(len(targets["train"]))], loss_cfg=exp.loss,
                                 task_cfg=exp.task)[0]  # fmt: skip
            results.runs += [fitted_run(exp, task, head, seed, fitted, targets["val"]) for seed in exp.train.seeds]
        else:
            results.runs += trained_runs(exp, task, members, inputs, targets, exp.train.seeds, checkpoint_root)
    return results


def trained_runs(exp: Experiment, task: ResolvedTask, members: list[BankMember], inputs: dict[str, torch.Tensor],
                 targets: dict[str, np.ndarray], seeds: list[int], checkpoint_root: Path | None) -> list[HeadRun]:  # fmt: skip
    """``members`` (one head, or the grid members sharing an input) trained through the core for every seed on
    ``inputs["train"]`` (the whole training split, or a labelled subset of it); every split predicted."""
    fitting = FitTargets.for_task(task, targets)
    loss, loss_info = build_loss(exp.loss, exp.task, targets["train"], num_classes=task.num_classes)
    # train.balanced_sampler: the same class-balanced draws as end-to-end training, over the cached features
    weights = balanced_weights(targets["train"], task.type) if exp.train.balanced_sampler else None
    runs = []
    for seed in seeds:
        fitted, bank = fit_heads(members, HeadData(inputs["train"], fitting.targets["train"]),
                                 HeadData(inputs["val"], fitting.targets["val"]), in_dim=inputs["train"].shape[-1],
                                 out_dim=task.out_dim, task_type=task.type, loss=loss, cfg=exp.train, seed=seed,
                                 scorer=fitting.scorer(task, loss), sample_weights=weights)  # fmt: skip
        scores = {s: fitting.to_units(predict_scores(bank, inputs[s], task.type)) for s in SPLITS}
        for h, member in enumerate(members):
            trainable = sum(p.numel() for p in bank.heads[h].parameters() if p.requires_grad)
            runs.append(head_run(exp, task, member.name, seed, fitted.fits[h], {s: scores[s][h] for s in SPLITS},
                                 targets["val"], loss_info=loss_info, trainable=trainable,
                                 checkpoint_root=checkpoint_root))  # fmt: skip
    return runs


def head_run(exp: Experiment, task: ResolvedTask, name: str, seed: int, fit: Fit, scores: dict[str, np.ndarray],
             y_val: np.ndarray, *, loss_info: dict, trainable: int, checkpoint_root: Path | None) -> HeadRun:  # fmt: skip
    """A trained head's record: thresholds tuned on validation, best/last checkpoints saved under ``name``."""
    thresholds = None
    if task.type in ("binary", "multilabel"):
        thresholds = tune_thresholds(task.type, y_val, scores["val"], mode=exp.eval.thresholds,
                                     class_names=list(task.targets))  # fmt: skip
    ckpt_dir = None
    if checkpoint_root is not None:
        ckpt_dir = checkpoint_root / name / f"seed{seed}"
        save_checkpoints(ckpt_dir, fit.best_state, fit.last_state)
    return HeadRun(
        head=name, seed=seed, best_epoch=fit.best_epoch, best_val_score=fit.best_val_score,
        stopped_early=fit.stopped_early, curves=fit.curves, scores=scores,
        thresholds=None if thresholds is None else [float(t) for t in np.atleast_1d(thresholds)],
        loss_info=loss_info, trainable_params=trainable, checkpoint_dir=ckpt_dir, last_epoch=fit.last_epoch,
    )  # fmt: skip


def save_checkpoints(folder: Path, best: dict, last: dict) -> None:
    for name, state in (("best", best), ("last", last)):
        with atomic_path(folder / f"{name}.pt") as tmp:
            torch.save(state, tmp)
