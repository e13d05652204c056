"""Gates: levels decided with the CI, must/should criteria, flags, weights and the recommendation."""

from __future__ import annotations

import math

import pytest
import yaml
from run_factories import add_fake_segmentation, fake_run

from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.experiments.gates import Criterion, criterion_level, evaluate_gates, load_gates

NAN = math.nan


@pytest.mark.parametrize("point, lo, hi, expected", [
    (0.95, 0.91, 0.98, "target"),        # whole CI above target
    (0.92, 0.85, 0.97, "pass"),          # lower bound above acceptable, not above target
    (0.85, 0.78, 0.90, "inconclusive"),  # CI straddles acceptable
    (0.75, 0.70, 0.79, "fail"),          # upper bound below acceptable
    (0.65, 0.55, 0.82, "fail"),          # point below the fail level, even though the CI reaches acceptable
    (0.85, NAN, NAN, "pass"),            # no CI: the point decides
    (NAN, NAN, NAN, "fail"),             # an undefined metric cannot pass
])
def test_levels_for_a_higher_is_better_metric(point, lo, hi, expected):
    crit = Criterion(metric="auroc", target=0.9, acceptable=0.8, fail=0.7)
    assert criterion_level(crit, point, lo, hi).level == expected


@pytest.mark.parametrize("point, lo, hi, expected", [
    (2.0, 1.5, 2.4, "target"),
    (3.0, 2.6, 3.8, "pass"),
    (3.9, 3.5, 4.4, "inconclusive"),
    (4.5, 4.1, 5.0, "fail"),
])
def test_levels_mirror_for_a_lower_is_better_metric(point, lo, hi, expected):
    crit = Criterion(metric="mae", target=2.5, acceptable=4.0)
    assert not crit.higher
    assert criterion_level(crit, point, lo, hi).level == expected


def test_levels_must_be_ordered_by_the_metric_direction(tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump({"criteria": [{"metric": "auroc", "target": 0.7, "acceptable": 0.8}]}))
    with pytest.raises(ConfigError, match="target 0.7 must be above acceptable 0.8"):
        load_gates(path)
    path.write_text(yaml.safe_dump({"criteria": [{"metric": "rmse", "acceptable": 1.0, "fail": 0.5}]}))
    with pytest.raises(ConfigError, match="acceptable 1.0 must be below fail 0.5"):
        load_gates(path)
    path.write_text(yaml.safe_dump({"criteria": [{"metric": "auroc", "acceptable": 0.8, "treshold": 1}]}))
    with pytest.raises(ConfigError, match="treshold"):
        load_gates(path)


def _gates(tmp_path, criteria, **extra):
    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump({"criteria": criteria, **extra}))
    return load_gates(path)


def test_verdicts_flags_weights_and_recommendation(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "r1", {"small": {"val": 0.90, "test": 0.91, "ci": (0.86, 0.95), "params": 10}})
    fake_run(runs, "r2", {"big": {"val": 0.95, "test": 0.93, "ci": (0.88, 0.97), "params": 5000}})
    fake_run(runs, "r3", {"wide": {"val": 0.92, "test": 0.85, "ci": (0.70, 0.95)}})
    fake_run(runs, "r4", {"bad": {"val": 0.80, "test": 0.60, "ci": (0.50, 0.70)}})
    fake_run(runs, "r5", {"flagged": {"val": 0.99, "test": 0.95, "ci": (0.90, 0.99),
                                      "flags": [("identical_predictions", "error")]}})
    spec = _gates(tmp_path, [
        {"metric": "auroc", "target": 0.9, "acceptable": 0.8, "weight": 1},
        {"name": "small", "metric": "trainable_params", "acceptable": 1000, "must_pass": False, "weight": 2},
    ])
    report = evaluate_gates(spec, runs)
    by_head = {v.head: v for v in report.verdicts}
    assert by_head["small"].verdict == by_head["big"].verdict == "accept"
    assert by_head["wide"].verdict == "inconclusive"
    assert by_head["bad"].verdict == "reject" and "must-pass 'auroc' failed" in by_head["bad"].reasons
    assert by_head["flagged"].verdict == "reject" and "error-severity" in by_head["flagged"].reasons[0]
    # big has the better AUROC but fails the heavier should-pass criterion: small wins on the weighted score
    assert by_head["big"].levels["small"].level == "fail" and "should-pass 'small' fail" in by_head["big"].reasons
    assert by_head["small"].score > by_head["big"].score
    assert report.chosen.head == "small" and report.recommendation.startswith("adopt exp/r1/small")
    assert report.counts == {"accept": 2, "inconclusive": 1, "reject": 2}

    # reject_flags: none lets the flagged candidate through, and its CI lower bound is above target
    report = evaluate_gates(_gates(tmp_path, [{"metric": "auroc", "target": 0.9, "acceptable": 0.8}],
                                   reject_flags="none"), runs)
    assert report.chosen.head == "flagged"


