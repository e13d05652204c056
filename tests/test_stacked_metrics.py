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
