"""Paired comparison of two models on the same test samples.

Both models are scored on the same resamples, so sample difficulty cancels and the interval of the
difference is much narrower than two separate CIs would suggest. A "model" may be a head's members (seeds,
folds): its score is then their mean metric, as everywhere else (``bootstrap.MemberMean``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.bootstrap import (
    MetricFn,
    evaluate_weighted,
    interval,
    n_units,
    p_value,
    resample_weights,
    scalar_metrics,
)


def paired_bootstrap(
    metric_fn: MetricFn,
    y_true: Any,
    score_a: Any,
    score_b: Any,
    *,
    metric: str | None = None,
    groups: Sequence[Any] | np.ndarray | None = None,
    n_resamples: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """``metric(a) - metric(b)`` with its interval and a two-sided bootstrap p-value.

    ``metric`` names the key when ``metric_fn`` returns a dict; with a :class:`MemberMean` metric, ``score_a``
    and ``score_b`` are each model's members' scores and the difference is between the two head scores. The
    interval is ``bootstrap.interval``'s (the same as every other CI) and the p-value ``bootstrap.p_value``:
    below alpha exactly when 0 lies outside the (1 - alpha) interval, so its error rate is that interval's.
    Resamples where the metric is undefined for either model are dropped (``n_dropped``).
    """
    if n_resamples < 1:
        raise FmprobeError(f"paired_bootstrap needs n_resamples >= 1, got {n_resamples}")
    y_true = np.asarray(y_true)
    point_a, point_b = scalar_metrics(metric_fn(y_true, score_a)), scalar_metrics(metric_fn(y_true, score_b))
    key = _key(point_a, metric)
    point = point_a[key] - point_b[key]
    diffs = []
    for w in resample_weights(len(y_true), groups=groups, n_resamples=n_resamples, seed=seed):
        diffs.append(evaluate_weighted(metric_fn, y_true, score_a, w)[key]
                     - evaluate_weighted(metric_fn, y_true, score_b, w)[key])
    d = np.concatenate(diffs)
    units = n_units(len(y_true), groups)
    _, lo, hi = interval(d, point, ci=ci, units=units)
    return {"a": point_a[key], "b": point_b[key], "diff": float(point), "lo": lo, "hi": hi,
            "p_value": float("nan") if np.isnan(point) else p_value(d, units=units),
            "n_dropped": int(np.isnan(d).sum())}


def _key(point: dict[str, float], metric: str | None) -> str:
    """The metric to compare: ``metric``, or the single value a scalar metric_fn returns."""
    if metric is None:
        if list(point) == ["value"]:
            return "value"
        raise FmprobeError(f"metric_fn returns several metrics {sorted(point)}; pass metric=<name>")
    if metric not in point:
        raise FmprobeError(f"metric '{metric}' is not among {sorted(point)}")
    return metric


def align_predictions(
    a: pd.DataFrame,
    b: pd.DataFrame,
    *,
    id_column: str = "sample_id",
    split: str | None = "test",
    split_column: str = "split",
    same_columns: Sequence[str] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of two prediction tables in the same sample order (sorted by id).

    Refuses when the sample sets differ (a paired comparison on different samples compares the samples,
    not the models), when an id repeats, or when a ``same_columns`` column (e.g. the targets) disagrees.
    """
    a, b = _select(a, "A", id_column, split, split_column), _select(b, "B", id_column, split, split_column)
    ids_a, ids_b = set(a[id_column]), set(b[id_column])
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        raise FmprobeError(
            f"the two runs were evaluated on different {split or 'all'} samples: {len(only_a)} only in run A "
            f"(e.g. {only_a[:5]}), {len(only_b)} only in run B (e.g. {only_b[:5]}); compare runs made on the same split"
        )
    a = a.sort_values(id_column, kind="mergesort").reset_index(drop=True)
    b = b.sort_values(id_column, kind="mergesort").reset_index(drop=True)
    for col in same_columns:
        for name, df in (("A", a), ("B", b)):
            if col not in df.columns:
                raise FmprobeError(f"run {name}'s predictions have no column '{col}'")
        differ = ~_equal(a[col], b[col])
        if differ.any():
            raise FmprobeError(
                f"column '{col}' differs between the runs for {int(differ.sum())} samples "
                f"(e.g. {a.loc[differ, id_column].tolist()[:5]})"
            )
    return a, b


def _select(df: pd.DataFrame, name: str, id_column: str, split: str | None, split_column: str) -> pd.DataFrame:
    if id_column not in df.columns:
        raise FmprobeError(f"run {name}'s predictions have no '{id_column}' column")
    if split is not None:
        if split_column not in df.columns:
            raise FmprobeError(f"run {name}'s predictions have no '{split_column}' column to select '{split}'")
        df = df[df[split_column] == split]
    if df.empty:
        raise FmprobeError(f"run {name} has no {split or ''} predictions")
    dup = df[id_column][df[id_column].duplicated()].unique().tolist()
    if dup:
        raise FmprobeError(f"run {name} has repeated sample ids: {dup[:5]}")
    return df


def _equal(x: pd.Series, y: pd.Series) -> np.ndarray:
    """Element-wise equality that also works for array-valued cells (multilabel targets)."""
    return np.array([np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(x, y, strict=True)])
