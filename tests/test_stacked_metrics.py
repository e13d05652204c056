"""TaskMetric.stacked scores many heads at once and equals scikit-learn (compute_metrics) head by head."""

from __future__ import annotations

import numpy as np
import pytest

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.bootstrap import scalar_metrics
from fmprobe.evaluate.task import TaskMetric


def _data(task, rng, heads=5, n=70):
    """Rounded scores: many ties within and across heads; rare labels so some are absent."""
    if task == "binary":
        return rng.integers(0, 2, n), np.round(rng.random((heads, n)), 1)
    if task == "multiclass":
        p = np.round(rng.dirichlet(np.ones(4), (heads, n)), 1) + 1e-3
        return rng.integers(0, 4, n), p / p.sum(axis=2, keepdims=True)
    if task == "multilabel":
        y = (rng.random((n, 3)) < [0.1, 0.5, 0.0]).astype(float)  # the last label has no positive
        return y, np.round(rng.random((heads, n, 3)), 1)
    return rng.normal(size=(n, 2)), rng.normal(size=(heads, n, 2))


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel", "regression"])
def test_stacked_equals_sklearn_per_head(task):
    rng = np.random.default_rng(7)
    y, s = _data(task, rng)
    metric = TaskMetric(task, thresholds=[0.3, 0.5, 0.6] if task == "multilabel" else None)
    fast = metric.stacked(y, s)
    for h in range(len(s)):
        ref = scalar_metrics(metric(y, s[h]))
        assert set(ref) == set(fast)
        for k, v in ref.items():
            np.testing.assert_allclose(fast[k][h], v, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=f"{task} {k}")


def test_stacked_undefined_cases_are_nan_as_sklearn():
    metric = TaskMetric("regression")
    y = np.array([[1.0, 2.0], [1.0, 3.0], [1.0, 5.0]])  # first target constant
    s = np.stack([np.array([[0.5, 1.0], [0.7, 2.0], [0.9, 2.5]]), np.ones((3, 2))])  # head 1 constant outputs
    fast = metric.stacked(y, s)
    for h in range(2):
        ref = scalar_metrics(metric(y, s[h]))
        for k, v in ref.items():
            np.testing.assert_allclose(fast[k][h], v, equal_nan=True, err_msg=k)
    assert np.isnan(fast["r2"]).all() and np.isnan(fast["pearson_r/1"][1]) and not np.isnan(fast["pearson_r/1"][0])


def test_stacked_refuses_bad_scores_like_compute_metrics():
    with pytest.raises(FmprobeError, match="non-finite"):
        TaskMetric("binary").stacked(np.array([0, 1, 1]), np.array([[0.1, 0.2, 0.3], [0.1, np.nan, 0.3]]))
    with pytest.raises(FmprobeError, match="samples"):
        TaskMetric("binary").stacked(np.array([0, 1]), np.zeros((2, 3)))


def test_regression_with_missing_targets_scores_each_target_on_its_own_rows():
    """Age on the sessions that have an age, MMSE on those with an MMSE: equal to scikit-learn on those rows, for
    the metric, its stacked form (many heads) and its weighted form (bootstrap resamples)."""
    from scipy.stats import pearsonr
    from sklearn.metrics import mean_absolute_error, r2_score

    from fmprobe.evaluate.bootstrap import resample_weights

    rng = np.random.default_rng(5)
    n = 60
    y = rng.normal(size=(n, 2)) * [10, 3] + [70, 26]
    y[rng.random(n) < 0.5, 1] = np.nan  # MMSE for about half of the sessions
    y[np.isfinite(y[:, 1]) & (rng.random(n) < 0.2), 0] = np.nan  # a few without age
    scores = np.nan_to_num(y, nan=50)[None] + rng.normal(size=(3, n, 2)) * [8, 4]
    metric = TaskMetric("regression", target_names=["age", "mmse"])

    def reference(yy: np.ndarray, ss: np.ndarray) -> dict[str, float]:
        out = {}
        for c, name in enumerate(("age", "mmse")):
            rows = np.isfinite(yy[:, c])
            out[f"r2/{name}"] = r2_score(yy[rows, c], ss[rows, c])
            out[f"mae/{name}"] = mean_absolute_error(yy[rows, c], ss[rows, c])
            out[f"pearson_r/{name}"] = pearsonr(yy[rows, c], ss[rows, c]).statistic
        return out

    fast = metric.stacked(y, scores)
    for h in range(3):
        one = scalar_metrics(metric(y, scores[h]))
        for k, v in reference(y, scores[h]).items():
            assert one[k] == pytest.approx(v, rel=1e-9) and fast[k][h] == pytest.approx(v, rel=1e-9), k
        assert one["r2"] == pytest.approx((one["r2/age"] + one["r2/mmse"]) / 2)
    w = next(resample_weights(n, groups=rng.integers(0, 20, n), n_resamples=10, seed=2))
    drawn = metric.weighted(y, scores[0], w)
    for b in range(len(w)):
        idx = np.repeat(np.arange(n), w[b].astype(int))
        for k, v in reference(y[idx], scores[0][idx]).items():
            assert drawn[k][b] == pytest.approx(v, rel=1e-9), (b, k)
    # a target without a single value: undefined with the reason, the other still scored
    gone = y.copy()
    gone[:, 1] = np.nan
    out = metric(gone, scores[0])
    assert np.isnan(out["r2/mmse"]) and "no value" in out["undefined"]["r2/mmse"] and np.isfinite(out["r2/age"])
    assert np.isnan(metric.stacked(gone, scores)["mae/mmse"]).all()
