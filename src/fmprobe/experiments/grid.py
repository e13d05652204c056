"""``train.grid``: every head config x learning rate x weight decay, trained in HeadBanks, best member on validation.

Per seed (and fold) the members whose heads read the same input (layer and pooling) train together in one
HeadBank: one pass over the cached features for all of them. Per head config the member with the best
validation primary metric, averaged over seeds (and folds), is reported as that head; choosing per seed would
let each seed's noise pick its own winner. Test never enters the choice. Every member's checkpoints are kept
under ``checkpoints/<head>/lr<lr>/wd<wd>/seed<k>``; metrics.json's ``selection.grid`` records the choice and the
validation scores of all members; predictions.parquet and curves.parquet hold the chosen members' runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fmprobe.config import Experiment, HeadConfig
from fmprobe.errors import ConfigError
from fmprobe.evaluate.bootstrap import TaskMetric, scalar_metrics
from fmprobe.evaluate.metrics import higher_is_better
from fmprobe.experiments.probing import (
    SPLITS, FitTargets, HeadRun, ProbeResults, SplitData, head_run, head_tensors, output_dim,
)  # fmt: skip
from fmprobe.features.store import FeatureSet
from fmprobe.heads.bank import BankMember, bank_logits, head_grid, stacked_scores, train_bank
from fmprobe.train.losses import build_loss
from fmprobe.train.trainer import HeadData


def check_grid(exp: Experiment) -> None:
    if exp.train.grid is not None and exp.adapt.strategy != "frozen":
        raise ConfigError("train.grid trains frozen probes from cached features; remove it for adapt.strategy "
                          f"{exp.adapt.strategy} (or run a sweep over train.lr / train.weight_decay)")  # fmt: skip


def grid_members(exp: Experiment, head: HeadConfig) -> list[BankMember]:
    grid = exp.train.grid
    assert grid is not None
    return head_grid([head], grid.lr or [exp.train.lr], grid.weight_decay or [exp.train.weight_decay])


def train_grid(
    exp: Experiment,
    features: FeatureSet,
    split_ids: dict[str, list[str]],
    targets: dict[str, np.ndarray],
    class_names: list[str] | None,
    checkpoint_root: Path | None = None,
) -> ProbeResults:
    """Like ``train_heads``, with one HeadRun per grid member (named ``<head>/lr<lr>/wd<wd>``) and seed."""
    task = exp.task
    primary = task.primary_metric
    results = ProbeResults()
    fitting = FitTargets.for_task(exp, targets, class_names, results)

    def score_fn(y: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
        return fitting.metric.stacked(fitting.to_units(y), fitting.to_units(scores))

    out_dim = output_dim(exp, class_names)
    by_input: dict[tuple[str, str], list[HeadConfig]] = {}
    for head_cfg in exp.heads:
        by_input.setdefault((str(head_cfg.layer), head_cfg.pooling), []).append(head_cfg)
    for heads in by_input.values():
        inputs = head_tensors(features, split_ids, heads[0], [h.name for h in heads], results)
        members = [m for h in heads for m in grid_members(exp, h)]
        for seed in exp.train.seeds:
            loss, loss_info = build_loss(exp.loss, task, targets["train"],
                                         num_classes=len(class_names) if class_names else None)  # fmt: skip
            fit = train_bank(members, HeadData(inputs["train"], fitting.targets["train"]),
                             HeadData(inputs["val"], fitting.targets["val"]), in_dim=inputs["train"].shape[-1],
                             out_dim=out_dim, task_type=task.type, loss=loss, cfg=exp.train, seed=seed,
                             score_fn=score_fn, primary=primary,
                             higher_is_better=higher_is_better(primary))  # fmt: skip
            scores = {s: fitting.to_units(stacked_scores(bank_logits(fit.bank, inputs[s], "cpu"), task.type).numpy())
                      for s in SPLITS}  # fmt: skip
            for h, member in enumerate(members):
                trainable = sum(p.numel() for p in fit.bank.heads[h].parameters() if p.requires_grad)
                results.runs.append(head_run(exp, member.name, seed, fit.results[member.name],
                                             {s: scores[s][h] for s in SPLITS}, targets["val"], loss_info=loss_info,
                                             trainable=trainable, checkpoint_root=checkpoint_root))  # fmt: skip
    return results


def select_members(
    exp: Experiment, results: ProbeResults, split: SplitData, class_names: list[str] | None
) -> tuple[ProbeResults, dict[str, Any]]:
    """Per head config, the member with the best mean validation primary metric over all its seeds (and folds),
    its runs renamed to the head; and the record of the choice for metrics.json."""
    task = exp.task
    primary = task.primary_metric
    label_names = class_names if task.type == "multiclass" else task.targets
    sign = 1.0 if higher_is_better(primary) else -1.0

    def val_primary(run: HeadRun) -> float:
        metric = TaskMetric(task.type, class_names=label_names, target_names=task.targets,
                            thresholds=None if run.thresholds is None else np.asarray(run.thresholds))  # fmt: skip
        y = (run.data or split).targets["val"]
        return scalar_metrics(metric(y, run.scores["val"]))[primary]

    chosen_runs: list[HeadRun] = []
    record: dict[str, Any] = {}
    for head in exp.heads:
        members = []
        for m in grid_members(exp, head):
            runs = [r for r in results.runs if r.head == m.name]
            values = {r.member: val_primary(r) for r in runs}
            mean = float(np.mean(list(values.values())))
            members.append({"member": m.name, "lr": m.lr, "weight_decay": m.weight_decay, "val_mean": mean,
                            "val_per_seed": values})  # fmt: skip
        best = max(members, key=lambda e: -np.inf if np.isnan(e["val_mean"]) else sign * e["val_mean"])
        record[head.name] = {"chosen": best["member"], "lr": best["lr"], "weight_decay": best["weight_decay"],
                             "members": members}  # fmt: skip
        chosen_runs += [replace(r, head=head.name) for r in results.runs if r.head == best["member"]]
    order = {h.name: i for i, h in enumerate(exp.heads)}
    chosen_runs.sort(key=lambda r: (-1 if r.fold is None else r.fold, order[r.head]))  # stable: seeds keep order
    selected = replace(results, runs=chosen_runs)
    return selected, {
        "rule": f"per head, the learning rate x weight decay member with the best mean validation {primary} "
                "over seeds (and folds); test is never used",
        "metric": primary,
        "heads": record,
    }  # fmt: skip
