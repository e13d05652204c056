"""compute_metrics equals scikit-learn on the same predictions; baselines and thresholds behave."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn import metrics as skm

from fmprobe.config import METRICS_BY_TASK, PRIMARY_METRIC
from fmprobe.errors import FmprobeError
from fmprobe.evaluate.baselines import baseline_metrics
from fmprobe.evaluate.calibration import calibration, reliability
from fmprobe.evaluate.metrics import compute_metrics
from fmprobe.evaluate.thresholds import apply_thresholds, tune_thresholds

rng = np.random.default_rng(7)
N = 300


def _binary():
    y = (rng.random(N) < 0.3).astype(float)
    return y, np.clip(0.3 * y + rng.random(N) * 0.7, 0, 1)


def _multiclass(k=4):
    y = rng.choice(k, N, p=[0.5, 0.3, 0.15, 0.05][:k] / np.sum([0.5, 0.3, 0.15, 0.05][:k]))
    logits = rng.normal(size=(N, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def _multilabel(c=3):
    y = (rng.random((N, c)) < [0.4, 0.2, 0.1][:c]).astype(float)
    return y, np.clip(0.4 * y + 0.6 * rng.random((N, c)), 0, 1)


def _regression(c=2):
    y = rng.normal(size=(N, c)) * [1.0, 10.0][:c]
    return y, y + rng.normal(size=(N, c)) * [0.5, 8.0][:c]


@pytest.mark.parametrize("task", list(METRICS_BY_TASK))
def test_keys_cover_task_metrics_and_primary(task):
    y, s = {"binary": _binary, "multiclass": _multiclass, "multilabel": _multilabel, "regression": _regression}[task]()
    out = compute_metrics(task, y, s)
    assert set(METRICS_BY_TASK[task]) <= set(out)
    assert np.isfinite(out[PRIMARY_METRIC[task]])
    assert out["undefined"] == {}


def test_binary_equals_sklearn():
    y, s = _binary()
    out = compute_metrics("binary", y, s, thresholds=0.4)
    pred = (s >= 0.4).astype(int)
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert out["ap"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert out["f1"] == pytest.approx(skm.f1_score(y, pred), abs=1e-12)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)


def test_multiclass_equals_sklearn():
    y, p = _multiclass()
    names = ["a", "b", "c", "d"]
    out = compute_metrics("multiclass", y, p, class_names=names)
    pred = p.argmax(1)
    assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert out["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    assert out["auroc_ovr"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
    per = skm.f1_score(y, pred, average=None)
    assert [out[f"f1/{n}"] for n in names] == pytest.approx(per.tolist(), abs=1e-12)
    assert out["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_multilabel_equals_sklearn():
    y, s = _multilabel()
    thr = np.array([0.5, 0.6, 0.7])
    out = compute_metrics("multilabel", y, s, target_names=["x", "y", "z"], thresholds=thr)
    pred = (s >= thr).astype(int)
    assert out["map"] == pytest.approx(skm.average_precision_score(y, s, average="macro"), abs=1e-12)
    assert out["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, s, average="macro"), abs=1e-12)
    assert out["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    for c, n in enumerate("xyz"):
        assert out[f"ap/{n}"] == pytest.approx(skm.average_precision_score(y[:, c], s[:, c]), abs=1e-12)
        assert out[f"auroc/{n}"] == pytest.approx(skm.roc_auc_score(y[:, c], s[:, c]), abs=1e-12)
        assert out[f"f1/{n}"] == pytest.approx(skm.f1_score(y[:, c], pred[:, c]), abs=1e-12)


def test_regression_equals_sklearn_and_scipy():
    y, s = _regression()
    out = compute_metrics("regression", y, s, target_names=["u", "v"])
    assert out["r2"] == pytest.approx(skm.r2_score(y, s), abs=1e-12)
    assert out["mae"] == pytest.approx(skm.mean_absolute_error(y, s), abs=1e-12)
    assert out["rmse"] == pytest.approx(skm.root_mean_squared_error(y, s), abs=1e-12)
    rs = [pearsonr(y[:, c], s[:, c]).statistic for c in range(2)]
    assert out["pearson_r"] == pytest.approx(np.mean(rs), abs=1e-12)
    for c, n in enumerate("uv"):
        assert out[f"r2/{n}"] == pytest.approx(skm.r2_score(y[:, c], s[:, c]), abs=1e-12)
        assert out[f"rmse/{n}"] == pytest.approx(skm.root_mean_squared_error(y[:, c], s[:, c]), abs=1e-12)
        assert out[f"pearson_r/{n}"] == pytest.approx(rs[c], abs=1e-12)


def test_undefined_metrics_are_nan_and_named():
    s = rng.random(10)
    out = compute_metrics("binary", np.zeros(10), s)
    assert np.isnan(out["auroc"]) and np.isnan(out["ap"])
    assert {"auroc", "ap"} <= set(out["undefined"])
    assert out["accuracy"] == pytest.approx(np.mean(s < 0.5))  # still defined
    y, p = _multiclass()
    y = np.where(y == 3, 0, y)  # class 3 absent
    out = compute_metrics("multiclass", y, p)
    assert np.isnan(out["auroc_ovr"]) and "auroc_ovr" in out["undefined"]
    assert np.isfinite(out["balanced_accuracy"])
    y, s = _multilabel()
    y[:, 2] = 0
    out = compute_metrics("multilabel", y, s)
    assert np.isnan(out["ap/2"]) and "ap/2" in out["undefined"]
    assert out["map"] == pytest.approx(np.mean([out["ap/0"], out["ap/1"]]))  # mean over defined labels
    y, s = _regression()
    y[:, 1] = 3.0
    out = compute_metrics("regression", y, s)
    assert np.isnan(out["r2"]) and np.isnan(out["r2/1"]) and "r2" in out["undefined"]
    assert out["r2/0"] == pytest.approx(skm.r2_score(y[:, 0], s[:, 0]))


def test_bad_inputs_raise():
    y, s = _binary()
    with pytest.raises(FmprobeError, match="300 samples"):
        compute_metrics("binary", y, s[:-1])
    s[5] = np.nan
    with pytest.raises(FmprobeError, match=r"rows \[5\]"):
        compute_metrics("binary", y, s)
    y, p = _multiclass()
    with pytest.raises(FmprobeError, match="summing to 1"):
        compute_metrics("multiclass", y, p * 2)
    with pytest.raises(FmprobeError, match="outside"):
        compute_metrics("multiclass", y + 4, p)
    with pytest.raises(FmprobeError, match="thresholds"):
        compute_metrics("multiclass", y, p, thresholds=0.5)


def test_baselines():
    y_tr, _ = _multiclass()
    y_te, _ = _multiclass()
    b = baseline_metrics("multiclass", y_tr, y_te, class_names=list("abcd"))
    assert b["balanced_accuracy"] == pytest.approx(0.25)  # majority class on 4 present classes
    assert b["accuracy"] == pytest.approx(np.mean(y_te == np.bincount(y_tr).argmax()))
    assert b["auroc_ovr"] == pytest.approx(0.5)
    assert b["chance_balanced_accuracy"] == pytest.approx(0.25)
    yb_tr, _ = _binary()
    yb_te, _ = _binary()
    b = baseline_metrics("binary", yb_tr, yb_te)
    assert b["auroc"] == pytest.approx(0.5) and b["ap"] == pytest.approx(yb_te.mean())
    ym_tr, _ = _multilabel()
    ym_te, _ = _multilabel()
    b = baseline_metrics("multilabel", ym_tr, ym_te)
    assert b["map"] == pytest.approx(ym_te.mean(0).mean()) and b["macro_auroc"] == pytest.approx(0.5)
    yr_tr, _ = _regression()
    yr_te, _ = _regression()
    b = baseline_metrics("regression", yr_tr, yr_te)
    assert b["r2"] <= 0
    assert b["r2"] == pytest.approx(skm.r2_score(yr_te, np.tile(yr_tr.mean(0), (N, 1))))


def test_f1_threshold_is_optimal_on_validation():
    y, s = _binary()
    thr = tune_thresholds("binary", y, s)
    candidates = np.unique(s)
    best = max(skm.f1_score(y, s >= t) for t in candidates)
    assert skm.f1_score(y, s >= thr) == pytest.approx(best)
    assert tune_thresholds("binary", y, s, mode="fixed") == 0.5
    ym, sm = _multilabel()
    thrs = tune_thresholds("multilabel", ym, sm)
    assert thrs.shape == (3,)
    assert np.array_equal(apply_thresholds("multilabel", sm, thrs), (sm >= thrs).astype(int))
    assert tune_thresholds("multiclass", *_multiclass()) is None
    ym[:, 1] = 0
    with pytest.raises(FmprobeError, match="no positives in validation"):
        tune_thresholds("multilabel", ym, sm)


def test_ece_and_reliability():
    p = rng.random(20_000)
    calibrated = (rng.random(20_000) < p).astype(float)
    assert reliability(calibrated, p)["ece"] < 0.02
    over = reliability(calibrated, p**3)  # systematically under-confident about positives
    assert over["ece"] > 0.15
    assert sum(over["count"]) == 20_000 and len(over["prob_true"]) == len(over["count"])
    y, prob = _multiclass()
    cal = calibration("multiclass", y, prob)
    assert set(cal["curves"]) == {"top_label"} and 0 <= cal["ece"] <= 1
    ym, sm = _multilabel()
    cal = calibration("multilabel", ym, sm, class_names=list("abc"))
    assert cal["ece"] == pytest.approx(np.mean([cal["curves"][n]["ece"] for n in "abc"]))


def test_calibration_bins_hold_equal_counts_and_the_ece_has_a_bootstrap_ci():
    from fmprobe.evaluate.calibration import adaptive_bins, ece_interval

    y, s = _multilabel()
    n = len(y)
    curve = reliability(y[:, 0], s[:, 0])
    assert curve["bins"] == adaptive_bins(n) == min(n // 20, 10) and curve["binning"] == "equal-count"
    assert max(curve["count"]) - min(curve["count"]) <= 1 and sum(curve["count"]) == n  # not 15 sparse bins
    out = ece_interval("multilabel", y, s, class_names=list("abc"), n_resamples=300, ci=0.9)
    assert out["ece"] == pytest.approx(calibration("multilabel", y, s, class_names=list("abc"))["ece"])
    lo, hi = out["ci"]
    assert 0 <= lo < out["ece"] < hi <= 1
    assert np.isnan(ece_interval("binary", y[:, 0], s[:, 0], n_resamples=0, ci=0.9)["ci"]).all()  # no made-up CI
