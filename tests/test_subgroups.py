"""Per-group results and confusions: checked against scikit-learn and hand-counted cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, recall_score

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.subgroups import subgroup_report


def test_multiclass_rows_are_the_confusion_matrix_normalised_per_true_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    scores = rng.dirichlet([1, 1, 1], 200)
    scores[np.arange(200), y] += rng.uniform(0, 1.5, 200)  # informative but imperfect
    scores /= scores.sum(axis=1, keepdims=True)
    names = ["cyst", "solid", "mixed"]
    report = subgroup_report("multiclass", y, scores, class_names=names)

    expected = confusion_matrix(y, scores.argmax(1), normalize="true")
    np.testing.assert_allclose(report["confusion_normalised"], expected, atol=1e-12)
    recalls = recall_score(y, scores.argmax(1), average=None)
    for i, name in enumerate(names):
        group = report["groups"][f"true {name}"]
        assert group["n"] == int((y == i).sum())
        assert group["recall"] == pytest.approx(recalls[i])
        assert [group[f"pred/{n}"] for n in names] == pytest.approx(expected[i].tolist())
    rates = [c["rate"] for c in report["top_confusions"]]
    assert rates == sorted(rates, reverse=True) and all(c["true"] != c["predicted"] for c in report["top_confusions"])
    top = report["top_confusions"][0]
    off = expected - np.diag(np.diag(expected))
    i, j = np.unravel_index(np.argmax(off), off.shape)
    assert (top["true"], top["predicted"]) == (names[i], names[j])


def test_multiclass_class_never_seen_in_test_has_n_zero_and_nan_rates():
    y = np.array([0, 0, 1, 1])
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    report = subgroup_report("multiclass", y, scores, class_names=["a", "b", "c"])
    assert report["groups"]["true c"]["n"] == 0 and np.isnan(report["groups"]["true c"]["recall"])
    assert report["top_confusions"] == [
        {"true": "a", "predicted": "b", "rate": 0.5, "count": 1},
        {"true": "b", "predicted": "c", "rate": 0.5, "count": 1},
    ]


def test_multilabel_groups_by_combination_with_thresholds():
    names = ["gm", "wm", "csf"]
    y = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=float)
    scores = np.array([
        [0.9, 0.1, 0.0],  # right
        [0.9, 0.6, 0.0],  # wm falsely positive at threshold 0.5
        [0.2, 0.4, 0.0],  # wm missed at 0.5, found at 0.3
        [0.8, 0.8, 0.0],
        [0.1, 0.1, 0.1],
        [0.8, 0.2, 0.0],
    ])
    report = subgroup_report("multilabel", y, scores, class_names=names, thresholds=[0.5, 0.3, 0.5])
    groups = report["groups"]
    assert list(groups) == ["all", "exactly one label", "none", "gm", "wm", "gm+wm"]
    assert {k: g["n"] for k, g in groups.items()} == {"all": 6, "exactly one label": 3, "none": 1, "gm": 2, "wm": 1,
                                                       "gm+wm": 2}
    assert groups["gm"]["exact_match"] == 0.5 and groups["gm"]["pred/wm"] == 0.5
    assert groups["wm"]["exact_match"] == 1.0  # 0.4 >= the wm threshold 0.3
    assert groups["gm+wm"]["exact_match"] == 0.5 and groups["gm+wm"]["true/wm"] == 1.0
    assert groups["all"]["exact_match"] == pytest.approx(4 / 6)
    assert groups["all"]["true/gm"] == pytest.approx(4 / 6)
    assert len({tuple(g) for g in groups.values()}) == 1  # one table: every group has the same columns
    detection = report["single_label_detection"]
    assert list(detection) == ["only gm", "only wm", "only csf"]
    assert (detection["only gm"]["n"], detection["only gm"]["detected"]) == (2, 2)
    assert detection["only gm"]["called_instead"]["pred/wm"] == 0.5
    assert (detection["only wm"]["n"], detection["only wm"]["detected"]) == (1, 1)
    assert detection["only csf"]["n"] == 0 and detection["only csf"]["ci"] is None


def test_a_label_never_detected_when_it_alone_is_met_is_shown_with_its_ci():
    """C2 blindness: clips where only C2 is met are never called C2 (0/5), while it is found beside C1, so the
    table shows 0 detected with a Wilson CI [0, 0.43] (scipy's), C1-only 2/5 and C3-only 3/5."""
    names = ["c1", "c2", "c3"]
    y = np.array([[1, 0, 0]] * 5 + [[0, 1, 0]] * 5 + [[0, 0, 1]] * 5 + [[1, 1, 0]] * 3, dtype=float)
    pred_c1 = [1, 1, 0, 0, 0] + [1, 1, 1, 1, 0] + [0] * 5 + [1, 1, 1]
    pred_c2 = [0] * 5 + [0] * 5 + [0] * 5 + [1, 1, 0]
    pred_c3 = [0] * 5 + [0] * 5 + [1, 1, 1, 0, 0] + [0, 0, 0]
    scores = np.array([pred_c1, pred_c2, pred_c3], dtype=float).T * 0.8 + 0.1
    detection = subgroup_report("multilabel", y, scores, class_names=names)["single_label_detection"]
    assert [(d["detected"], d["n"]) for d in detection.values()] == [(2, 5), (0, 5), (3, 5)]
    assert detection["only c2"]["ci"][0] == 0 and detection["only c2"]["ci"][1] == pytest.approx(0.4345, abs=1e-3)
    assert detection["only c2"]["called_instead"]["pred/c1"] == 0.8  # called C1 instead
    lo, hi = detection["only c3"]["ci"]
    assert lo < 0.6 < hi


def test_binary_groups_are_specificity_and_sensitivity_at_the_threshold():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    scores = np.clip(0.3 * y + rng.uniform(0, 0.7, 100), 0, 1)
    report = subgroup_report("binary", y, scores, class_names=["y"], thresholds=[0.45])
    pred = (scores >= 0.45).astype(int)
    assert report["groups"]["positive (1)"]["accuracy"] == pytest.approx(recall_score(y, pred))
    assert report["groups"]["negative (0)"]["accuracy"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert report["groups"]["negative (0)"]["n"] + report["groups"]["positive (1)"]["n"] == 100


def test_regression_and_bad_input_are_refused():
    with pytest.raises(FmprobeError, match="regression"):
        subgroup_report("regression", np.zeros((3, 1)), np.zeros((3, 1)), class_names=["y"])
    with pytest.raises(FmprobeError, match="class names"):
        subgroup_report("multiclass", np.array([0, 1]), np.array([[0.6, 0.4], [0.3, 0.7]]), class_names=["a"])
