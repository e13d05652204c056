"""How many labels does it need: every head fitted again on labelled subsets of the training split.

``train.shots`` draws few-shot episodes (K examples per class, each from its own group) and ``train.label_fractions``
nested shares of the training groups, one draw per seed (``probes.subsets``). Every head of the run is fitted on
every draw: fitted heads (knn, prototype, logreg) on all ``train.episodes`` episodes at once, trained heads through
the training core on the first ``train.trained_episodes`` (each episode's index is its seed). The features are the
run's: pooled vectors z-scored with the statistics of the whole training split (its images, not its labels, as a
user with few labels still has all the images); validation and test are the run's own and choose k, C, the epoch
and the thresholds exactly as in the full run. Only process 0 runs the protocol.

``fmprobe efficiency CONFIG`` is ``fmprobe run`` with the protocol switched on (the issue's budgets unless the config
or the options give others); the numbers are assembled into metrics.json by ``evaluate.efficiency``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmprobe.config import FITTED_HEADS, Experiment, HeadConfig, load_config
from fmprobe.errors import ConfigError
from fmprobe.evaluate.results import EfficiencyPoint, ProbeResults, SplitData
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.features.store import FeatureSet
from fmprobe.heads.bank import BankMember
from fmprobe.probes.fitted import fit_subsets, fitted_run
from fmprobe.probes.frozen import trained_runs
from fmprobe.probes.inputs import head_tensors
from fmprobe.probes.subsets import (
    Unavailable,
    missing_classes,
    nested_fractions,
    shot_episodes,
)

DEFAULT_SHOTS = [1, 2, 4, 8, 16, 32]
DEFAULT_FRACTIONS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
Draws = list[tuple[int, np.ndarray]] | Unavailable  # (seed, training rows) per repeat, or why there are none


def wanted(exp: Experiment) -> bool:
    return exp.train.shots is not None or exp.train.label_fractions is not None


def check_efficiency(exp: Experiment) -> None:
    """Refuse, before any work, a label-efficiency protocol the run cannot honour."""
    if not wanted(exp):
        return
    keys = "train.shots / train.label_fractions"
    if exp.adapt.strategy != "frozen":
        raise ConfigError(f"{keys} refit every head on labelled subsets of cached features; adapt.strategy "
                          f"{exp.adapt.strategy} trains end to end: use adapt.strategy: frozen")  # fmt: skip
    if exp.split.mode == "kfold":
        raise ConfigError(f"{keys} draw from one training split; split.mode kfold has several: use given or generate")
    if exp.train.grid is not None:
        raise ConfigError(f"{keys} with train.grid would train every grid member on every draw; set train.lr and "
                          "train.weight_decay to the member a run with the grid chose, and remove train.grid")  # fmt: skip
    if exp.train.shots is not None and exp.task.type not in ("binary", "multiclass"):
        raise ConfigError(f"train.shots draws K examples per class: binary or multiclass tasks; a {exp.task.type} "
                          "task has no classes to count: use train.label_fractions")  # fmt: skip


def class_names(task: ResolvedTask) -> list[str]:
    """What K examples per class counts over (binary: the negative and the positive class)."""
    return ["negative", "positive"] if task.type == "binary" else task.label_names


def draw_budgets(exp: Experiment, task: ResolvedTask, split: SplitData) -> list[tuple[str, float, Draws]]:
    """Every (protocol, budget) with its draws of training rows; the draws are shared by all heads."""
    groups, y = split.groups["train"], split.targets["train"]
    budgets: list[tuple[str, float, Draws]] = []
    for k in exp.train.shots or []:
        draws = shot_episodes(groups, y, task_type=task.type, class_names=class_names(task), k=k,
                              episodes=exp.train.episodes)  # fmt: skip
        budgets.append(("shots", k, draws if isinstance(draws, Unavailable) else list(enumerate(draws))))
    fractions = exp.train.label_fractions or []
    per_seed = {seed: nested_fractions(groups, y, task_type=task.type, fractions=fractions, seed=seed)
                for seed in exp.train.seeds}  # fmt: skip
    for f in fractions:
        draws = [(seed, per_seed[seed][f]) for seed in exp.train.seeds]
        lacking = {seed: missing_classes(task.type, y[rows], task.label_names) for seed, rows in draws}
        lacking = {seed: m for seed, m in lacking.items() if m}
        if lacking:
            shown = "; ".join(f"seed {s}: {', '.join(m)}" for s, m in lacking.items())
            budgets.append(("fraction", f, Unavailable(f"too small to hold every class ({shown})")))
        else:
            budgets.append(("fraction", f, draws))
    return budgets


def subset_data(split: SplitData, rows: np.ndarray) -> SplitData:
    """The run's split with the training split cut to ``rows``."""
    return SplitData(ids={**split.ids, "train": [split.ids["train"][r] for r in rows]},
                     groups={**split.groups, "train": [split.groups["train"][r] for r in rows]},
                     targets={**split.targets, "train": split.targets["train"][rows]})  # fmt: skip


