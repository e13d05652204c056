"""Bootstrap CIs, resampling groups (patients, videos) when given: one interval definition for every number.

Each resample is a row of multiplicities ``W[b, i]`` (how often sample i was drawn). A plain metric
function is called on the repeated samples; a :class:`WeightedMetric` (e.g. ``evaluate.task.TaskMetric``)
instead evaluates all resamples at once from the weights (same numbers as scikit-learn on the
repeated data, tested), which makes 1000 resamples cost about as much as a few metric calls.

The interval is the *expanded percentile* interval (Hesterberg 2015, "What teachers should know about the
bootstrap", The American Statistician 69:371): the percentile interval taken at quantile levels widened for
the number n of resampled units (groups, or samples without groups), as if its normal quantile z were
sqrt(n / (n - 1)) * t_{n-1}. A plain percentile interval is too narrow when few units are resampled: with 10
groups of 20 samples sharing half their variance within a group it covered the truth in 86% of simulated data
sets (goal 95%), the expanded one in 90-91% (MAE 0.900, AUROC 0.908; at 20 groups 0.917 and 0.922; 1000 sets
each, tests/test_bootstrap.py). With hundreds of units the two coincide.

A head's score is :class:`MemberMean`: the mean over its members (seeds, folds) of each member's metric, each
resample shared by all members. Resamples where a metric is undefined (a class missing from the resample) are
left out of its interval and counted: ``BootstrapResult.used`` is the share each interval rests on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
from scipy import stats

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.kernels import nanmean

MetricFn = Callable[[np.ndarray, np.ndarray], Any]


@runtime_checkable
class WeightedMetric(Protocol):
    """A metric that also scores many resamples at once from multiplicity weights ``[b, n]``."""

    def __call__(self, y_true: Any, y_score: Any) -> Any: ...

    def weighted(self, y_true: Any, y_score: Any, weights: np.ndarray) -> Mapping[str, np.ndarray] | np.ndarray: ...

_CHUNK_CELLS = 4_000_000  # resamples x samples held in memory at once
METHOD = ("expanded percentile (Hesterberg 2015): the percentile interval at quantile levels widened for n "
          "resampled units, its normal quantile replaced by sqrt(n/(n-1)) t_{n-1}")


class Interval(NamedTuple):
    point: float
    lo: float
    hi: float


class BootstrapResult(dict):
    """``{metric: Interval(point, lo, hi)}``; ``.dropped[metric]`` counts resamples where it was undefined."""

    def __init__(self, intervals: dict[str, Interval], dropped: dict[str, int], n_resamples: int):
        super().__init__(intervals)
        self.dropped = dropped
        self.n_resamples = n_resamples

    @property
    def used(self) -> dict[str, float | None]:
        """Per metric, the share of resamples its interval rests on (None without resamples)."""
        if self.n_resamples == 0:
            return {k: None for k in self}
        return {k: 1 - self.dropped[k] / self.n_resamples for k in self}


@dataclass(frozen=True)
class MemberMean:
    """A head's score: the mean over its members (seeds, folds) of each member's metric on its own outputs.

    Called with the members' scores, one array per member (``[scores_0, scores_1, ...]``); ``metrics`` holds
    one metric per member (their decision thresholds differ) or a single one for all. A member whose metric is
    undefined is left out of the mean; NaN when no member defines it.
    """

    metrics: tuple[MetricFn, ...]

    def _pairs(self, scores: Sequence[Any]) -> list[tuple[MetricFn, Any]]:
        if len(self.metrics) not in (1, len(scores)):
            raise FmprobeError(f"{len(self.metrics)} metrics for {len(scores)} members")
        fns = self.metrics if len(self.metrics) == len(scores) else self.metrics * len(scores)
        return list(zip(fns, scores))

    def __call__(self, y_true: Any, scores: Sequence[Any]) -> dict[str, float]:
        per = [scalar_metrics(m(y_true, s)) for m, s in self._pairs(scores)]
        return {k: float(nanmean(np.array([[p[k]] for p in per]), axis=0)[0]) for k in per[0]}

    def weighted(self, y_true: Any, scores: Sequence[Any], weights: np.ndarray) -> dict[str, np.ndarray]:
        per = [evaluate_weighted(m, y_true, s, weights) for m, s in self._pairs(scores)]
        return {k: nanmean(np.stack([p[k] for p in per]), axis=0) for k in per[0]}


def member_summary(
    per_member: Sequence[Mapping[str, float]],
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float]]:
    """Per metric: the members' values, their mean (``MemberMean``'s point) and their sd, both over the members
    that define it (NaN when none, or fewer than two, do)."""
    values = {k: [float(p[k]) for p in per_member] for k in per_member[0]}
    mean, sd = {}, {}
    for k, v in values.items():
        defined = np.asarray(v)[~np.isnan(v)]
        mean[k] = float(defined.mean()) if defined.size else float("nan")
        sd[k] = float(defined.std(ddof=1)) if defined.size > 1 else float("nan")
    return values, mean, sd


def n_units(n: int, groups: Sequence[Any] | np.ndarray | None) -> int:
    """How many independent units a resample draws: the groups, or the samples without groups."""
    return n if groups is None else len(np.unique(np.asarray(groups)))


def interval_levels(ci: float, units: int) -> tuple[float, float]:
    """Quantile levels of the expanded percentile interval at confidence ``ci`` with ``units`` resampled units."""
    if not 0 < ci < 1:
        raise FmprobeError(f"ci must be in (0, 1), got {ci}")
    z = np.sqrt(units / (units - 1)) * stats.t.isf((1 - ci) / 2, units - 1)
    tail = float(stats.norm.sf(z))
    return tail, 1 - tail


def interval(draws: np.ndarray, point: float, *, ci: float, units: int) -> Interval:
    """The interval of one number from its resampled values (NaN ones left out); NaN without two units."""
    valid = draws[~np.isnan(draws)]
    if valid.size == 0 or np.isnan(point) or units < 2:
        return Interval(point, float("nan"), float("nan"))
    lo, hi = np.quantile(valid, interval_levels(ci, units))
    return Interval(point, float(lo), float(hi))


def p_value(draws: np.ndarray, *, units: int) -> float:
    """Two-sided p-value of "the resampled statistic is centred on 0", matching :func:`interval`: below alpha
    exactly when 0 lies outside the (1 - alpha) interval (percentile tail with +1 smoothing, then mapped
    through the same expansion)."""
    d = draws[~np.isnan(draws)]
    if d.size == 0 or units < 2:
        return float("nan")
    tail = min(np.count_nonzero(d <= 0) + 1, np.count_nonzero(d >= 0) + 1) / (d.size + 1)
    if tail >= 0.5:
        return 1.0
    t = stats.norm.isf(tail) / np.sqrt(units / (units - 1))
    return float(min(1.0, 2 * stats.t.sf(t, units - 1)))


def bootstrap_metrics(
    metric_fn: MetricFn,
    y_true: Any,
    y_score: Any,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Point estimate on all data + interval (module docstring) for every scalar metric ``metric_fn`` returns.

    With ``groups``, whole groups are drawn with replacement (cluster bootstrap), so correlated samples
    of one patient do not narrow the interval. Resamples where a metric is NaN are dropped and counted.
    """
    if not 0 < ci < 1:
        raise FmprobeError(f"ci must be in (0, 1), got {ci}")
    point = scalar_metrics(metric_fn(y_true, y_score))
    draws: dict[str, list[np.ndarray]] = {k: [] for k in point}
    for weights in resample_weights(len(y_true), groups=groups, n_resamples=n_resamples, seed=seed):
        values = evaluate_weighted(metric_fn, y_true, y_score, weights)
        for k in point:
            draws[k].append(values[k])
    units = n_units(len(y_true), groups)
    intervals, dropped = {}, {}
    for k, p in point.items():
        d = np.concatenate(draws[k]) if draws[k] else np.empty(0)
        dropped[k] = int(np.isnan(d).sum())
        intervals[k] = interval(d, p, ci=ci, units=units)
    return BootstrapResult(intervals, dropped, n_resamples)


