"""metrics.json for a run, assembled in this one place: every number with its split, seeds, CI, baseline and flags.

A head's score on a split is one number, the mean over its members (seeds, folds) of each member's metric
(``bootstrap.MemberMean``): the table, the leaderboard, the gates, the flags and ``fmprobe compare`` all read
it. Per head: metrics per split and member, their mean and sd, and on test the CI of that mean (the same
resamples, of groups when there are groups, applied to every member; ``bootstrap.interval``) with the share of
resamples each CI rests on. The head reported as the result is the one with the best mean validation primary
metric; test is never used to choose anything. The segmentation decoders' block, the grid selection and the
wall time join here too. Each head's configuration identity and test-output hash are recorded
(``prediction_hashes``): the runs index compares them across every finished run (``experiments.twins``). With
``train.shots`` / ``train.label_fractions`` the label-efficiency block (``evaluate.efficiency``) joins too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fmprobe.config import FITTED_HEADS, METRICS_BY_TASK, PER_TARGET_METRICS, Experiment
from fmprobe.evaluate.baselines import baseline_metrics, chance_level
from fmprobe.evaluate.calibration import calibration, ece_interval
from fmprobe.evaluate.bootstrap import METHOD, MemberMean, bootstrap_metrics, member_summary, scalar_metrics
from fmprobe.evaluate.flags import (
    Flag,
    compute_flags,
    constant_output,
    majority_collapse,
    missing_from_resamples,
    not_converged,
    prediction_hash,
    solver_not_converged,
    undefined_metric,
)
from fmprobe.evaluate.efficiency import summarise_efficiency
from fmprobe.evaluate.task import TaskMetric
from fmprobe.evaluate.results import SPLITS, HeadRun, ProbeResults, SplitData
from fmprobe.evaluate.segmentation import summarise_segmentation
from fmprobe.evaluate.subgroups import subgroup_report
from fmprobe.evaluate.task import ResolvedTask


FITTED_SEEDS = ("deterministic: fitted on the same labelled rows, every seed gives the same fit (sd 0); a seed only "
                "matters where it draws the labelled rows (few-shot episodes, label fractions)")


THRESHOLD_RULES = {  # eval.thresholds -> how binary / multilabel decisions were made, as the summary states it
    "f1": "Decision thresholds tuned on validation (the best F1 per label) and applied unchanged to test.",
    "fixed": "Decisions at probability 0.5 (eval.thresholds: fixed) on every split; no threshold is fitted.",
}

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
    on_head: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The whole metrics.json. ``head_identities``: each head's configuration identity (what changes its
    predictions; ``identity_version`` names how it was made), recorded with its test-output hash for the
    runs index; ``on_head(done, total)`` after each head's bootstrap and flags (progress)."""
    targets, groups, test_ids = split.targets, split.groups, split.ids["test"]
    primary = task.primary
    label_names = task.label_names
    test_groups = groups["test"] if exp.data.group_column else None

    def metric_for(run: HeadRun) -> TaskMetric:
        return task.metric(run.thresholds)

    trivial = baseline_metrics(task.type, targets["train"], targets["test"], class_names=label_names,
                               target_names=list(task.targets))
    baseline = scalar_metrics(trivial)
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
        fitted = cfg.type in FITTED_HEADS
        if fitted:
            flag = solver_not_converged({r.member: r.selected or {} for r in runs})
            if flag is not None:
                flags.append(flag)
        entry: dict[str, Any] = {
            "type": cfg.type, "pooling": cfg.pooling, "layer": cfg.layer,
            "trainable_params": runs[0].trainable_params,
            "total_params": runs[0].total_params,
            "loss": runs[0].loss_info,
            "members": [r.member for r in runs],
            "selected_epochs": None if fitted else {r.member: r.best_epoch for r in runs},
            "epochs_allowed": None if fitted else {r.member: r.last_epoch for r in runs},
            "stopped_early": None if fitted else {r.member: r.stopped_early for r in runs},
            "selected": {r.member: r.selected for r in runs if r.selected} if fitted else None,
            "seeds_note": FITTED_SEEDS if fitted else None,
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
            entry["calibration_seed_mean"] = ece_interval(  # the seed-mean outputs, as every headline number
                task.type, targets["test"], mean_test, class_names=label_names, groups=test_groups,
                n_resamples=exp.eval.bootstrap, ci=exp.eval.ci)
        heads[cfg.name] = entry
        all_flags += [{"head": cfg.name, **f.to_dict()} for f in flags]
        if on_head is not None:
            on_head(len(heads), len(exp.heads))

    best = max(head_names, key=lambda h: _orderable(heads[h]["splits"]["val"]["mean"][primary], task))
    baseline_block: dict[str, Any] = {"test": baseline, "undefined": trivial["undefined"],  # {metric: why not}
                                      "description": _baseline_description(task.type)}
    if task.type in ("binary", "multiclass"):
        baseline_block["chance"] = chance_level(task.type, targets["test"], label_names)
    metrics = {
        "experiment": exp.name,
        "config_hash": config_hash,
        "task": {"type": task.type, "targets": list(task.targets),
                 "class_names": None if task.class_names is None else list(task.class_names),
                 "primary_metric": primary,
                 "headline_metrics": headline_metrics(task)},
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
            "epochs": f"Each seed's checkpoint is its best validation-{primary} epoch."
                      + (f" Fitted heads (knn, prototype, logreg) have no epochs: their k / C is chosen on validation "
                         f"{primary} (ties: the smaller)." if any(h.type in FITTED_HEADS for h in exp.heads) else ""),
            "thresholds": THRESHOLD_RULES[exp.eval.thresholds] if task.type in ("binary", "multilabel") else "",
        },
        "heads": heads,
        "flags": all_flags,
        "prediction_hashes": {h: [head_identities[h], hashes[h]] for h in head_names},
        "identity_version": identity_version,
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
    if task.type == "regression":
        metrics["task"]["rows_per_target"] = rows_per_target(task, split.targets)
    if results.training_inputs:
        metrics["training_inputs"] = {"stages": results.training_inputs,
                                      "curve_notes": curve_notes(task, exp, results.training_inputs)}
    return metrics


def curve_notes(task: ResolvedTask, exp: Experiment, stages: list[dict[str, Any]]) -> list[str]:
    """What a reader of the training curves must know to read them: what each stage trained on (so a jump at a
    stage boundary is explained where it shows) and what the train metric is."""
    notes = []
    drawn = [_drawn(s.get("augmentation")) for s in stages]
    if len(stages) > 1 and not drawn[0] and any(drawn[1:]):
        notes.append(
            "Stage 1 fits the head on cached features of un-augmented inputs; stage 2 trains on pixels with "
            f"{next(d for d in drawn if d)} (data.augment), which the head never saw: its training loss can jump at "
            "the stage boundary while the validation loss (un-augmented inputs) stays flat. Without augmentation "
            "stage 2 continues where stage 1 ended.")
    if task.type == "regression" and exp.loss.type in ("auto", "mse"):
        notes.append(
            f"train_{task.primary} is the {task.primary} of the outputs each training epoch produced (dropout and "
            "augmentation on). Heads fit targets z-scored with the training mean and std; R² does not change "
            "under that map, and for z-scored targets the mean squared error over the training set is 1 − R² (the "
            "loss averages it over the targets), so train R² and train_loss mirror each other (exactly for one "
            "target, on a pass over every training sample).")
    return notes


def _drawn(augmentation: dict[str, Any] | None) -> str:
    """What a training draw changes, in words ("" when nothing)."""
    aug = augmentation or {}
    parts = [f"random crops after a x{aug['crop_scale']:g} resize" if (aug.get("crop_scale") or 1) != 1 else "",
             "horizontal flips" if aug.get("hflip") else ""]
    return " and ".join(p for p in parts if p)


def headline_metrics(task: ResolvedTask) -> list[str]:
    """The metrics a report leads with: the primary, then the task's others. Several regression targets are in
    different units (years, MMSE points): their headlines are per target, never means over targets."""
    if task.type == "regression" and len(task.targets) > 1:
        per_target = [f"{m}/{t}" for t in task.targets for m in PER_TARGET_METRICS["regression"]]
        return [task.primary] + [m for m in per_target if m != task.primary]
    return [task.primary] + [m for m in METRICS_BY_TASK[task.type] if m != task.primary]


def rows_per_target(task: ResolvedTask, targets: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Per regression target and split, the rows with a value: what its metrics, CIs and baselines rest on."""
    return {name: {part: int(np.isfinite(np.asarray(y, dtype=np.float64).reshape(len(y), -1)[:, c]).sum())
                   for part, y in targets.items()} for c, name in enumerate(task.targets)}


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
