"""metrics.json for a run: every number with its split, seeds, CI, baseline and flags.

Per head: metrics per split and seed, mean and sd over seeds, and on test a percentile bootstrap CI of
the seed-mean metric (the same resamples, of groups when there are groups, applied to every seed).
The head reported as the result is the one with the best mean validation primary metric; test is never
used to choose anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmprobe.config import METRICS_BY_TASK, Experiment
from fmprobe.evaluate.baselines import baseline_metrics
from fmprobe.evaluate.bootstrap import TaskMetric, resample_weights, scalar_metrics
from fmprobe.evaluate.flags import Flag, compute_flags, prediction_hash
from fmprobe.evaluate.metrics import higher_is_better
from fmprobe.evaluate.thresholds import calibration
from fmprobe.experiments.identity import head_hash
from fmprobe.experiments.probing import SPLITS, HeadRun, ProbeResults


def seed_mean_bootstrap(
    metrics: Sequence[TaskMetric],
    y_true: np.ndarray,
    scores: Sequence[np.ndarray],
    *,
    groups: Sequence[str] | None,
    n_resamples: int,
    ci: float,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """(point, lo, hi) of the mean-over-seeds metric; each resample is shared by all seeds."""
    points = [scalar_metrics(m(y_true, s)) for m, s in zip(metrics, scores)]
    names = list(points[0])
    point = {k: float(np.nanmean([p[k] for p in points])) for k in names}
    if n_resamples == 0:
        return {k: (v, float("nan"), float("nan")) for k, v in point.items()}
    draws: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for w in resample_weights(len(y_true), groups=groups, n_resamples=n_resamples, seed=seed):
        per_seed = [m.weighted(y_true, s, w) for m, s in zip(metrics, scores)]
        for k in names:
            with np.errstate(all="ignore"):
                stacked = np.stack([np.asarray(d[k], dtype=np.float64) for d in per_seed])
            draws[k].append(np.mean(stacked, axis=0))
    alpha = (1 - ci) / 2
    out = {}
    for k in names:
        d = np.concatenate(draws[k])
        d = d[~np.isnan(d)]
        lo, hi = np.quantile(d, [alpha, 1 - alpha]) if d.size else (np.nan, np.nan)
        out[k] = (point[k], float(lo), float(hi))
    return out


def _mean_sd(per_seed: list[dict[str, float]]) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float]]:
    keys = list(per_seed[0])
    values = {k: [p[k] for p in per_seed] for k in keys}
    with np.errstate(all="ignore"):
        mean = {k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for k, v in values.items()}
        sd = {k: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan") for k, v in values.items()}
    return values, mean, sd


def _seed_mean_test_scores(runs: list[HeadRun]) -> np.ndarray:
    return np.mean([r.scores["test"] for r in runs], axis=0)


def previous_prediction_hashes(runs_dir: Path, exclude: Path) -> dict[str, tuple[str, str]]:
    """{run/head: (head config hash, test output hash)} of every earlier run under ``runs_dir``."""
    out: dict[str, tuple[str, str]] = {}
    for path in sorted(runs_dir.glob("*/*/metrics.json")):
        if path.parent == exclude:
            continue
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for head, (cfg, out_hash) in m.get("prediction_hashes", {}).items():
            out[f"{path.parent.parent.name}/{path.parent.name}/{head}"] = (cfg, out_hash)
    return out


def summarise_run(
    exp: Experiment,
    results: ProbeResults,
    *,
    targets: dict[str, np.ndarray],
    groups: dict[str, list[str]],
    test_ids: list[str],
    class_names: list[str] | None,
    split_info: dict[str, Any],
    skipped: list,
    run_dir: Path,
    config_hash: str,
) -> dict[str, Any]:
    task = exp.task
    primary = task.primary_metric
    label_names = class_names if task.type == "multiclass" else task.targets
    test_groups = groups["test"] if exp.data.group_column else None

    def metric_for(run: HeadRun) -> TaskMetric:
        return TaskMetric(task.type, class_names=label_names, target_names=task.targets,
                          thresholds=None if run.thresholds is None else np.asarray(run.thresholds))

    baseline = scalar_metrics(baseline_metrics(task.type, targets["train"], targets["test"],
                                               class_names=label_names, target_names=task.targets))
    head_names = [h.name for h in exp.heads]
    # The same hash compute_flags makes: seed-mean test outputs in sample-id order.
    hashes = {h: prediction_hash(_seed_mean_test_scores([r for r in results.runs if r.head == h]),
                                 sample_ids=test_ids) for h in head_names}
    earlier = previous_prediction_hashes(Path(exp.runs_dir).expanduser(), run_dir)

    heads: dict[str, Any] = {}
    all_flags: list[dict[str, Any]] = []
    for cfg in exp.heads:
        runs = sorted((r for r in results.runs if r.head == cfg.name), key=lambda r: (r.fold or 0, r.seed))
        splits = {}
        for split in SPLITS:
            # Folds differ in train/val samples; test is the same for every member.
            per_seed = [scalar_metrics(metric_for(r)((r.data.targets if r.data else targets)[split], r.scores[split]))
                        for r in runs]
            values, mean, sd = _mean_sd(per_seed)
            splits[split] = {"per_seed": values, "mean": mean, "sd": sd}
        test_ci = seed_mean_bootstrap([metric_for(r) for r in runs], targets["test"], [r.scores["test"] for r in runs],
                                      groups=test_groups, n_resamples=exp.eval.bootstrap, ci=exp.eval.ci)
        others = {k: v for k, v in earlier.items()}
        others.update({f"this run/{h}": (head_hash(exp, h), hashes[h])
                       for h in head_names if h != cfg.name})
        mean_test = _seed_mean_test_scores(runs)
        flags: list[Flag] = compute_flags(
            task.type, targets["test"], mean_test,
            eval_cfg=exp.eval, class_names=label_names,
            thresholds=None if runs[0].thresholds is None else np.mean([r.thresholds for r in runs], axis=0),
            groups=test_groups, primary_metric=primary,
            model_interval=test_ci[primary], baseline_value=baseline[primary],
            train_value=splits["train"]["mean"][primary], val_value=splits["val"]["mean"][primary],
            y_by_split=targets, overlap=split_info["group_overlap"],
            allow_group_overlap=split_info["allow_group_overlap"],
            config_hash=head_hash(exp, cfg.name), sample_ids=test_ids, other_runs=others,
        )
        # A collapsed seed is hidden by the seed mean: check each seed's outputs too.
        names = {f.name for f in flags}
        for r in runs:
            for f in compute_flags(task.type, targets["test"], r.scores["test"], eval_cfg=exp.eval,
                                   class_names=label_names, thresholds=r.thresholds, groups=test_groups):
                if f.name not in names:
                    flags.append(Flag(f.name, f.severity, f"{r.member}: {f.message}", f.details))
                    names.add(f.name)
        entry: dict[str, Any] = {
            "type": cfg.type, "pooling": cfg.pooling, "layer": cfg.layer,
            "trainable_params": runs[0].trainable_params,
            "total_params": runs[0].total_params,
            "loss": runs[0].loss_info,
            "members": [r.member for r in runs],
            "selected_epochs": {r.member: r.best_epoch for r in runs},
            "stopped_early": {r.member: r.stopped_early for r in runs},
            "thresholds": {r.member: r.thresholds for r in runs} if runs[0].thresholds is not None else None,
            "splits": splits,
            "test_ci": {k: [lo, hi] for k, (_, lo, hi) in test_ci.items()},
            "flags": [f.to_dict() for f in flags],
        }
        if task.type != "regression":
            from fmprobe.evaluate.subgroups import subgroup_report

            entry["subgroups"] = subgroup_report(  # test split, seed-mean scores, seed-mean thresholds
                task.type, targets["test"], mean_test, class_names=label_names,
                thresholds=None if runs[0].thresholds is None else np.mean([r.thresholds for r in runs], axis=0))
            entry["calibration_test"] = {
                r.member: calibration(task.type, targets["test"], r.scores["test"], class_names=label_names)
                for r in runs
            }
        heads[cfg.name] = entry
        all_flags += [{"head": cfg.name, **f.to_dict()} for f in flags]

    best = max(head_names, key=lambda h: _orderable(heads[h]["splits"]["val"]["mean"][primary], primary))
    return {
        "experiment": exp.name,
        "config_hash": config_hash,
        "task": {"type": task.type, "targets": task.targets, "class_names": class_names,
                 "primary_metric": primary,
                 "headline_metrics": [primary] + [m for m in METRICS_BY_TASK[task.type] if m != primary]},
        "split": split_info,
        "seeds": exp.train.seeds,
        "folds": split_info.get("folds"),  # kfold: every (fold, seed) member is scored on the same test set
        "ci_level": exp.eval.ci,
        "bootstrap": {"resamples": exp.eval.bootstrap, "unit": "group" if test_groups is not None else "sample",
                      "statistic": "mean over seeds (and folds), each resample shared by all of them", "method": "percentile"},
        "baseline": {"test": baseline,
                     "description": _baseline_description(task.type)},
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
        "prediction_hashes": {h: [head_hash(exp, h), hashes[h]] for h in head_names},
        "skipped": [list(s) for s in skipped],
    }


def _orderable(value: float, metric: str) -> float:
    if value != value:
        return -np.inf
    return value if higher_is_better(metric) else -value


def _baseline_description(task_type: str) -> str:
    return {
        "binary": "constant score = training prevalence (AUROC 0.5; AP = test prevalence).",
        "multiclass": "training class priors for every sample (predicts the majority class; balanced accuracy = 1/K).",
        "multilabel": "constant score per label = training prevalence (mAP = test prevalence, AUROC 0.5).",
        "regression": "training mean for every sample (R² ≤ 0).",
    }[task_type]
