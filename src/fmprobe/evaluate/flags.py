"""Sanity flags: named, machine-readable warnings that a result should not be believed as it stands.

Each check returns a :class:`Flag` or None; :func:`compute_flags` runs every check whose inputs are given.
Severity ``error`` means the number is misleading as reported (collapse, leak, a config that had no
effect); ``warning`` means it needs care (wide CI over the baseline, overfitting, tiny classes, a metric
undefined on test, training that had not converged); ``info`` is a fact worth knowing that casts no doubt
(a run reproduced exactly by another with the same configuration). The checks across runs
(``identical_predictions``, ``reproduced``) are made by the runs index, which sees every finished run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from fmprobe.config import EvalConfig
from fmprobe.errors import FmprobeError
from fmprobe.evaluate.baselines import chance_level
from fmprobe.evaluate.bootstrap import bootstrap_metrics, resample_weights
from fmprobe.evaluate.task import TaskMetric
from fmprobe.evaluate.metrics import check_inputs, higher_is_better, output_names
from fmprobe.evaluate.thresholds import apply_thresholds


@dataclass(frozen=True)
class Flag:
    name: str
    severity: Literal["error", "warning", "info"]
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def majority_collapse(
    task_type: str,
    y_true: Any,
    y_score: Any,
    *,
    thresholds: Any = None,
    class_names: Sequence[str] | None = None,
    max_share: float = 0.9,
    ba_interval: tuple[float, float, float] | None = None,
    groups: Sequence[Any] | None = None,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> Flag | None:
    """The predictions pile onto one class, or are not distinguishable from chance.

    binary/multiclass: ``error`` when the most predicted class takes more than ``max_share`` of the
    predictions while its true share is at most ``max_share``; ``warning`` when (only) the balanced-accuracy
    CI reaches down to chance (``baselines.chance_level``: 1 / the classes present in test). Pass the reported
    CI as ``ba_interval`` so the flag quotes the number the table shows; without it, it is bootstrapped here.
    multilabel: the same share test per label (a label predicted constant is the extreme case).
    """
    if task_type == "regression":
        return None
    y, s = check_inputs(task_type, y_true, y_score)
    pred = apply_thresholds(task_type, s, thresholds)
    if task_type == "multilabel":
        names = output_names(class_names, s.shape[1], "class_names")
        collapsed = {}
        for c, n in enumerate(names):
            hit = _share_collapse(y[:, c], pred[:, c], 2, max_share)
            if hit:
                collapsed[n] = hit
        if not collapsed:
            return None
        severity = "error" if len(collapsed) == len(names) else "warning"
        return Flag("majority_collapse", severity,
                    f"{len(collapsed)} of {len(names)} labels are predicted (nearly) constant although their "
                    f"true values vary: {sorted(collapsed)[:10]}", {"labels": collapsed, "max_share": max_share})
    k = 2 if task_type == "binary" else s.shape[1]
    names = ["negative", "positive"] if task_type == "binary" else output_names(class_names, k, "class_names")
    hit = _share_collapse(y, pred, k, max_share)
    level = chance_level(task_type, y, names)
    chance = level["balanced_accuracy"]
    if level["classes_present"] < 2:  # balanced accuracy over one class says nothing about chance
        ba_interval = None
    elif ba_interval is None and n_resamples > 0:
        boot = bootstrap_metrics(TaskMetric(task_type, thresholds=thresholds), y, s, groups=groups,
                                 n_resamples=n_resamples, ci=ci, seed=seed)
        ba_interval = boot["balanced_accuracy"]
    near_chance = ba_interval is not None and not np.isnan(ba_interval[1]) and ba_interval[1] <= chance
    if not hit and not near_chance:
        return None
    details: dict[str, Any] = {"max_share": max_share, "chance_balanced_accuracy": chance,
                               "classes_present": level["classes_present"]}
    parts = []
    if hit:
        details.update(hit, class_name=names[hit["class"]])
        parts.append(f"{hit['predicted_share']:.0%} of predictions are class '{names[hit['class']]}' "
                     f"whose true share is {hit['true_share']:.0%}")
    if near_chance:
        details["balanced_accuracy_interval"] = [float(v) for v in ba_interval]
        parts.append(f"the balanced-accuracy CI [{ba_interval[1]:.3f}, {ba_interval[2]:.3f}] "
                     f"reaches chance ({chance:.3f} = 1/{level['classes_present']} classes present in test)")
    return Flag("majority_collapse", "error" if hit else "warning", "; ".join(parts), details)


def _share_collapse(y: np.ndarray, pred: np.ndarray, k: int, max_share: float) -> dict[str, Any] | None:
    pred_share = np.bincount(pred, minlength=k) / len(pred)
    true_share = np.bincount(y, minlength=k) / len(y)
    c = int(np.argmax(pred_share))
    if pred_share[c] > max_share and true_share[c] <= max_share:
        return {"class": c, "predicted_share": float(pred_share[c]), "true_share": float(true_share[c])}
    return None


def constant_output(task_type: str, y_score: Any, *, y_true: Any = None, rel_tol: float = 1e-3) -> Flag | None:
    """Outputs that barely vary across samples carry no information about the sample.

    Probabilities are compared on the logit scale (std < ``rel_tol``), regression outputs against the
    spread of the targets (std < ``rel_tol`` x std of y_true, or of 1 without targets).
    ``error`` when every output column is constant, ``warning`` when some are.
    """
    s = np.asarray(y_score, dtype=np.float64)
    s = s.reshape(len(s), -1)
    if task_type == "regression":
        scale = np.ones(s.shape[1])
        if y_true is not None:
            y_std = np.asarray(y_true, dtype=np.float64).reshape(len(s), -1).std(axis=0)
            scale = np.where(y_std > 0, y_std, 1.0)
        spread = s.std(axis=0) / scale
    else:
        p = np.clip(s, 1e-7, 1 - 1e-7)
        spread = np.log(p / (1 - p)).std(axis=0)
    constant = np.flatnonzero(spread < rel_tol)
    if constant.size == 0:
        return None
    severity = "error" if constant.size == s.shape[1] else "warning"
    return Flag("constant_output", severity,
                f"{constant.size} of {s.shape[1]} output columns are constant across samples",
                {"columns": constant.tolist(), "spread": spread[constant].tolist(), "rel_tol": rel_tol})


def below_baseline(metric: str, model: Sequence[float], baseline: float) -> Flag | None:
    """The model is not shown to beat the trivial predictor on ``metric``.

    ``model`` is ``(point, lo, hi)`` (a CI from the bootstrap; lo/hi may be NaN without one).
    Higher-is-better metric: ``error`` if the point estimate is <= the baseline's, ``warning`` if the
    point is above it but the CI's lower bound is not (the gain is within sampling noise).
    Lower-is-better metrics (mae, rmse) mirror this with the upper bound.
    """
    point, lo, hi = (float(v) for v in model)
    details = {"metric": metric, "model": [point, lo, hi], "baseline": float(baseline)}
    if np.isnan(point) or np.isnan(baseline):
        return Flag("below_baseline", "warning", f"cannot compare {metric} with the baseline: it is undefined", details)
    better = point > baseline if higher_is_better(metric) else point < baseline
    if not better:
        return Flag("below_baseline", "error",
                    f"{metric} {point:.4g} is no better than the trivial baseline's {baseline:.4g}", details)
    bound = lo if higher_is_better(metric) else hi
    if np.isnan(bound):
        return None
    clears = bound > baseline if higher_is_better(metric) else bound < baseline
    if clears:
        return None
    return Flag("below_baseline", "warning",
                f"{metric} {point:.4g} is above the baseline's {baseline:.4g} but its CI [{lo:.4g}, {hi:.4g}] "
                "includes it", details)


def prediction_hash(y_score: Any, *, sample_ids: Sequence[str] | None = None, decimals: int = 6) -> str:
    """Stable hash of outputs rounded to ``decimals`` (in sample-id order when ids are given)."""
    s = np.asarray(y_score, dtype=np.float64)
    h = hashlib.sha256()
    if sample_ids is not None:
        ids = np.asarray(sample_ids, dtype=str)
        order = np.argsort(ids, kind="mergesort")
        s = s[order]
        h.update("\n".join(ids[order]).encode())
    h.update(str(s.shape).encode())
    h.update(np.ascontiguousarray(np.round(s, decimals) + 0.0).tobytes())  # + 0.0 folds -0.0 into 0.0
    return h.hexdigest()


def identical_predictions(
    config_hash: str,
    output_hash: str,
    other_runs: Mapping[str, tuple[str, str]],
    *,
    y_score: Any = None,
    other_scores: Mapping[str, tuple[str, Any]] | None = None,
    atol: float = 1e-6,
) -> Flag | None:
    """A run whose outputs equal those of a differently configured run: the difference had no effect
    (a cache served the wrong features, an option was ignored, the head learned nothing).

    ``other_runs``: ``{run_id: (config_hash, output_hash)}``; ``other_scores``: ``{run_id: (config_hash,
    outputs)}`` for the near-identical test (max abs difference < ``atol``, same sample order).
    """
    same = sorted(rid for rid, (cfg, out) in other_runs.items() if cfg != config_hash and out == output_hash)
    near = []
    if other_scores:
        if y_score is None:
            raise FmprobeError("identical_predictions: other_scores needs this run's y_score")
        s = np.asarray(y_score, dtype=np.float64)
        for rid, (cfg, other) in other_scores.items():
            other = np.asarray(other, dtype=np.float64)
            if cfg != config_hash and rid not in same and other.shape == s.shape and np.max(np.abs(other - s)) < atol:
                near.append(rid)
    if not same and not near:
        return None
    runs = same + sorted(near)
    return Flag("identical_predictions", "error",
                f"outputs match {len(runs)} run(s) with a different config: {runs[:10]}; the config change had no "
                "effect on the predictions", {"identical": same, "near_identical": sorted(near), "atol": atol})


def reproduced(config_hash: str, output_hash: str, other_runs: Mapping[str, tuple[str, str]]) -> Flag | None:
    """Outputs equal to those of runs with the same configuration: a reproduction, which is expected (``info``).

    ``other_runs`` as for :func:`identical_predictions`; the configuration hash is the head's identity (what
    changes its predictions), so a head re-run under another name or beside other layers counts as the same.
    """
    same = sorted(rid for rid, (cfg, out) in other_runs.items() if cfg == config_hash and out == output_hash)
    if not same:
        return None
    return Flag("reproduced", "info", f"reproduced exactly (same configuration, same test outputs): {same[:10]}",
                {"identical": same})


def overfit_gap(metric: str, train_value: float, val_value: float, threshold: float) -> Flag | None:
    """Train beats validation by more than ``threshold`` at the selected epoch.

    Higher-is-better metrics: absolute gap ``train - val``. Error metrics (mae, rmse) have the scale
    of the target, so their gap is relative: ``(val - train) / |val|``.
    """
    if np.isnan(train_value) or np.isnan(val_value):
        return None
    if higher_is_better(metric):
        gap, kind = train_value - val_value, "absolute"
    else:
        gap, kind = (val_value - train_value) / max(abs(val_value), 1e-12), "relative"
    if gap <= threshold:
        return None
    return Flag("overfit_gap", "warning",
                f"train {metric} {train_value:.4g} vs validation {val_value:.4g}: {kind} gap {gap:.3g} > {threshold}",
                {"metric": metric, "train": float(train_value), "val": float(val_value), "gap": float(gap),
                 "kind": kind, "threshold": threshold})


def tiny_class(
    task_type: str, y_by_split: Mapping[str, Any], *, class_names: Sequence[str] | None = None, min_count: int = 5
) -> Flag | None:
    """A class (binary: either class; multilabel: a label's positives) with fewer than ``min_count``
    samples in some split: its metrics there are noise or undefined."""
    if task_type == "regression" or min_count <= 0:
        return None
    small: dict[str, dict[str, int]] = {}
    for split, y in y_by_split.items():
        y = np.asarray(y)
        if task_type == "multilabel":
            counts = y.reshape(len(y), -1).sum(axis=0).astype(int)
            names = output_names(class_names, len(counts), "class_names")
        else:
            k = 2 if task_type == "binary" else (len(class_names) if class_names is not None else int(y.max()) + 1)
            counts = np.bincount(y.reshape(-1).astype(np.int64), minlength=k)
            names = ["negative", "positive"] if task_type == "binary" else output_names(class_names, k, "class_names")
        for n, c in zip(names, counts, strict=True):
            if c < min_count:
                small.setdefault(split, {})[n] = int(c)
    if not small:
        return None
    listing = "; ".join(f"{split}: {', '.join(f'{n}={c}' for n, c in d.items())}" for split, d in small.items())
    return Flag("tiny_class", "warning", f"classes with fewer than {min_count} samples: {listing}",
                {"counts": small, "min_count": min_count})


def few_groups(groups: Sequence[Any], min_groups: int) -> Flag | None:
    """Too few independent units (patients, videos) in the evaluated split for its CI to hold its level.

    The group bootstrap can only recombine those few units. The expanded interval (``evaluate.bootstrap``)
    corrects for it down to 10 groups — measured coverage of a 95% CI: 92% at 10 groups of 20 samples, 87%
    at 5 (a plain percentile interval: 86-87% at 10) — so ``eval.min_groups`` defaults to 10.
    """
    n = len(set(groups))
    if n >= min_groups:
        return None
    return Flag("few_groups", "warning",
                f"the test split has only {n} groups: its bootstrap CI recombines {n} units and understates the "
                f"uncertainty (eval.min_groups is {min_groups}); use a larger test split or split.mode: kfold",
                {"n_groups": n, "min_groups": min_groups})


def undefined_metric(
    undefined: Mapping[str, str], used: Mapping[str, float | None], *, missing: Mapping[str, float] | None = None
) -> Flag | None:
    """Metrics that cannot be computed on test, and CIs that rest on only part of the resamples.

    ``undefined``: metric -> reason (``compute_metrics``' ``undefined``, e.g. a class absent from test) for the
    metrics no member defines on test; ``used``: metric -> share of bootstrap resamples its CI rests on (the
    others lack a class, so the CI is conditioned on it being present); ``missing``: class or label -> share of
    resamples without it. ``warning``: the number, or its CI, means less than it seems.
    """
    partial = {k: v for k, v in used.items() if v is not None and v < 1 and k not in undefined}
    if not undefined and not partial:
        return None
    parts = []
    if undefined:
        parts.append("undefined on test: " + "; ".join(f"{k} ({why})" for k, why in list(undefined.items())[:6]))
    if partial:
        shown = sorted(partial.items(), key=lambda kv: kv[1])[:6]
        parts.append("CIs resting on part of the bootstrap resamples (conditioned on every class being drawn): "
                     + ", ".join(f"{k} {v:.0%}" for k, v in shown))
        absent = {c: v for c, v in (missing or {}).items() if v > 0}
        if absent:
            parts.append("resamples without " + ", ".join(f"'{c}': {v:.0%}" for c, v in
                                                          sorted(absent.items(), key=lambda kv: -kv[1])[:6]))
    return Flag("undefined_metric", "warning", "; ".join(parts),
                {"undefined": dict(undefined), "ci_used": partial,
                 "missing_from_resamples": {c: v for c, v in (missing or {}).items() if v > 0}})


def missing_from_resamples(task_type: str, y_true: Any, *, class_names: Sequence[str] | None = None,
                           groups: Sequence[Any] | None = None, n_resamples: int, seed: int = 0) -> dict[str, float]:
    """Per class (multilabel: per label's positives and negatives), the share of bootstrap resamples without it:
    the same resamples as the CIs (same ``seed``)."""
    if task_type == "regression" or n_resamples == 0:
        return {}
    y = np.asarray(y_true)
    if task_type == "multilabel":
        y = y.reshape(len(y), -1).astype(bool)
        labels = output_names(class_names, y.shape[1], "class_names")
        columns = np.concatenate([y, ~y], axis=1)
        names = [f"{n} positives" for n in labels] + [f"{n} negatives" for n in labels]
    else:
        y = y.reshape(-1).astype(np.int64)
        if task_type == "binary":
            names = ["negative", "positive"]
        else:
            names = [str(c) for c in (class_names if class_names is not None else range(int(y.max()) + 1))]
        columns = y[:, None] == np.arange(len(names))[None, :]
    absent = np.zeros(len(names))
    for w in resample_weights(len(y), groups=groups, n_resamples=n_resamples, seed=seed):
        absent += ((w @ columns.astype(np.float64)) == 0).sum(axis=0)
    return {n: float(a / n_resamples) for n, a in zip(names, absent)}


def not_converged(selected: Mapping[str, tuple[int, int | None]]) -> Flag | None:
    """Members whose checkpoint is their last allowed epoch: validation was still improving when training
    ended, so more epochs may give a better model. ``selected``: member -> (best epoch, last allowed epoch)."""
    last = {m: (best, allowed) for m, (best, allowed) in selected.items() if allowed is not None and best >= allowed}
    if not last:
        return None
    listing = ", ".join(f"{m} (epoch {b} of {a})" for m, (b, a) in last.items())
    return Flag("not_converged", "warning",
                f"{len(last)} of {len(selected)} members chose their last allowed epoch: {listing}; validation was "
                "still improving when training ended — raise the epochs (train.epochs; adapt.stage2.epochs for "
                "staged) or the learning rate",
                {"members": {m: {"best_epoch": b, "epochs": a} for m, (b, a) in last.items()}})


def group_overlap(overlap: Sequence[tuple[str, Sequence[str]]], *, allowed: bool) -> Flag | None:
    """Groups on more than one side of the split (from ``check_leakage``); an error unless allowed."""
    if not overlap:
        return None
    shown = "; ".join(f"'{g}' in {', '.join(s)}" for g, s in list(overlap)[:10])
    return Flag("group_overlap", "warning" if allowed else "error",
                f"{len(overlap)} groups appear in more than one split ({shown})"
                + (" — allowed by split.allow_group_overlap" if allowed else ""),
                {"n_groups": len(overlap), "groups": [[g, list(s)] for g, s in list(overlap)[:100]]})


def compute_flags(
    task_type: str,
    y_true: Any,
    y_score: Any,
    *,
    eval_cfg: EvalConfig | None = None,
    class_names: Sequence[str] | None = None,
    thresholds: Any = None,
    groups: Sequence[Any] | None = None,
    primary_metric: str | None = None,
    model_interval: Sequence[float] | None = None,
    baseline_value: float | None = None,
    ba_interval: Sequence[float] | None = None,
    train_value: float | None = None,
    val_value: float | None = None,
    y_by_split: Mapping[str, Any] | None = None,
    overlap: Sequence[tuple[str, Sequence[str]]] | None = None,
    allow_group_overlap: bool = False,
    max_share: float = 0.9,
    seed: int = 0,
) -> list[Flag]:
    """Every flag whose inputs are given, for one run's evaluation split (``y_true``/``y_score``).

    below_baseline needs primary_metric + model_interval + baseline_value; overfit_gap needs
    primary_metric + train_value + val_value. The checks that need more than one run's outputs
    (identical_predictions, reproduced) are the runs index's (``experiments.twins``).
    """
    cfg = eval_cfg or EvalConfig()
    flags = [
        majority_collapse(task_type, y_true, y_score, thresholds=thresholds, class_names=class_names,
                          max_share=max_share, ba_interval=ba_interval, groups=groups,
                          n_resamples=cfg.bootstrap, ci=cfg.ci, seed=seed),
        constant_output(task_type, y_score, y_true=y_true if task_type == "regression" else None),
    ]
    if primary_metric is not None and model_interval is not None and baseline_value is not None:
        flags.append(below_baseline(primary_metric, model_interval, baseline_value))
    if primary_metric is not None and train_value is not None and val_value is not None:
        flags.append(overfit_gap(primary_metric, train_value, val_value, cfg.overfit_gap))
    if y_by_split is not None:
        flags.append(tiny_class(task_type, y_by_split, class_names=class_names, min_count=cfg.tiny_class))
    if overlap is not None:
        flags.append(group_overlap(overlap, allowed=allow_group_overlap))
    if groups is not None and cfg.min_groups > 0:
        flags.append(few_groups(groups, cfg.min_groups))
    return [f for f in flags if f is not None]
