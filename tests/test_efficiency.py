"""The label-efficiency protocol: few-shot episodes by group, nested label fractions, their honesty (training groups
only, budgets that cannot be drawn reported), the two-level interval, labels needed, and `fmprobe efficiency` end to
end with its table, report section and efficiency.parquet."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fmprobe.cli import app
from fmprobe.config import parse_config
from fmprobe.errors import ConfigError
from fmprobe.evaluate.bootstrap import resample_weights
from fmprobe.evaluate.efficiency import labels_needed, summarise_efficiency
from fmprobe.evaluate.results import EfficiencyPoint, HeadRun, SplitData
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.experiments.efficiency import check_efficiency, draw_budgets
from fmprobe.probes.subsets import (
    Unavailable,
    fraction_groups,
    nested_fractions,
    shot_episodes,
)


def split_data(seed: int = 0) -> SplitData:
    """120 patients x 1-4 samples, 3 classes (one per patient), patients split 60 / 30 / 30."""
    rng = np.random.default_rng(seed)
    ids, groups, targets = {}, {}, {}
    patient = 0
    for part, count in (("train", 60), ("val", 30), ("test", 30)):
        rows = [(f"p{patient + p}", int(rng.integers(3)), int(rng.integers(1, 5))) for p in range(count)]
        patient += count
        groups[part] = [g for g, _, n in rows for _ in range(n)]
        targets[part] = np.array([c for _, c, n in rows for _ in range(n)])
        ids[part] = [f"{g}-{i}" for i, g in enumerate(groups[part])]
    return SplitData(ids, groups, targets)


def test_episodes_draw_k_examples_per_class_each_from_its_own_group():
    split = split_data()
    episodes = shot_episodes(split.groups["train"], split.targets["train"], task_type="multiclass",
                             class_names=["a", "b", "c"], k=4, episodes=30)  # fmt: skip
    assert len(episodes) == 30 and len({tuple(e) for e in episodes}) > 25  # independent draws
    groups = np.array(split.groups["train"])
    for rows in episodes:
        y = split.targets["train"][rows]
        assert np.bincount(y, minlength=3).tolist() == [4, 4, 4]
        for c in range(3):
            assert len(set(groups[rows[y == c]])) == 4  # K patients, not K samples of one patient
    # a class with fewer training groups than K: reported, not drawn smaller
    too_many = shot_episodes(split.groups["train"], split.targets["train"], task_type="multiclass",
                             class_names=["a", "b", "c"], k=40, episodes=3)  # fmt: skip
    assert isinstance(too_many, Unavailable) and "fewer than K = 40" in too_many.reason


def test_fractions_are_nested_stratified_shares_of_groups():
    split = split_data()
    fractions = [0.05, 0.1, 0.25, 0.5, 1.0]
    n_groups = len(set(split.groups["train"]))
    for seed in (0, 1, 2):
        subsets = nested_fractions(split.groups["train"], split.targets["train"], task_type="multiclass",
                                   fractions=fractions, seed=seed)  # fmt: skip
        groups = {f: set(np.array(split.groups["train"])[rows]) for f, rows in subsets.items()}
        for small, large in itertools.pairwise(fractions):
            assert set(subsets[small]) <= set(subsets[large])  # each share contains the smaller ones
        for f in fractions:
            assert len(groups[f]) == fraction_groups(n_groups, f) == max(1, math.ceil(f * n_groups - 1e-9))
            # whole groups: every sample of a labelled patient is labelled
            assert sorted(subsets[f]) == [i for i, g in enumerate(split.groups["train"]) if g in groups[f]]
        # stratified: the three classes are in the first three groups' share (10 % of 60 groups = 6 groups)
        assert set(split.targets["train"][subsets[0.1]]) == {0, 1, 2}
    orders = [tuple(nested_fractions(split.groups["train"], split.targets["train"], task_type="multiclass",
                                     fractions=[0.25], seed=s)[0.25]) for s in (0, 1)]  # fmt: skip
    assert orders[0] != orders[1]  # the seed draws the subset


def test_draws_never_touch_validation_or_test_groups():
    split = split_data(1)
    exp = parse_config({"name": "e", "data": {"manifest": "m.csv"},
                        "task": {"type": "multiclass", "targets": ["y"], "class_names": ["a", "b", "c"]},
                        "train": {"shots": [1, 2, 4], "episodes": 20, "label_fractions": [0.1, 0.5, 1.0]}})  # fmt: skip
    task = ResolvedTask.from_config(exp.task, ["a", "b", "c"])
    held_out = set(split.groups["val"]) | set(split.groups["test"])
    budgets = draw_budgets(exp, task, split)
    assert len(budgets) == 6 and not any(isinstance(d, Unavailable) for _, _, d in budgets)
    for _, _, draws in budgets:
        for _, rows in draws:
            assert rows.max() < len(split.ids["train"])  # rows of the training split only
            assert not {split.groups["train"][r] for r in rows} & held_out


def test_a_fraction_without_every_class_is_reported_not_skipped():
    split = split_data()
    exp = parse_config({"name": "e", "data": {"manifest": "m.csv"},
                        "task": {"type": "multiclass", "targets": ["y"], "class_names": ["a", "b", "c"]},
                        "train": {"label_fractions": [0.02, 1.0]}})  # fmt: skip
    task = ResolvedTask.from_config(exp.task, ["a", "b", "c"])
    (_, small, draws), _ = draw_budgets(exp, task, split)
    assert small == 0.02 and isinstance(draws, Unavailable)  # one group holds one class
    assert "too small to hold every class" in draws.reason and "seed 0" in draws.reason


def _run(seed: int, rows: list[int], test_scores: np.ndarray, y_train: np.ndarray, split: SplitData) -> HeadRun:
    data = SplitData({**split.ids, "train": [split.ids["train"][r] for r in rows]},
                     {**split.groups, "train": [split.groups["train"][r] for r in rows]},
                     {**split.targets, "train": y_train[rows]})  # fmt: skip
    return HeadRun("h", seed, None, 0.0, False, [], {"test": test_scores}, None, {}, 0, data=data)


def test_interval_is_a_two_level_bootstrap_over_repeats_and_test_groups():
    split = split_data()
    exp = parse_config({"name": "e", "data": {"manifest": "m.csv"},
                        "task": {"type": "multiclass", "targets": ["y"], "class_names": ["a", "b", "c"]},
                        "eval": {"bootstrap": 400, "target": 0.5}})  # fmt: skip
    task = ResolvedTask.from_config(exp.task, ["a", "b", "c"])
    y = split.targets["test"]
    rng = np.random.default_rng(0)
    noisy = [np.eye(3)[np.where(rng.random(len(y)) < p, y, rng.integers(0, 3, len(y)))] for p in (0.2, 0.9)]
    point = EfficiencyPoint("shots", 1, "h", [_run(e, [0, 1, 2], s, split.targets["train"], split)
                                              for e, s in enumerate(noisy)])  # fmt: skip
    block = summarise_efficiency(exp, task, [point], y, split.groups["test"], {"balanced_accuracy": 1 / 3})
    entry = block["points"][0]
    # the same construction by hand: each resample draws one repeat and the test groups
    weights = np.concatenate(list(resample_weights(len(y), groups=split.groups["test"], n_resamples=400, seed=0)))
    drawn = np.random.default_rng(0).integers(2, size=400)
    values = [task.metric().weighted(y, noisy[e], w[None])["balanced_accuracy"][0] for e, w in zip(drawn, weights)]
    assert entry["interval"] == pytest.approx(list(np.quantile(values, [0.025, 0.975])))
    per_repeat = [task.metric()(y, s)["balanced_accuracy"] for s in noisy]
    assert entry["per_repeat"] == pytest.approx(per_repeat)
    assert entry["test"]["mean"]["balanced_accuracy"] == pytest.approx(np.mean(per_repeat))
    # one repeat good, one near chance: the interval spans both, wider than either repeat's own test CI
    assert entry["interval"][0] < per_repeat[0] + 0.05 and entry["interval"][1] > per_repeat[1] - 0.05
    # per-budget flags: a labelled subset of 3 samples has tiny classes
    assert "tiny_class" in {f["name"] for f in entry["flags"]}


def test_labels_needed_reads_the_interval_bound():
    def point(value: float, lo: float, hi: float, status: str = "ok") -> dict:
        return {"head": "h", "protocol": "fraction", "value": value, "status": status, "interval": [lo, hi],
                "labelled": {"groups": [value * 100] * 3, "samples": [value * 300] * 3}}

    points = [point(0.5, 0.78, 0.9), point(0.1, 0.6, 0.85), point(0.25, 0.72, 0.88), point(0.01, 0, 0, "missing")]
    assert labels_needed(points, 0.7, "auroc") == {"h": {"fraction": {"value": 0.25, "groups": 25.0,
                                                                      "samples": 75.0}}}  # fmt: skip
    assert labels_needed(points, 0.95, "auroc") == {"h": {"fraction": None}}  # never reached: said so
    assert labels_needed(points, 0.86, "mae")["h"]["fraction"]["value"] == 0.1  # an error metric: the upper bound
    assert labels_needed(points, 0.8, "mae")["h"]["fraction"] is None


def test_the_protocol_changes_the_run_not_the_heads_identity(toy_study):
    from fmprobe.experiments.identity import config_hash, head_identities

    plain = parse_config(toy_study("binary"))
    protocol = parse_config(toy_study("binary", train={"shots": [1, 2], "label_fractions": [0.5, 1.0]},
                                      eval={"target": 0.8}))  # fmt: skip
    assert config_hash(plain) != config_hash(protocol)  # a sweep does not take one run for the other
    # the same head predictions: no identical_predictions flag between a run and its efficiency rerun
    assert head_identities(plain) == head_identities(protocol)


def test_protocol_refusals(toy_study):
    with pytest.raises(ConfigError, match="train.shots draws K examples per class"):
        check_efficiency(parse_config(toy_study("regression", train={"shots": [1]})))
    with pytest.raises(ConfigError, match="split.mode kfold"):
        check_efficiency(parse_config(toy_study("binary", train={"label_fractions": [0.5]}, split={"mode": "kfold"})))
    with pytest.raises(ConfigError, match="remove train.grid"):
        check_efficiency(parse_config(toy_study("binary", train={"label_fractions": [0.5], "grid": {"lr": [0.1]}})))
    with pytest.raises(ConfigError, match="train.label_fractions needs distinct shares"):
        parse_config(toy_study("binary", train={"label_fractions": [0.0, 0.5]}))


def test_efficiency_command_end_to_end(toy_study, tmp_path, one_torch_thread):
    config = toy_study("multiclass", n=120, n_classes=3, heads=[{"type": "linear"}, {"type": "knn"},
                                                                {"type": "prototype"}, {"type": "logreg"}],
                       train={"epochs": 4, "trained_episodes": 2})  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["efficiency", str(path), "--shots", "1,2,30", "--fractions", "0.25,1",
                                      "--target", "0.6", "--episodes", "6", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "label efficiency" in result.output and "labels needed to reach balanced_accuracy 0.6" in result.output
    run_dir = next((tmp_path / "runs" / "toy").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    block = metrics["efficiency"]
    points = {(p["head"], p["protocol"], p["value"]): p for p in block["points"]}
    assert len(points) == 4 * 5  # heads x (3 shot counts + 2 fractions)
    assert points["knn", "shots", 1]["repeats"] == list(range(6))  # fitted heads: every episode
    assert points["linear", "shots", 1]["repeats"] == [0, 1]  # trained heads: train.trained_episodes
    assert points["logreg", "shots", 30]["status"] == "missing"  # not enough patients per class: said so
    assert "fewer than K = 30" in points["logreg", "shots", 30]["missing"]
    assert set(block["labels_needed"]) == {"linear", "knn", "prototype", "logreg"}
    # fraction 1 labels the whole training split: its repeats are the full run's fits
    for head in ("linear", "logreg"):
        full = metrics["heads"][head]["splits"]["test"]["per_seed"]["balanced_accuracy"]
        assert points[head, "fraction", 1.0]["per_repeat"] == pytest.approx(full)
    # a labelled subset never holds a validation or test sample
    table = pd.read_parquet(run_dir / "efficiency.parquet")
    assert len(table) == sum(len(p["repeats"]) for p in block["points"] if p["status"] == "ok")
    assert (table.query("protocol == 'shots' and value == 2")["labelled_samples"] == 6).all()
    html = (run_dir / "report.html").read_text()
    assert 'id="efficiency"' in html and "label-efficiency curve (fraction)" in html
    assert "not drawn: class" in html  # the missing budget, in the report too
    assert re.search(r"Fitted, no epochs; chosen on validation per seed: 0: k \d+, 1: k \d+\.", html)
    assert re.search(r"0: C [\d.e-]+, 1: C [\d.e-]+\. Seeds: deterministic", html)  # logreg: C alone
    # the fitted heads in the run itself: no epochs, their choice recorded, identical seeds
    knn = metrics["heads"]["knn"]
    assert knn["selected_epochs"] is None and set(knn["selected"]) == {"0", "1"}
    assert knn["splits"]["test"]["sd"]["balanced_accuracy"] == 0.0