def test_few_groups_makes_a_verdict_inconclusive_and_overlapping_cis_are_a_tie(tmp_path):
    runs = tmp_path / "runs"
    # a CI whole above target, but over too few test groups to be trusted: not accepted on it
    fake_run(runs, "r1", {"few": {"val": 0.99, "test": 0.96, "ci": (0.93, 0.99), "flags": [("few_groups", "warning")]}})
    # two candidates at target whose test CIs overlap: validation (0.95 vs 0.90) must not pick one of them
    fake_run(runs, "r2", {"a": {"val": 0.95, "test": 0.95, "ci": (0.91, 0.98)}})
    fake_run(runs, "r3", {"b": {"val": 0.90, "test": 0.94, "ci": (0.92, 0.97)}})
    spec = _gates(tmp_path, [{"metric": "auroc", "target": 0.9, "acceptable": 0.8}])
    report = evaluate_gates(spec, runs)
    by_head = {v.head: v for v in report.verdicts}
    few = by_head["few"]
    assert few.verdict == "inconclusive" and few.levels["auroc"].level == "inconclusive"
    assert few.levels["auroc"].note.startswith("target by a CI over too few test groups")
    assert any("few_groups" in r for r in few.reasons)
    assert by_head["a"].verdict == by_head["b"].verdict == "accept"
    assert report.chosen is None and [v.head for v in report.tied] == ["a", "b"]
    assert report.recommendation.startswith("tie: 2 accepted candidates") and "exp/r3/b" in report.recommendation
    assert report.to_dict()["tied"] == ["exp/r2/a", "exp/r3/b"]
    # CIs that do not overlap are no tie: the one ranked first (on validation) is adopted
    fake_run(runs, "r4", {"c": {"val": 0.80, "test": 0.99, "ci": (0.985, 0.995)}})
    report = evaluate_gates(spec, runs, run_dirs=[runs / "exp" / "r3", runs / "exp" / "r4"])
    assert report.chosen.head == "b" and report.tied == []


def test_no_accepted_candidate_says_why(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "r1", {"wide": {"val": 0.9, "test": 0.85, "ci": (0.70, 0.95)}})
    report = evaluate_gates(_gates(tmp_path, [{"metric": "auroc", "acceptable": 0.8}]), runs)
    assert report.chosen is None and report.recommendation.startswith("no decision yet")
    fake_run(runs, "r2", {"bad": {"val": 0.9, "test": 0.6, "ci": (0.5, 0.7)}})
    report = evaluate_gates(_gates(tmp_path, [{"metric": "auroc", "acceptable": 0.8}]), runs,
                            run_dirs=[runs / "exp" / "r2"])
    assert report.chosen is None and report.recommendation.startswith("reject all")


def test_unknown_metric_names_the_candidate_and_what_it_has(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "r1", {"lin": {"val": 0.9, "test": 0.9, "ci": (0.85, 0.95)}})
    with pytest.raises(FmprobeError, match=r"exp/r1 head 'lin' has no test metric 'r2' \(it has: auroc"):
        evaluate_gates(_gates(tmp_path, [{"metric": "r2", "acceptable": 0.5}]), runs)


def test_val_split_is_judged_on_the_point(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "r1", {"lin": {"val": 0.85, "test": 0.5, "ci": (0.4, 0.6)}})
    report = evaluate_gates(_gates(tmp_path, [{"metric": "auroc", "split": "val", "acceptable": 0.8}]), runs)
    level = report.verdicts[0].levels["auroc"]
    assert (level.level, level.lo, level.hi) == ("pass", 0.85, 0.85)


def test_gates_on_segmentation_miou_and_total_params(tmp_path):
    runs = tmp_path / "runs"
    good = fake_run(runs, "r1", {"lin": {"val": 0.9, "test": 0.9, "ci": (0.85, 0.95), "total": 5000}})
    block = add_fake_segmentation(good, {"segmentation": 0.8})
    weak = fake_run(runs, "r2", {"lin": {"val": 0.9, "test": 0.9, "ci": (0.85, 0.95), "total": 5000}})
    add_fake_segmentation(weak, {"lin": 0.5})
    report = evaluate_gates(_gates(tmp_path, [{"metric": "seg/miou", "acceptable": 0.7},
                                              {"metric": "total_params", "acceptable": 6000}]), runs)
    by_run = {v.run_id: v for v in report.verdicts}
    level = by_run["r1"].levels["seg/miou"]
    assert level.level == "pass" and [level.lo, level.hi] == block["decoders"]["segmentation"]["test_ci"]["miou"]
    assert by_run["r1"].levels["total_params"].point == 5000
    assert by_run["r2"].verdict == "reject" and "must-pass 'seg/miou' failed" in by_run["r2"].reasons
    assert report.chosen.run_id == "r1"

    fake_run(runs, "r3", {"lin": {"val": 0.9, "test": 0.9, "ci": (0.85, 0.95), "total": None}})  # an older run
    with pytest.raises(FmprobeError, match="exp/r3 head 'lin' has no test metric 'seg/miou'"):
        evaluate_gates(_gates(tmp_path, [{"metric": "seg/miou", "acceptable": 0.7}]), runs)
    with pytest.raises(FmprobeError, match="exp/r3 head 'lin' has no total_params recorded"):
        evaluate_gates(_gates(tmp_path, [{"metric": "total_params", "acceptable": 6000}]), runs)
