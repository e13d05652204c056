"""Sanity flags catch uninformative classifiers, leaks and predictions that ignore the config."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fmprobe.config import EvalConfig
from fmprobe.data.splits import check_leakage
from fmprobe.evaluate.baselines import baseline_metrics
from fmprobe.evaluate.bootstrap import bootstrap_metrics
from fmprobe.evaluate.task import TaskMetric
from fmprobe.evaluate.flags import (
    below_baseline,
    compute_flags,
    constant_output,
    identical_predictions,
    majority_collapse,
    overfit_gap,
    prediction_hash,
    reproduced,
    tiny_class,
)

PRIORS = np.array([0.7, 0.15, 0.1, 0.05])
CFG = EvalConfig(bootstrap=300)


def _imbalanced(n, seed):
    return np.random.default_rng(seed).choice(4, n, p=PRIORS)


def _flags_for(y_train, y_test, probs):
    base = baseline_metrics("multiclass", y_train, y_test)
    boot = bootstrap_metrics(TaskMetric("multiclass"), y_test, probs, n_resamples=CFG.bootstrap)
    flags = compute_flags("multiclass", y_test, probs, eval_cfg=CFG, primary_metric="balanced_accuracy",
                          model_interval=boot["balanced_accuracy"], baseline_value=base["balanced_accuracy"],
                          ba_interval=boot["balanced_accuracy"])
    return {f.name: f for f in flags}


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("kind", ["priors", "random", "minority"])
def test_uninformative_imbalanced_4class_classifier_is_flagged(kind):
    rng = np.random.default_rng(0)
    y_train, y_test = _imbalanced(800, 1), _imbalanced(400, 2)
    if kind == "priors":  # learned the class priors only (what CE on uninformative features converges to)
        probs = _softmax(np.log(PRIORS) + 0.05 * rng.normal(size=(400, 4)))
    elif kind == "random":  # scores unrelated to the image
        probs = rng.dirichlet(np.ones(4), 400)
    else:  # always (nearly) the same rare class
        probs = _softmax(np.array([0, 0, 0, 3.0]) + 0.1 * rng.normal(size=(400, 4)))
    flags = _flags_for(y_train, y_test, probs)
    assert "majority_collapse" in flags and "below_baseline" in flags
    if kind != "random":
        assert flags["majority_collapse"].severity == "error"


def test_informative_classifier_is_not_flagged():
    rng = np.random.default_rng(0)
    y_train, y_test = _imbalanced(800, 1), _imbalanced(400, 2)
    probs = _softmax(3 * np.eye(4)[y_test] + rng.normal(size=(400, 4)))
    flags = _flags_for(y_train, y_test, probs)
    assert "majority_collapse" not in flags and "below_baseline" not in flags and "constant_output" not in flags


def test_majority_collapse_binary_and_multilabel():
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.2).astype(float)
    s = 0.2 + 0.01 * rng.random(500)  # below 0.5: always negative, though 20% are positive
    assert majority_collapse("binary", y, s, n_resamples=200).severity == "error"
    ym = (rng.random((500, 3)) < 0.3).astype(float)
    sm = np.clip(ym * 0.6 + 0.3 * rng.random((500, 3)), 0, 1)
    sm[:, 1] = 0.1  # label 1 never predicted
    flag = majority_collapse("multilabel", ym, sm, class_names=["a", "b", "c"])
    assert flag.severity == "warning" and list(flag.details["labels"]) == ["b"]
    # truly concentrated truth is not a collapse
    y_conc = (rng.random(500) < 0.03).astype(float)
    good = np.clip(0.9 * y_conc + 0.05 * rng.random(500), 0, 1)
    assert majority_collapse("binary", y_conc, good, n_resamples=200) is None


def test_constant_output():
    assert constant_output("multiclass", np.tile([0.7, 0.2, 0.1], (50, 1))).severity == "error"
    rng = np.random.default_rng(0)
    y = rng.normal(size=(100, 2)) * 100
    pred = np.c_[y[:, 0] + rng.normal(size=100), np.full(100, 3.0) + 1e-6 * rng.normal(size=100)]
    flag = constant_output("regression", pred, y_true=y)
    assert flag.severity == "warning" and flag.details["columns"] == [1]
    assert constant_output("binary", rng.random(100)) is None


def test_below_baseline_is_direction_aware():
    assert below_baseline("auroc", (0.5, 0.45, 0.55), 0.5).severity == "error"
    assert below_baseline("auroc", (0.56, 0.49, 0.62), 0.5).severity == "warning"
    assert below_baseline("auroc", (0.70, 0.62, 0.78), 0.5) is None
    assert below_baseline("mae", (3.0, 2.5, 3.5), 2.9).severity == "error"
    assert below_baseline("mae", (2.0, 1.8, 2.2), 2.9) is None
    assert below_baseline("rmse", (2.0, 1.5, 3.0), 2.9).severity == "warning"


def test_identical_predictions_across_different_configs():
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(50)]
    probs = rng.dirichlet(np.ones(3), 50)
    order = rng.permutation(50)
    mine = prediction_hash(probs, sample_ids=ids)
    # the other run wrote the same predictions in another row order
    theirs = prediction_hash(probs[order], sample_ids=[ids[i] for i in order])
    assert mine == theirs
    others = {"run-b": ("cfgB", theirs), "run-c": ("cfgA", theirs),
              "run-d": ("cfgD", prediction_hash(probs[::-1], sample_ids=ids))}
    dup = identical_predictions("cfgA", mine, others)
    assert dup.severity == "error" and dup.details["identical"] == ["run-b"]  # same config (run-c) is not suspicious
    same = reproduced("cfgA", mine, others)  # a reproduction with the same configuration: info, not an error
    assert same.severity == "info" and same.details["identical"] == ["run-c"]
    # near-identical outputs that round differently are caught by the array comparison
    near = identical_predictions("cfgA", mine, {}, y_score=probs,
                                 other_scores={"run-e": ("cfgE", probs + 4e-7), "run-f": ("cfgF", probs + 1e-3)})
    assert near.details["near_identical"] == ["run-e"]


def test_overfit_gap_and_tiny_class():
    assert overfit_gap("auroc", 0.99, 0.70, 0.2).severity == "warning"
    assert overfit_gap("auroc", 0.85, 0.75, 0.2) is None
    assert overfit_gap("mae", 1.0, 3.0, 0.2) is not None  # val error 3x train error
    assert overfit_gap("mae", 2.9, 3.0, 0.2) is None
    flag = tiny_class("multiclass", {"train": np.array([0] * 20 + [1] * 20 + [2] * 6),
                                     "test": np.array([0] * 10 + [1] * 2)}, class_names=["a", "b", "c"])
    assert flag.details["counts"] == {"test": {"b": 2, "c": 0}}
    flag = tiny_class("multilabel", {"val": np.array([[1, 0]] * 10)}, min_count=5)
    assert flag.details["counts"] == {"val": {"1": 0}}


def test_leaking_split_gives_group_overlap_flag():
    df = pd.DataFrame({"group": ["p1", "p1", "p2", "p3", "p3"], "split": ["train", "test", "train", "val", "val"]})
    overlap = check_leakage(df)
    y = np.array([0, 1, 0, 1, 0])
    s = np.array([0.1, 0.9, 0.2, 0.8, 0.3])
    flags = compute_flags("binary", y, s, eval_cfg=EvalConfig(bootstrap=0), overlap=overlap)
    assert [f.name for f in flags] == ["group_overlap"] and flags[0].severity == "error"
    allowed = compute_flags("binary", y, s, eval_cfg=EvalConfig(bootstrap=0), overlap=overlap, allow_group_overlap=True)
    assert allowed[0].severity == "warning"


def test_few_test_groups_warn_that_the_group_bootstrap_ci_understates_uncertainty():
    from fmprobe.evaluate.flags import few_groups

    flag = few_groups(["p1", "p1", "p2", "p2"], min_groups=10)
    assert flag is not None and flag.severity == "warning" and flag.details["n_groups"] == 2
    assert few_groups([f"p{i}" for i in range(10)], min_groups=10) is None
    y = np.array([0, 1] * 6)
    names = {f.name for f in compute_flags("binary", y, y * 0.8 + 0.1, groups=[f"p{i // 4}" for i in range(12)])}
    assert "few_groups" in names
    names = {f.name for f in compute_flags("binary", y, y * 0.8 + 0.1, groups=[f"p{i}" for i in range(12)])}
    assert "few_groups" not in names