def efficiency_points(exp: Experiment, task: ResolvedTask, features: FeatureSet, split: SplitData,
                      full: ProbeResults) -> list[EfficiencyPoint]:  # fmt: skip
    """Every head at every budget. A fraction of 1 labels the whole training split: the full run's fits
    (``full``, the same seeds) are that point's repeats."""
    budgets = draw_budgets(exp, task, split)
    points = []
    for head in exp.heads:
        inputs = head_tensors(features, split.ids, head)
        points += head_points(exp, task, head, inputs, split, budgets, full)
    return points


def head_points(exp: Experiment, task: ResolvedTask, head: HeadConfig, inputs: dict[str, torch.Tensor],
                split: SplitData, budgets: list[tuple[str, float, Draws]], full: ProbeResults
                ) -> list[EfficiencyPoint]:  # fmt: skip
    """One head at every budget, on its inputs (``probes.inputs.head_tensors``) of the whole split; a fitted head
    on every draw of every budget at once."""
    fitted = head.type in FITTED_HEADS
    if fitted:
        every = [rows for _, _, draws in budgets if not isinstance(draws, Unavailable) for _, rows in draws]
        fits = iter(fit_subsets(head, task, inputs, split.targets, every, loss_cfg=exp.loss, task_cfg=exp.task)
                    if every else [])  # fmt: skip
    points = []
    for protocol, value, draws in budgets:
        if isinstance(draws, Unavailable):
            points.append(EfficiencyPoint(protocol, value, str(head.name), [], missing=draws.reason))
            continue
        if not fitted and protocol == "shots":
            draws = draws[: exp.train.trained_episodes]
        whole = [r for r in full.runs if r.head == head.name]
        if fitted:
            runs = [fitted_run(exp, task, head, seed, next(fits), split.targets["val"]) for seed, _ in draws]
        elif whole and protocol == "fraction" and all(len(rows) == len(split.ids["train"]) for _, rows in draws):
            runs = whole
        else:
            member = [BankMember(str(head.name), head, exp.train.lr, exp.train.weight_decay)]
            runs = []
            for seed, rows in draws:
                cut = {**inputs, "train": inputs["train"][rows]}
                runs += trained_runs(exp, task, member, cut, subset_data(split, rows).targets, [seed], None)
        data = [subset_data(split, rows) for _, rows in draws]
        points.append(EfficiencyPoint(protocol, value, str(head.name),
                                      [replace(r, data=d) for r, d in zip(runs, data)]))  # fmt: skip
    return points


def efficiency_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Long rows (protocol, budget, head, repeat) of the per-repeat test values in metrics.json: efficiency.parquet."""
    block = metrics["efficiency"]
    return [{"protocol": p["protocol"], "value": p["value"], "head": p["head"], "repeat": seed,
             "labelled_samples": n, "labelled_groups": g, f"test_{block['metric']}": v}
            for p in block["points"] if p["status"] == "ok"
            for seed, n, g, v in zip(p["repeats"], p["labelled"]["samples"], p["labelled"]["groups"],
                                     p["per_repeat"])]  # fmt: skip


def efficiency_config(config: str | Path, *, shots: list[int] | None = None, fractions: list[float] | None = None,
                      target: float | None = None, episodes: int | None = None) -> Experiment:  # fmt: skip
    """The config with the protocol switched on: options first, then the config's own budgets, then the defaults
    (few-shot only for binary / multiclass tasks)."""
    overrides: dict[str, Any] = {}
    for key, value in (("train.shots", shots), ("train.label_fractions", fractions), ("eval.target", target),
                       ("train.episodes", episodes)):  # fmt: skip
        if value is not None:
            overrides[key] = value
    exp = load_config(config, overrides)
    if wanted(exp):
        return exp
    if exp.task.type in ("binary", "multiclass"):
        overrides["train.shots"] = DEFAULT_SHOTS
    return load_config(config, {**overrides, "train.label_fractions": DEFAULT_FRACTIONS})