def resample_weights(
    n: int, *, groups: Sequence[Any] | np.ndarray | None = None, n_resamples: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield chunks ``[b, n]`` of per-sample draw counts; same seed -> same resamples for any metric."""
    rng = np.random.default_rng(seed)
    if groups is None:
        inverse, units = np.arange(n), n
    else:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise FmprobeError(f"groups has {len(groups)} entries but there are {n} samples")
        _, inverse = np.unique(groups, return_inverse=True)
        units = int(inverse.max()) + 1
    chunk = max(1, _CHUNK_CELLS // max(n, units))
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        draws = rng.integers(0, units, size=(b, units))
        flat = (draws + units * np.arange(b)[:, None]).ravel()
        unit_counts = np.bincount(flat, minlength=b * units).reshape(b, units)
        yield unit_counts[:, inverse].astype(np.float64)
        done += b


def evaluate_weighted(metric_fn: MetricFn, y_true: Any, y_score: Any, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Metric values ``[b]`` for each resample row of ``weights`` (vectorised when metric_fn supports it)."""
    if isinstance(metric_fn, WeightedMetric):
        out = metric_fn.weighted(y_true, y_score, weights)
        return dict(out) if isinstance(out, Mapping) else {"value": np.asarray(out, dtype=np.float64)}
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    rows = []
    for w in weights:
        idx = np.repeat(np.arange(len(w)), w.astype(np.int64))
        rows.append(scalar_metrics(metric_fn(y_true[idx], y_score[idx])))
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}


def scalar_metrics(values: Any) -> dict[str, float]:
    """The scalar entries of a metric result (a bare number becomes ``{"value": x}``)."""
    if isinstance(values, Mapping):
        return {
            k: float(v) for k, v in values.items()
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        }
    return {"value": float(values)}
