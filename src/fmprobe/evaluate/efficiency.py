"""metrics.json's ``efficiency`` block: every head at every label budget, with an interval, flags and the labels
needed to reach a target.

Per budget (K examples per class, or a share of the training groups) a head has R repeats (episodes or seeds),
each fitted on its own labelled subset and scored on the whole test split. The point is the mean over repeats of
each metric. The interval of the primary metric is a two-level percentile bootstrap: each of the
``eval.bootstrap`` resamples draws one repeat uniformly and the test groups (samples without groups) with
replacement, and scores that repeat on that resample. It spans what one user labelling that many examples would
see — the luck of which examples were labelled and the sampling of the test population together — so its lower
bound is what "labels needed" reads: the smallest budget whose lower bound reaches ``eval.target`` (upper bound,
for an error metric). The resamples are shared by every budget and head (paired), and their test-group draws
are the same as the run's CIs.

Flags per budget: below_baseline (the interval against the run's trivial baseline), majority_collapse and
constant_output on each repeat's test outputs, tiny_class on each repeat's labelled subset (counted over repeats).
A budget that could not be drawn is listed with its reason, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fmprobe.config import Experiment
from fmprobe.evaluate.bootstrap import resample_weights
from fmprobe.evaluate.flags import (
    Flag,
    below_baseline,
    constant_output,
    majority_collapse,
    tiny_class,
)
from fmprobe.evaluate.kernels import ranked
from fmprobe.evaluate.metrics import higher_is_better
from fmprobe.evaluate.results import EfficiencyPoint, HeadRun
from fmprobe.evaluate.task import ResolvedTask

PROTOCOLS = {
    "shots": "K labelled examples per class, each from its own training group (K patients per class), drawn "
             "independently in each episode; the episode index is the repeat's seed",
    "fraction": "a share f of the training groups, the first ceil(f x groups) of a stratified order drawn per seed "
                "(every share contains the smaller ones); all of those groups' samples are labelled",
}  # fmt: skip
SELECTION = ("each repeat chooses its k / C, epoch and decision thresholds on the whole validation split, as the "
             "full run does (a user with few labels may not have one that large: give a single k / C to fix them); "
             "features are z-scored with the statistics of the whole training split's images, never its labels")


def summarise_efficiency(exp: Experiment, task: ResolvedTask, points: Sequence[EfficiencyPoint], y_test: np.ndarray,
                         test_groups: Sequence[str] | None, baseline: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    primary, n_resamples, ci = task.primary, exp.eval.bootstrap, exp.eval.ci
    weights = np.concatenate(list(resample_weights(len(y_test), groups=test_groups, n_resamples=n_resamples,
                                                   seed=0))) if n_resamples else np.empty((0, len(y_test)))  # fmt: skip
    entries = [_point(exp, task, p, y_test, test_groups, weights, baseline) for p in points]
    alpha = (1 - ci) / 2
    return {
        "metric": primary,
        "protocols": {k: v for k, v in PROTOCOLS.items() if any(p.protocol == k for p in points)},
        "selection": SELECTION,
        "interval": (f"{alpha * 100:g}-{(1 - alpha) * 100:g} percentiles of {primary} over {n_resamples} "
                     "resamples, each one repeat (episode or seed) drawn uniformly, scored on a bootstrap resample "
                     f"of the test {'groups' if test_groups is not None else 'samples'}: labelling luck and test "
                     "sampling together; the point is the mean over repeats on the whole test split"),
        "trained_episodes": exp.train.trained_episodes, "episodes": exp.train.episodes,
        "target": exp.eval.target,
        "points": entries,
        "labels_needed": None if exp.eval.target is None else labels_needed(entries, exp.eval.target, primary),
    }


def _point(exp: Experiment, task: ResolvedTask, point: EfficiencyPoint, y: np.ndarray,
           groups: Sequence[str] | None, weights: np.ndarray, baseline: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    entry: dict[str, Any] = {"protocol": point.protocol, "value": point.value, "head": point.head}
    if point.missing is not None:
        return {**entry, "status": "missing", "missing": point.missing}
    primary, runs = task.primary, point.runs
    # rows: each repeat on the whole test split, then each resample with its drawn repeat
    values = repeat_rows(task, runs, y, np.arange(len(runs)), np.ones((len(runs), len(y))))
    drawn = np.random.default_rng(0).integers(len(runs), size=len(weights))
    draws = repeat_rows(task, runs, y, drawn, weights, rank=ranked(primary))[primary] if len(weights) else np.empty(0)
    names = list(values)
    with np.errstate(all="ignore"):
        table = np.stack([values[k] for k in names], axis=1)
        mean = dict(zip(names, np.nanmean(table, axis=0).tolist()))
        sd = dict(zip(names, (np.nanstd(table, axis=0, ddof=1) if len(runs) > 1 else table[0] * np.nan).tolist()))
    per_repeat = [dict(zip(names, row)) for row in table.tolist()]
    draws = draws[~np.isnan(draws)]
    alpha = (1 - exp.eval.ci) / 2
    lo, hi = (float(v) for v in np.quantile(draws, [alpha, 1 - alpha])) if draws.size else (np.nan, np.nan)
    flags = point_flags(exp, task, runs, y, (mean[primary], lo, hi), baseline[primary])
    return {
        **entry, "status": "ok", "missing": None,
        "repeats": [r.seed for r in runs],
        "labelled": {"samples": [len(_labelled(r).ids["train"]) for r in runs],
                     "groups": [len(set(_labelled(r).groups["train"])) for r in runs]},
        "test": {"mean": mean, "sd": sd},
        "per_repeat": [p[primary] for p in per_repeat],
        "interval": [lo, hi],
        "selected": selection_counts(runs),
        "flags": [f.to_dict() for f in flags],
    }


def repeat_rows(task: ResolvedTask, runs: Sequence[HeadRun], y: np.ndarray, repeat: np.ndarray,
                weights: np.ndarray, *, rank: bool = True, cells: int = 2**22) -> dict[str, np.ndarray]:  # fmt: skip
    """Every metric per row (``rank`` False: but the ranking ones): row i scores repeat ``repeat[i]`` (its test
    scores and thresholds) with sample weights ``weights[i]``; vectorised in chunks of about ``cells`` scores."""
    scores = np.stack([r.scores["test"] for r in runs])
    thresholds = None if runs[0].thresholds is None else np.array([r.thresholds for r in runs])
    step = max(1, cells // scores[0].size)
    metric = task.metric()
    parts = [metric.rows(y, scores, weights[i : i + step], thresholds, which=repeat[i : i + step], rank=rank)
             for i in range(0, len(repeat), step)]  # fmt: skip
    return {k: np.concatenate([np.asarray(p[k], dtype=np.float64) for p in parts]) for k in parts[0]}


def _labelled(run: HeadRun):
    assert run.data is not None, "an efficiency repeat carries its labelled subset"
    return run.data


def selection_counts(runs: Sequence[HeadRun]) -> dict[str, dict[str, int]] | None:
    """How often each k / C was chosen over the repeats (fitted heads), e.g. ``{"k": {"10": 37, "20": 63}}``."""
    out: dict[str, dict[str, int]] = {}
    for run in runs:
        for name in ("k", "C"):
            if run.selected and name in run.selected:
                key = str(run.selected[name])
                out.setdefault(name, {})[key] = out.get(name, {}).get(key, 0) + 1
    return out or None


def point_flags(exp: Experiment, task: ResolvedTask, runs: Sequence[HeadRun], y: np.ndarray,
                interval: tuple[float, float, float], baseline: float) -> list[Flag]:  # fmt: skip
    """below_baseline on the interval; collapse, constant output and tiny classes on each repeat, counted."""
    flags = [below_baseline(task.primary, interval, baseline)]
    seen: dict[str, tuple[Flag, int]] = {}
    for run in runs:
        labelled = _labelled(run).targets["train"]
        for flag in (
            majority_collapse(task.type, y, run.scores["test"], thresholds=run.thresholds,
                              class_names=task.label_names, n_resamples=0),
            constant_output(task.type, run.scores["test"], y_true=y if task.type == "regression" else None),
            tiny_class(task.type, {"labelled": labelled}, class_names=task.label_names,
                       min_count=exp.eval.tiny_class),
        ):  # fmt: skip
            if flag is not None:
                first, count = seen.get(flag.name, (flag, 0))
                seen[flag.name] = (first, count + 1)
    for first, count in seen.values():
        severity = "error" if first.severity == "error" and 2 * count > len(runs) else "warning"
        flags.append(Flag(first.name, severity, f"{count} of {len(runs)} repeats; e.g. {first.message}",
                          {**first.details, "repeats": count, "of": len(runs)}))  # fmt: skip
    return [f for f in flags if f is not None]


def labels_needed(points: Sequence[dict[str, Any]], target: float, metric: str) -> dict[str, dict[str, Any]]:
    """Per head and protocol, the smallest budget whose interval bound reaches ``target`` (the lower bound;
    the upper one for an error metric), with its labelled groups and samples (medians over repeats)."""
    higher = higher_is_better(metric)
    out: dict[str, dict[str, Any]] = {}
    for head in dict.fromkeys(p["head"] for p in points):
        for protocol in dict.fromkeys(p["protocol"] for p in points if p["head"] == head):
            tried = sorted((p for p in points if p["head"] == head and p["protocol"] == protocol),
                           key=lambda p: p["value"])  # fmt: skip
            reached = next((p for p in tried if p["status"] == "ok"
                            and (p["interval"][0] >= target if higher else p["interval"][1] <= target)), None)  # fmt: skip
            out.setdefault(head, {})[protocol] = None if reached is None else {
                "value": reached["value"],
                "groups": float(np.median(reached["labelled"]["groups"])),
                "samples": float(np.median(reached["labelled"]["samples"])),
            }  # fmt: skip
    return out
