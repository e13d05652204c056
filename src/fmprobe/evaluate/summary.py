"""metrics.json for a run, assembled in this one place: every number with its split, seeds, CI, baseline and flags.

Per head: metrics per split and seed, mean and sd over seeds, and on test a percentile bootstrap CI of
the seed-mean metric (the same resamples, of groups when there are groups, applied to every seed).
The head reported as the result is the one with the best mean validation primary metric; test is never
used to choose anything. The segmentation decoders' block, the grid selection and the wall time join here too;
what other runs predicted (for ``identical_predictions``) and each head's configuration identity are given by
the caller, which knows the runs folder. With ``train.shots`` / ``train.label_fractions`` the label-efficiency
block (``evaluate.efficiency``) joins too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fmprobe.config import FITTED_HEADS, METRICS_BY_TASK, Experiment
from fmprobe.evaluate.baselines import baseline_metrics
from fmprobe.evaluate.bootstrap import resample_weights, scalar_metrics
from fmprobe.evaluate.efficiency import summarise_efficiency
from fmprobe.evaluate.task import TaskMetric
from fmprobe.evaluate.flags import Flag, compute_flags, not_converged, prediction_hash
from fmprobe.evaluate.results import SPLITS, HeadRun, ProbeResults, SplitData
from fmprobe.evaluate.segmentation import summarise_segmentation
from fmprobe.evaluate.subgroups import subgroup_report
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.evaluate.thresholds import calibration


FITTED_SEEDS = ("deterministic: fitted on the same labelled rows, every seed gives the same fit (sd 0); a seed only "
                "matters where it draws the labelled rows (few-shot episodes, label fractions)")


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


def prediction_hashes(task: ResolvedTask, results: ProbeResults, test_ids: list[str]) -> dict[str, str]:
    """Per head, the hash ``compute_flags`` makes of its seed-mean test outputs (in sample-id order)."""
    heads = dict.fromkeys(r.head for r in results.runs)
    return {h: prediction_hash(_seed_mean_test_scores([r for r in results.runs if r.head == h]), sample_ids=test_ids)
            for h in heads}  # fmt: skip


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
    other_runs: dict[str, tuple[str, str]],
    grid: dict[str, Any] | None = None,
    wall_seconds: float | None = None,
) -> dict[str, Any]:
    """The whole metrics.json. ``head_identities``: each head's configuration identity; ``other_runs``:
    ``{run/head: (configuration identity, test output hash)}`` of earlier runs."""
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
    earlier = other_runs

    heads: dict[str, Any] = {}
    all_flags: list[dict[str, Any]] = []
    for cfg in exp.heads:
        runs = sorted((r for r in results.runs if r.head == cfg.name), key=lambda r: (r.fold or 0, r.seed))
        splits = {}
        for part in SPLITS:
            # Folds differ in train/val samples; test is the same for every member.
            per_seed = [scalar_metrics(metric_for(r)((r.data.targets if r.data else targets)[part], r.scores[part]))
                        for r in runs]
            values, mean, sd = _mean_sd(per_seed)
            splits[part] = {"per_seed": values, "mean": mean, "sd": sd}
        test_ci = seed_mean_bootstrap([metric_for(r) for r in runs], targets["test"], [r.scores["test"] for r in runs],
                                      groups=test_groups, n_resamples=exp.eval.bootstrap, ci=exp.eval.ci)
        others = {k: v for k, v in earlier.items()}
        others.update({f"this run/{h}": (head_identities[h], hashes[h]) for h in head_names if h != cfg.name})
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
            config_hash=head_identities[cfg.name], sample_ids=test_ids, other_runs=others,
        )
        # A collapsed seed is hidden by the seed mean: check each seed's outputs too.
        names = {f.name for f in flags}
        for r in runs:
            for f in compute_flags(task.type, targets["test"], r.scores["test"], eval_cfg=exp.eval,
                                   class_names=label_names, thresholds=r.thresholds, groups=test_groups):
                if f.name not in names:
                    flags.append(Flag(f.name, f.severity, f"{r.member}: {f.message}", f.details))
                    names.add(f.name)
        fitted = cfg.type in FITTED_HEADS
        if fitted:
            flag = not_converged({r.member: r.selected or {} for r in runs})
            if flag is not None:
                flags.append(flag)
        entry: dict[str, Any] = {
            "type": cfg.type, "pooling": cfg.pooling, "layer": cfg.layer,
            "trainable_params": runs[0].trainable_params,
            "total_params": runs[0].total_params,
            "loss": runs[0].loss_info,
            "members": [r.member for r in runs],
            "selected_epochs": None if fitted else {r.member: r.best_epoch for r in runs},
            "stopped_early": None if fitted else {r.member: r.stopped_early for r in runs},
            "selected": {r.member: r.selected for r in runs if r.selected} if fitted else None,
            "seeds_note": FITTED_SEEDS if fitted else None,
            "thresholds": {r.member: r.thresholds for r in runs} if runs[0].thresholds is not None else None,
            "splits": splits,
            "test_ci": {k: [lo, hi] for k, (_, lo, hi) in test_ci.items()},
            "flags": [f.to_dict() for f in flags],
        }
        if task.type != "regression":
            entry["subgroups"] = subgroup_report(  # test split, seed-mean scores, seed-mean thresholds
                task.type, targets["test"], mean_test, class_names=label_names,
                thresholds=None if runs[0].thresholds is None else np.mean([r.thresholds for r in runs], axis=0))
            entry["calibration_test"] = {
                r.member: calibration(task.type, targets["test"], r.scores["test"], class_names=label_names)
                for r in runs
            }
        heads[cfg.name] = entry
        all_flags += [{"head": cfg.name, **f.to_dict()} for f in flags]

    best = max(head_names, key=lambda h: _orderable(heads[h]["splits"]["val"]["mean"][primary], task))
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
        "bootstrap": {"resamples": exp.eval.bootstrap, "unit": "group" if test_groups is not None else "sample",
                      "statistic": "mean over seeds (and folds), each resample shared by all of them", "method": "percentile"},
        "baseline": {"test": baseline,
                     "description": _baseline_description(task.type)},
        "selection": {
            "best_head": best,
            "rule": f"by the highest mean validation {primary} over seeds",
            "epochs": f"Each seed's checkpoint is its best validation-{primary} epoch."
                      + (f" Fitted heads (knn, prototype, logreg) have no epochs: their k / C is chosen on validation "
                         f"{primary} (ties: the smaller)." if any(h.type in FITTED_HEADS for h in exp.heads) else ""),
            "thresholds": ("Decision thresholds tuned on validation "
                           f"({exp.eval.thresholds}) and applied unchanged to test."
                           if task.type in ("binary", "multilabel") else ""),
        },
        "heads": heads,
        "flags": all_flags,
        "prediction_hashes": {h: [head_identities[h], hashes[h]] for h in head_names},
        "skipped": [list(s) for s in skipped],
    }
    if results.segmentation is not None:
        metrics["segmentation"] = _segmentation(exp, results, split, heads)
    if results.efficiency:
        metrics["efficiency"] = summarise_efficiency(exp, task, results.efficiency, targets["test"], test_groups,
                                                     baseline)  # fmt: skip
    if grid is not None:
        metrics["selection"]["grid"] = grid
    if wall_seconds is not None:
        metrics["wall_seconds"] = round(wall_seconds, 2)
    return metrics


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
        "multiclass": "training class priors for every sample (predicts the majority class; balanced accuracy = 1/K).",
        "multilabel": "constant score per label = training prevalence (mAP = test prevalence, AUROC 0.5).",
        "regression": "training mean for every sample (R² ≤ 0).",
    }[task_type]
