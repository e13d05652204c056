"""metrics.json for a run, assembled in this one place: every number with its split, seeds, CI, baseline and flags.

A head's score on a split is one number, the mean over its members (seeds, folds) of each member's metric
(``bootstrap.MemberMean``): the table, the leaderboard, the gates, the flags and ``fmprobe compare`` all read
it. Per head: metrics per split and member, their mean and sd, and on test the CI of that mean (the same
resamples, of groups when there are groups, applied to every member; ``bootstrap.interval``) with the share of
resamples each CI rests on. The head reported as the result is the one with the best mean validation primary
metric; test is never used to choose anything. The segmentation decoders' block, the grid selection and the
wall time join here too. Each head's configuration identity and test-output hash are recorded
(``prediction_hashes``): the runs index compares them across every finished run (``experiments.twins``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fmprobe.config import METRICS_BY_TASK, Experiment
from fmprobe.evaluate.baselines import baseline_metrics, chance_level
from fmprobe.evaluate.bootstrap import METHOD, MemberMean, bootstrap_metrics, member_summary, scalar_metrics
from fmprobe.evaluate.flags import (
    Flag,
    compute_flags,
    constant_output,
    majority_collapse,
    missing_from_resamples,
    not_converged,
    prediction_hash,
    undefined_metric,
)
from fmprobe.evaluate.task import TaskMetric
from fmprobe.evaluate.results import SPLITS, HeadRun, ProbeResults, SplitData
from fmprobe.evaluate.segmentation import summarise_segmentation
from fmprobe.evaluate.subgroups import subgroup_report
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.evaluate.thresholds import calibration


def _seed_mean_test_scores(runs: list[HeadRun]) -> np.ndarray:
    return np.mean([r.scores["test"] for r in runs], axis=0)


def prediction_hashes(task: ResolvedTask, results: ProbeResults, test_ids: list[str]) -> dict[str, str]:
    """Per head, the hash ``compute_flags`` makes of its seed-mean test outputs (in sample-id order)."""
    heads = dict.fromkeys(r.head for r in results.runs)
    return {h: prediction_hash(_seed_mean_test_scores([r for r in results.runs if r.head == h]), sample_ids=test_ids)
            for h in heads}  # fmt: skip


SCORE_DEFINITION = ("mean over the members (seeds, folds) of each member's metric; test CI: bootstrap of that "
                    "mean, each resample shared by all members")


def summarise_run(
    exp: Experiment,
    task: ResolvedTask,
    results: ProbeResults,
    split: SplitData,
    *,
    split_info: dict[str, Any],
    skipped: list,
    config_hash: str,
    head_identities: dict[str, str],
    identity_version: int,
    grid: dict[str, Any] | None = None,
    wall_seconds: float | None = None,
) -> dict[str, Any]:
    """The whole metrics.json. ``head_identities``: each head's configuration identity (what changes its
    predictions; ``identity_version`` names how it was made), recorded with its test-output hash for the
    runs index."""
    targets, groups, test_ids = split.targets, split.groups, split.ids["test"]
    primary = task.primary
    label_names = task.label_names
    test_groups = groups["test"] if exp.data.group_column else None

    def metric_for(run: HeadRun) -> TaskMetric:
        return task.metric(run.thresholds)

    baseline = scalar_metrics(baseline_metrics(task.type, targets["train"], targets["test"],
                                               class_names=label_names, target_names=list(task.targets)))
    head_names = [h.name for h in exp.heads]
    hashes = prediction_hashes(task, results, test_ids)
    missing: dict[str, float] | None = None  # per class, the share of resamples without it (computed once)

    heads: dict[str, Any] = {}
    all_flags: list[dict[str, Any]] = []
    for cfg in exp.heads:
        runs = sorted((r for r in results.runs if r.head == cfg.name), key=lambda r: (r.fold or 0, r.seed))
        splits = {}
        for part in SPLITS:
            # Folds differ in train/val samples; test is the same for every member.
            per_seed = [scalar_metrics(metric_for(r)((r.data.targets if r.data else targets)[part], r.scores[part]))
                        for r in runs]
            values, mean, sd = member_summary(per_seed)
            splits[part] = {"per_seed": values, "mean": mean, "sd": sd}
        test_ci = bootstrap_metrics(MemberMean(tuple(metric_for(r) for r in runs)), targets["test"],
                                    [r.scores["test"] for r in runs], groups=test_groups,
                                    n_resamples=exp.eval.bootstrap, ci=exp.eval.ci)  # fmt: skip
        mean_test = _seed_mean_test_scores(runs)
        mean_thresholds = None if runs[0].thresholds is None else np.mean([r.thresholds for r in runs], axis=0)
        flags: list[Flag] = compute_flags(
            task.type, targets["test"], mean_test,
            eval_cfg=exp.eval, class_names=label_names, thresholds=mean_thresholds,
            groups=test_groups, primary_metric=primary,
            model_interval=test_ci[primary], baseline_value=baseline[primary],
            ba_interval=test_ci.get("balanced_accuracy"),  # the reported CI: one CI per number
            train_value=splits["train"]["mean"][primary], val_value=splits["val"]["mean"][primary],
            y_by_split=targets, overlap=split_info["group_overlap"],
            allow_group_overlap=split_info["allow_group_overlap"],
        )
        # A collapsed seed is hidden by the seed mean: check each seed's outputs too (their predictions only;
        # the head's score and its CI are checked above).
        names = {f.name for f in flags}
        for r in runs:
            for f in (majority_collapse(task.type, targets["test"], r.scores["test"], thresholds=r.thresholds,
                                        class_names=label_names, n_resamples=0),
                      constant_output(task.type, r.scores["test"],
                                      y_true=targets["test"] if task.type == "regression" else None)):
                if f is not None and f.name not in names:
                    flags.append(Flag(f.name, f.severity, f"{r.member}: {f.message}", f.details))
                    names.add(f.name)
        undefined = _undefined_on_test(runs, metric_for, targets["test"], splits["test"]["mean"])
        if missing is None and any(v is not None and v < 1 for v in test_ci.used.values()):
            missing = missing_from_resamples(task.type, targets["test"], class_names=label_names, groups=test_groups,
                                             n_resamples=exp.eval.bootstrap)  # fmt: skip
        flags += [f for f in (undefined_metric(undefined, test_ci.used, missing=missing),
                              not_converged({r.member: (r.best_epoch, r.last_epoch) for r in runs})) if f is not None]
        entry: dict[str, Any] = {
            "type": cfg.type, "pooling": cfg.pooling, "layer": cfg.layer,
            "trainable_params": runs[0].trainable_params,
            "total_params": runs[0].total_params,
            "loss": runs[0].loss_info,
            "members": [r.member for r in runs],
            "selected_epochs": {r.member: r.best_epoch for r in runs},
            "epochs_allowed": {r.member: r.last_epoch for r in runs},
            "stopped_early": {r.member: r.stopped_early for r in runs},
            "thresholds": {r.member: r.thresholds for r in runs} if runs[0].thresholds is not None else None,
            "splits": splits,
            "test_ci": {k: [lo, hi] for k, (_, lo, hi) in test_ci.items()},
            "test_ci_used": test_ci.used,
            "flags": [f.to_dict() for f in flags],
        }
        if task.type != "regression":
            entry["subgroups"] = subgroup_report(  # test split, seed-mean scores, seed-mean thresholds
                task.type, targets["test"], mean_test, class_names=label_names, thresholds=mean_thresholds)
            entry["calibration_test"] = {
                r.member: calibration(task.type, targets["test"], r.scores["test"], class_names=label_names)
                for r in runs
            }
        heads[cfg.name] = entry
        all_flags += [{"head": cfg.name, **f.to_dict()} for f in flags]

    best = max(head_names, key=lambda h: _orderable(heads[h]["splits"]["val"]["mean"][primary], task))
    baseline_block: dict[str, Any] = {"test": baseline, "description": _baseline_description(task.type)}
    if task.type in ("binary", "multiclass"):
        baseline_block["chance"] = chance_level(task.type, targets["test"], label_names)
    metrics = {
        "experiment": exp.name,
        "config_hash": config_hash,
        "task": {"type": task.type, "targets": list(task.targets),
                 "class_names": None if task.class_names is None else list(task.class_names),
                 "primary_metric": primary,
                 "headline_metrics": [primary] + [m for m in METRICS_BY_TASK[task.type] if m != primary]},
        "split": split_info,
        "seeds": exp.train.seeds,
        "folds": split_info.get("folds"),  # kfold: every (fold, seed) member is scored on the same test set
        "ci_level": exp.eval.ci,
        "score_definition": SCORE_DEFINITION,
        "bootstrap": {"resamples": exp.eval.bootstrap, "unit": "group" if test_groups is not None else "sample",
                      "statistic": "mean over seeds (and folds), each resample shared by all of them",
                      "method": METHOD,
                      "undefined": "resamples where a metric is undefined are left out of its CI; heads[*]."
                                   "test_ci_used holds the share each CI rests on"},
        "baseline": baseline_block,
        "selection": {
            "best_head": best,
            "rule": f"by the highest mean validation {primary} over seeds",
            "epochs": f"Each seed's checkpoint is its best validation-{primary} epoch.",
            "thresholds": ("Decision thresholds tuned on validation "
                           f"({exp.eval.thresholds}) and applied unchanged to test."
                           if task.type in ("binary", "multilabel") else ""),
        },
        "heads": heads,
        "flags": all_flags,
        "prediction_hashes": {h: [head_identities[h], hashes[h]] for h in head_names},
        "identity_version": identity_version,
        "skipped": [list(s) for s in skipped],
    }
    if results.segmentation is not None:
        metrics["segmentation"] = _segmentation(exp, results, split, heads)
    if grid is not None:
        metrics["selection"]["grid"] = grid
    if wall_seconds is not None:
        metrics["wall_seconds"] = round(wall_seconds, 2)
    return metrics


def _undefined_on_test(runs: list[HeadRun], metric_for: Any, y_test: np.ndarray, means: dict[str, float]
                       ) -> dict[str, str]:  # fmt: skip
    """Metric -> why it is undefined on test (``compute_metrics``' reason), for the metrics no member defines."""
    if not any(np.isnan(v) for v in means.values()):
        return {}
    reasons = metric_for(runs[0])(y_test, runs[0].scores["test"])["undefined"]
    return {k: reasons.get(k, "undefined for every member") for k, v in means.items() if np.isnan(v)}


def _segmentation(exp: Experiment, results: ProbeResults, split: SplitData, heads: dict[str, Any]) -> dict[str, Any]:
    """The segmentation section; an adapted run's decoder blocks also go beside their heads' metrics."""
    cfg, seg = exp.segmentation, results.segmentation
    assert cfg is not None and seg is not None
    groups = dict(zip(split.ids["test"], split.groups["test"])) if exp.data.group_column else None
    block = summarise_segmentation(seg, cfg.class_names, test_groups=groups, n_resamples=exp.eval.bootstrap,
                                   ci=exp.eval.ci)  # fmt: skip
    block.update(decoder=cfg.decoder, layer=cfg.layer, loss_weight=cfg.loss_weight if seg.path == "adapted" else None)
    if seg.path == "adapted":
        for head, entry in block["decoders"].items():
            heads[head]["segmentation"] = entry
    return block


def _orderable(value: float, task: ResolvedTask) -> float:
    if value != value:
        return -np.inf
    return -value if task.lower_is_better else value


def _baseline_description(task_type: str) -> str:
    return {
        "binary": "constant score = training prevalence (AUROC 0.5; AP = test prevalence).",
        "multiclass": "training class priors for every sample (predicts the majority class; balanced accuracy = "
                      "1 / the classes present in test, the chance level: see baseline.chance).",
        "multilabel": "constant score per label = training prevalence (mAP = test prevalence, AUROC 0.5).",
        "regression": "training mean for every sample (R² ≤ 0).",
    }[task_type]
