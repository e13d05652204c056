"""Every configured head, for every seed, trained on cached features; every split predicted once.

Selection discipline: the best epoch and the decision thresholds are chosen on validation only; train,
validation and test are then predicted once with the chosen weights. Each seed changes head init, data
order and sampling (``train.balanced_sampler``: class-balanced draws); every seed's predictions are kept.
With ``train.grid`` every head trains as several members (learning rate x weight decay), and the heads reading
the same input share one HeadBank per seed. Fitted heads (knn, prototype, logreg) are fitted by ``probes.fitted``
on the same inputs, k / C chosen on validation. A sweep's arms that differ only in their heads train together
(``train_arms``), each with its own results.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmprobe.atomic import atomic_path
from fmprobe.config import FITTED_HEADS, Experiment, HeadConfig
from fmprobe.devices import head_threads
from fmprobe.evaluate.results import SPLITS, HeadRun, ProbeResults
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.evaluate.thresholds import tune_thresholds
from fmprobe.features.store import FeatureSet
from fmprobe.forks import fork_map
from fmprobe.heads.bank import BankMember
from fmprobe.probes.fitted import fit_subsets, fitted_run
from fmprobe.probes.grid import grid_members
from fmprobe.probes.inputs import STANDARDISED, head_tensors
from fmprobe.probes.targets import TARGETS_NOTE, FitTargets
from fmprobe.train.core import EpochReport, Fit
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


# What arms may differ in and still train together: their heads and each head's learning rate and weight decay
# (evaluation settings and names only shape each arm's own record).
_ARM_SETTINGS: dict[str, Any] = {"name": True, "heads": True, "eval": True, "runs_dir": True, "tracking": True,
                                 "train": {"lr", "weight_decay"}}  # fmt: skip


def shared_training(exp: Experiment) -> str | None:
    """Runs with the same key train their heads together in :func:`train_arms` and get the results each gets alone;
    None for a run that trains alone (adaptation, a segmentation probe, ``train.grid``'s fused banks, dropout,
    whose masks would come from one shared stream, fitted heads and the label-efficiency protocol)."""
    if (exp.adapt.strategy != "frozen" or exp.segmentation is not None or exp.train.grid is not None
            or any(h.dropout > 0 or h.type in FITTED_HEADS for h in exp.heads)
            or exp.train.shots is not None or exp.train.label_fractions is not None):  # fmt: skip
        return None
    return json.dumps(exp.model_dump(mode="json", exclude=_ARM_SETTINGS), sort_keys=True)


def reads_tokens(head: HeadConfig) -> bool:
    """Whether the head pools the tokens itself (attentive) rather than reading pooled, standardised features."""
    return head.pooling == "attentive"


def targets_note(exp: Experiment) -> str:
    """How a regression run's heads see its targets (trained heads: standardised; fitted heads: as they are)."""
    trained = [h.name for h in exp.heads if h.type not in FITTED_HEADS]
    return "; ".join(([f"{', '.join(trained)}: {TARGETS_NOTE}"] if trained else [])
                     + (["knn, logreg (ridge): the targets as they are"] if len(trained) < len(exp.heads) else []))


def train_heads(exp: Experiment, task: ResolvedTask, features: FeatureSet, split_ids: dict[str, list[str]],
                targets: dict[str, np.ndarray], checkpoint_root: Path | None = None, *,
                on_epoch: Callable[[int, EpochReport], None] | None = None) -> ProbeResults:  # fmt: skip
    """One HeadRun per member and seed (a grid member is named ``<head>/lr<lr>/wd<wd>``); a fitted head is fitted
    once and its fit repeated for every seed (it is deterministic). ``on_epoch(seed, report)`` hears every epoch of
    the trained heads (progress, the run's estimate)."""
    trained = [members for members in member_groups(exp) if members[0].head.type not in FITTED_HEADS]
    groups = [([(0, m) for m in members], len(members) > 1) for members in trained]
    results = _train_groups([exp], groups, task, features, split_ids, targets, [checkpoint_root],
                            on_epoch=on_epoch)[0]  # fmt: skip
    for head in exp.heads:
        if head.type in FITTED_HEADS:
            inputs = head_tensors(features, split_ids, head)
            if not reads_tokens(head):
                results.standardisation[head.name] = STANDARDISED
            fitted = fit_subsets(head, task, inputs, targets, [np.arange(len(targets["train"]))], loss_cfg=exp.loss,
                                 task_cfg=exp.task)[0]  # fmt: skip
            results.runs += [fitted_run(exp, task, head, seed, fitted, targets["val"]) for seed in exp.train.seeds]
    position = {h.name: j for j, h in enumerate(exp.heads)}  # head by head, as configured
    results.runs.sort(key=lambda r: position[r.head.split("/")[0]])
    return results


