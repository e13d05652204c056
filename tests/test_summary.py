"""metrics.json assembly (evaluate.summary): one score and one CI per number, one chance level, undefined metrics
and unconverged seeds said, and no numpy warning on the way."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fmprobe.config import parse_config
from fmprobe.evaluate.results import HeadRun, ProbeResults, SplitData
from fmprobe.evaluate.summary import summarise_run
from fmprobe.evaluate.task import ResolvedTask

CLASSES = ["a", "b", "c", "d"]


def _experiment(bootstrap: int = 300, seeds: tuple[int, ...] = (0, 1)):
    return parse_config({
        "name": "synthetic", "data": {"manifest": "unused.csv"},
        "task": {"type": "multiclass", "targets": ["y"], "class_names": CLASSES},
        "heads": [{"type": "linear"}], "train": {"seeds": list(seeds), "epochs": 20},
        "eval": {"bootstrap": bootstrap, "min_groups": 0, "tiny_class": 0},
    })


def _summarise(y: dict[str, np.ndarray], scores: dict[int, dict[str, np.ndarray]], best_epochs: dict[int, int],
               bootstrap: int = 300) -> dict:
    """metrics.json of one linear head whose seeds scored ``scores[seed][split]``, samples in groups of two."""
    exp = _experiment(bootstrap, tuple(scores))
    ids = {s: [f"{s}{i}" for i in range(len(v))] for s, v in y.items()}
    split = SplitData(ids=ids, groups={s: [f"g{s}{i // 2}" for i in range(len(v))] for s, v in y.items()}, targets=y)
    runs = [HeadRun(head="linear", seed=seed, best_epoch=best_epochs[seed], best_val_score=0.5, stopped_early=False,
                    curves=[], scores=scores[seed], thresholds=None, loss_info={}, trainable_params=10, last_epoch=20)
            for seed in scores]
    task = ResolvedTask.from_config(exp.task, CLASSES)
    return summarise_run(exp, task, ProbeResults(runs=runs), split,
                         split_info={"group_overlap": [], "allow_group_overlap": False}, skipped=[],
                         config_hash="c", head_identities={"linear": "h"}, identity_version=2)


def _labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % classes)


def _probs(y: np.ndarray, signal: float, rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(size=(len(y), 4)) + signal * np.eye(4)[y]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _absent_class_run() -> dict:
    """metrics.json of an uninformative head on a test split without class 'd' (declared, present elsewhere)."""
    rng = np.random.default_rng(0)
    y = {"train": _labels(80, 4, rng), "val": _labels(40, 4, rng), "test": _labels(60, 3, rng)}  # no 'd' in test
    scores = {seed: {s: _probs(v, 0.0, rng) for s, v in y.items()} for seed in (0, 1)}  # uninformative
    return _summarise(y, scores, {0: 5, 1: 7})


def test_an_undefined_metric_is_flagged_naming_its_class_without_warnings(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy "Mean of empty slice" would fail here
        m = _absent_class_run()
    assert capfd.readouterr().err == ""
    head = m["heads"]["linear"]
    undefined = next(f for f in head["flags"] if f["name"] == "undefined_metric")
    assert np.isnan(head["splits"]["test"]["mean"]["auroc_ovr"])
    assert "auroc_ovr" in undefined["details"]["undefined"] and "'d'" in undefined["details"]["undefined"]["auroc_ovr"]
    assert "auroc_ovr" in undefined["message"] and "'d'" in undefined["message"]
    # every CI says the share of resamples it rests on
    assert set(head["test_ci_used"]) == set(head["test_ci"])
    assert head["test_ci_used"]["accuracy"] == 1.0 and head["test_ci_used"]["auroc_ovr"] == 0.0


def test_one_chance_level_from_the_classes_present_in_test_said_explicitly():
    m = _absent_class_run()
    # 1 / the 3 classes present in test (not 1/4 declared) for the baseline, its report and the flag; 'd' named
    chance = m["baseline"]["chance"]
    assert chance["balanced_accuracy"] == pytest.approx(1 / 3) == m["baseline"]["test"]["chance_balanced_accuracy"]
    assert chance["classes_present"] == 3 and chance["classes_declared"] == 4 and chance["absent_from_test"] == ["d"]
    assert m["baseline"]["test"]["balanced_accuracy"] == pytest.approx(1 / 3)  # the trivial predictor scores chance
    collapse = next(f for f in m["heads"]["linear"]["flags"] if f["name"] == "majority_collapse")
    assert collapse["details"]["chance_balanced_accuracy"] == pytest.approx(1 / 3)
    assert "1/3 classes present in test" in collapse["message"]


def test_the_collapse_flag_quotes_the_ci_the_table_reports():
    head = _absent_class_run()["heads"]["linear"]
    collapse = next(f for f in head["flags"] if f["name"] == "majority_collapse")
    assert collapse["details"]["balanced_accuracy_interval"][1:] == head["test_ci"]["balanced_accuracy"]
    lo, hi = head["test_ci"]["balanced_accuracy"]
    assert f"[{lo:.3f}, {hi:.3f}]" in collapse["message"]


def test_a_rare_class_gives_cis_conditioned_on_it_and_says_how_often():
    rng = np.random.default_rng(1)
    y_test = np.r_[_labels(58, 3, rng), 3, 3]  # two 'd' samples, one group: missing from ~ (1 - 1/30)^30 = 36%
    y = {"train": _labels(80, 4, rng), "val": _labels(40, 4, rng), "test": y_test}
    scores = {seed: {s: _probs(v, 2.0, rng) for s, v in y.items()} for seed in (0, 1)}
    head = _summarise(y, scores, {0: 5, 1: 7})["heads"]["linear"]
    used = head["test_ci_used"]["auroc_ovr"]
    assert 0.5 < used < 0.8 and head["test_ci_used"]["accuracy"] == 1.0
    flag = next(f for f in head["flags"] if f["name"] == "undefined_metric")
    assert flag["details"]["ci_used"]["auroc_ovr"] == used and f"auroc_ovr {used:.0%}" in flag["message"]
    assert flag["details"]["missing_from_resamples"]["d"] == pytest.approx(1 - used)  # auroc_ovr needs every class
    assert "'d'" in flag["message"]


def test_the_head_score_is_the_member_mean_and_its_ci_is_around_it():
    rng = np.random.default_rng(2)
    y = {s: _labels(60, 4, rng) for s in ("train", "val", "test")}
    scores = {seed: {s: _probs(v, 1.0 + seed, rng) for s, v in y.items()} for seed in (0, 1, 2)}
    head = _summarise(y, scores, {0: 5, 1: 7, 2: 3})["heads"]["linear"]
    test = head["splits"]["test"]
    for metric, per_seed in test["per_seed"].items():
        assert test["mean"][metric] == pytest.approx(np.mean(per_seed))
    lo, hi = head["test_ci"]["balanced_accuracy"]
    assert lo < test["mean"]["balanced_accuracy"] < hi
    assert "undefined_metric" not in {f["name"] for f in head["flags"]}  # every class drawn in every resample


def test_a_seed_whose_best_epoch_is_the_last_is_flagged_not_converged():
    rng = np.random.default_rng(3)
    y = {s: _labels(60, 4, rng) for s in ("train", "val", "test")}
    scores = {seed: {s: _probs(v, 2.0, rng) for s, v in y.items()} for seed in (0, 1, 2)}
    head = _summarise(y, scores, {0: 20, 1: 12, 2: 20})["heads"]["linear"]
    flag = next(f for f in head["flags"] if f["name"] == "not_converged")
    assert flag["severity"] == "warning"
    assert flag["details"]["members"] == {"0": {"best_epoch": 20, "epochs": 20}, "2": {"best_epoch": 20, "epochs": 20}}
    assert "epoch 20 of 20" in flag["message"] and head["epochs_allowed"] == {"0": 20, "1": 20, "2": 20}
    converged = _summarise(y, scores, {0: 19, 1: 12, 2: 3})["heads"]["linear"]
    assert "not_converged" not in {f["name"] for f in converged["flags"]}
