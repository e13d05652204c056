"""``train.grid``: every head config x learning rate x weight decay, the best member per head on validation.

Per seed (and fold) the members whose heads read the same input train together in one HeadBank
(``probes.frozen``). Fitted heads (knn, prototype, logreg) are not trained by SGD and take no part: they keep
their own k / C chosen on validation. Per head config the member with the best validation primary metric, averaged over seeds
(and folds), is reported as that head; choosing per seed would let each seed's noise pick its own winner. Test
never enters the choice. Every member's checkpoints are kept under ``checkpoints/<head>/lr<lr>/wd<wd>/seed<k>``;
metrics.json's ``selection.grid`` records the choice and the validation scores of all members; predictions.parquet
and curves.parquet hold the chosen members' runs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from fmprobe.config import FITTED_HEADS, Experiment, HeadConfig
from fmprobe.errors import ConfigError
from fmprobe.evaluate.bootstrap import scalar_metrics
from fmprobe.evaluate.results import HeadRun, ProbeResults, SplitData
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.heads.bank import BankMember, head_grid


def check_grid(exp: Experiment) -> None:
    if exp.train.grid is not None and exp.adapt.strategy != "frozen":
        raise ConfigError("train.grid trains frozen probes from cached features; remove it for adapt.strategy "
                          f"{exp.adapt.strategy} (or run a sweep over train.lr / train.weight_decay)")  # fmt: skip


def grid_members(exp: Experiment, head: HeadConfig) -> list[BankMember]:
    grid = exp.train.grid
    assert grid is not None
    return head_grid([head], grid.lr or [exp.train.lr], grid.weight_decay or [exp.train.weight_decay])


def select_members(exp: Experiment, task: ResolvedTask, results: ProbeResults, split: SplitData
                   ) -> tuple[ProbeResults, dict[str, Any]]:  # fmt: skip
    """Per head config, the member with the best mean validation primary metric over all its seeds (and folds),
    its runs renamed to the head; and the record of the choice for metrics.json."""
    primary = task.primary
    sign = -1.0 if task.lower_is_better else 1.0

    def val_primary(run: HeadRun) -> float:
        y = (run.data or split).targets["val"]
        return scalar_metrics(task.metric(run.thresholds)(y, run.scores["val"]))[primary]

    chosen_runs: list[HeadRun] = []
    record: dict[str, Any] = {}
    for head in exp.heads:
        if head.type in FITTED_HEADS:  # not a grid member: its own k / C was chosen on validation
            chosen_runs += [r for r in results.runs if r.head == head.name]
            continue
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