def train_arms(exps: list[Experiment], task: ResolvedTask, features: FeatureSet, split_ids: dict[str, list[str]],
               targets: dict[str, np.ndarray], checkpoint_roots: list[Path | None]) -> list[ProbeResults]:  # fmt: skip
    """Each run's results exactly as :func:`train_heads` gives them for that run alone, for runs (arms of a sweep)
    with one :func:`shared_training` key: per input (layer and pooling) and seed, one HeadBank of every arm's
    heads trains in one pass of the training loop. The bank is unfused, so each head keeps its own kernels, loss
    and AdamW groups (the rounding of its run alone) while the arms share the batches, the loop and the
    validation passes. The passes on pooled inputs run side by side in forked copies of this process, on one torch
    thread each as they would here."""
    keys = {shared_training(e) for e in exps}
    if None in keys or len(keys) != 1:
        raise ValueError("train_arms trains arms with one shared_training key; train the others with train_heads")
    by_input: dict[tuple[str, str], list[tuple[int, BankMember]]] = {}
    for i, exp in enumerate(exps):
        for [member] in member_groups(exp):
            by_input.setdefault((str(member.head.layer), member.head.pooling), []).append((i, member))
    results = _train_groups(exps, [(g, False) for g in by_input.values()], task, features, split_ids, targets,
                            checkpoint_roots, side_by_side=True)  # fmt: skip
    for exp, part in zip(exps, results):  # the order of train_heads: head by head, seeds in order
        order = {h.name: j for j, h in enumerate(exp.heads)}
        part.runs.sort(key=lambda r: order[r.head])
    return results


def _train_groups(exps: list[Experiment], groups: list[tuple[list[tuple[int, BankMember]], bool]],
                  task: ResolvedTask, features: FeatureSet, split_ids: dict[str, list[str]],
                  targets: dict[str, np.ndarray], checkpoint_roots: list[Path | None], *,
                  on_epoch: Callable[[int, EpochReport], None] | None = None,
                  side_by_side: bool = False) -> list[ProbeResults]:  # fmt: skip
    """Per group of (arm, member) reading one input, and per seed, one HeadBank (fused or not) of the members
    (:func:`_seed_runs`); each arm's HeadRuns in its own ProbeResults. The training settings other than lr / weight
    decay are the first arm's (the same for all: ``shared_training``).

    With several groups, the first seed of every group trains before the other seeds: a time estimate then knows
    every group's seconds per epoch and early stopping after one fit each. Every fit is seeded on its own, so the
    order changes no number (the callers sort the runs head by head); a group's inputs are read once per round.
    ``side_by_side``: the fits on one torch thread (heads on pooled features) are shared with forked copies of this
    process (``forks.fork_map``, group by group, so each reads a group's inputs about once), which compute on one
    thread too; heads on tokens, which take the process's threads, train here."""
    exp = exps[0]
    results = [ProbeResults(training_inputs=[{"stage": "all epochs", **cached_inputs(e)}]) for e in exps]
    fitting = FitTargets.for_task(task, targets)
    if task.type == "regression":
        for e, r in zip(exps, results):
            r.standardisation["targets"] = targets_note(e)
    for group, _ in groups:
        if not reads_tokens(group[0][1].head):
            for i, member in group:
                results[i].standardisation[member.head.name] = STANDARDISED
    # train.balanced_sampler: the same class-balanced draws as end-to-end training, over the cached features
    weights = balanced_weights(targets["train"], task.type) if exp.train.balanced_sampler else None
    unique = len(exps) > 1  # bank members need distinct names across arms

    @lru_cache(maxsize=1)  # one group's inputs held at a time: the passes below come group by group
    def group_inputs(g: int) -> tuple[tuple[torch.nn.Module, dict], dict[str, torch.Tensor], list[BankMember]]:
        group = groups[g][0]
        loss = build_loss(exp.loss, exp.task, targets["train"], num_classes=task.num_classes)
        return loss, head_tensors(features, split_ids, group[0][1].head), [
            replace(m, name=f"{i}:{m.name}") if unique else m for i, m in group]

    def fit(item: tuple[int, int]) -> list[HeadRun]:
        g, seed = item
        (group, fuse), (loss, inputs, bank_members) = groups[g], group_inputs(g)
        return _seed_runs([(exps[i], m.name, checkpoint_roots[i]) for i, m in group], bank_members, task, inputs,
                          targets, fitting, loss, weights, seed, fuse=fuse,
                          on_epoch=None if on_epoch is None else partial(on_epoch, seed))  # fmt: skip

    seeds = list(exp.train.seeds)
    rounds = [seeds] if len(groups) <= 1 else [seeds[:1], seeds[1:]]
    order = [(g, seed) for round_seeds in rounds for g in range(len(groups)) for seed in round_seeds]
    forked = sorted(item for item in order if side_by_side and not reads_tokens(groups[item[0]][0][0][1].head))
    runs = dict(zip(forked, fork_map(fit, forked)))
    for item in order:
        for (i, _), run in zip(groups[item[0]][0], runs[item] if item in runs else fit(item)):
            results[i].runs.append(run)
    return results


def trained_runs(exp: Experiment, task: ResolvedTask, members: list[BankMember], inputs: dict[str, torch.Tensor],
                 targets: dict[str, np.ndarray], seeds: list[int], checkpoint_root: Path | None) -> list[HeadRun]:  # fmt: skip
    """``members`` (one head, or the grid members sharing an input) trained through the core for every seed on
    ``inputs["train"]`` (the whole training split, or a labelled subset of it); every split predicted."""
    fitting = FitTargets.for_task(task, targets)
    loss = build_loss(exp.loss, exp.task, targets["train"], num_classes=task.num_classes)
    # train.balanced_sampler: the same class-balanced draws as end-to-end training, over the cached features
    weights = balanced_weights(targets["train"], task.type) if exp.train.balanced_sampler else None
    owners = [(exp, m.name, checkpoint_root) for m in members]
    return [run for seed in seeds
            for run in _seed_runs(owners, members, task, inputs, targets, fitting, loss, weights, seed)]


def _seed_runs(owners: list[tuple[Experiment, str, Path | None]], bank_members: list[BankMember], task: ResolvedTask,
               inputs: dict[str, torch.Tensor], targets: dict[str, np.ndarray], fitting: FitTargets,
               loss: tuple[torch.nn.Module, dict], weights: np.ndarray | None, seed: int, *, fuse: bool | None = None,
               on_epoch: Callable[[EpochReport], None] | None = None) -> list[HeadRun]:  # fmt: skip
    """One seed of one HeadBank of ``bank_members`` (all reading ``inputs``) through the training core, on the
    threads its kind of head wants; every split predicted; one HeadRun per member, recorded for its owner (arm,
    name, checkpoint root). The training settings are the first owner's."""
    exp = owners[0][0]
    with head_threads(tokens=reads_tokens(bank_members[0].head)):
        fitted, bank = fit_heads(bank_members, HeadData(inputs["train"], fitting.targets["train"]),
                                 HeadData(inputs["val"], fitting.targets["val"]), in_dim=inputs["train"].shape[-1],
                                 out_dim=task.out_dim, task_type=task.type, loss=loss[0], cfg=exp.train, seed=seed,
                                 scorer=fitting.scorer(task, loss[0]), sample_weights=weights, fuse=fuse,
                                 on_epoch=on_epoch)  # fmt: skip
        scores = {s: fitting.to_units(predict_scores(bank, inputs[s], task.type)) for s in SPLITS}
    return [head_run(arm, task, name, seed, fitted.fits[h], {s: scores[s][h] for s in SPLITS}, targets["val"],
                     loss_info=loss[1], trainable=sum(p.numel() for p in bank.heads[h].parameters() if p.requires_grad),
                     checkpoint_root=root)
            for h, (arm, name, root) in enumerate(owners)]  # fmt: skip


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
