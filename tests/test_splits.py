"""Generated splits are grouped, stratified, deterministic; leaking splits are refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fmprobe.config import SplitConfig, TaskConfig
from fmprobe.data.splits import check_leakage, enforce_no_leakage, kfold_splits, make_splits
from fmprobe.errors import ConfigError, FmprobeError, LeakageError

N = 600
rng = np.random.default_rng(0)
DF = pd.DataFrame({"sample_id": [f"s{i}" for i in range(N)], "group": rng.integers(0, 150, N).astype(str)})
GEN = SplitConfig(mode="generate", seed=3)


def _assert_grouped(split: pd.Series) -> None:
    assert check_leakage(DF.assign(split=split)) == []


def test_multiclass_splits_are_grouped_stratified_and_sized():
    y = rng.choice(3, N, p=[0.6, 0.3, 0.1])
    split = make_splits(DF, TaskConfig(type="multiclass", targets=["y"]), GEN, y)
    _assert_grouped(split)
    assert split.index.equals(DF.index) and set(split) == {"train", "val", "test"}
    shares = split.value_counts(normalize=True)
    for name, frac in zip(["train", "val", "test"], GEN.fractions, strict=True):
        assert shares[name] == pytest.approx(frac, abs=0.05)
    for name in ("train", "val", "test"):  # class proportions kept in every split
        np.testing.assert_allclose(np.bincount(y[split == name], minlength=3) / (split == name).sum(),
                                   [0.6, 0.3, 0.1], atol=0.05)


def test_splits_are_deterministic_by_seed():
    y = rng.integers(0, 2, N).astype(float)
    task = TaskConfig(type="binary", targets=["y"])
    a, b = make_splits(DF, task, GEN, y), make_splits(DF, task, GEN, y)
    c = make_splits(DF, task, SplitConfig(mode="generate", seed=4), y)
    assert a.equals(b) and not a.equals(c)


def test_multilabel_and_regression_splits():
    y = (rng.random((N, 3)) < [0.4, 0.1, 0.03]).astype(float)
    split = make_splits(DF, TaskConfig(type="multilabel", targets=["a", "b", "c"]), GEN, y)
    _assert_grouped(split)
    for name in ("train", "val", "test"):
        np.testing.assert_allclose(y[split == name].mean(0), y.mean(0), atol=0.05)
    r = rng.normal(size=(N, 2))
    split = make_splits(DF, TaskConfig(type="regression", targets=["u", "v"], primary_metric="r2/u"), GEN, r)
    _assert_grouped(split)
    assert set(split) == {"train", "val", "test"}
    singles = DF.assign(group=DF["sample_id"])  # no grouping: StratifiedKFold, same contract
    split = make_splits(singles, TaskConfig(type="regression", targets=["u", "v"], primary_metric="r2/u"), GEN, r)
    assert split.value_counts(normalize=True)["test"] == pytest.approx(0.15, abs=0.01)


def test_kfold_holds_out_test_and_rotates_val():
    y = rng.choice(3, N, p=[0.5, 0.3, 0.2])
    cfg = SplitConfig(mode="kfold", folds=4, seed=1)
    folds = list(kfold_splits(DF, TaskConfig(type="multiclass", targets=["y"]), cfg, y))
    assert len(folds) == 4
    test = folds[0] == "test"
    assert all(((f == "test") == test).all() for f in folds)  # the same test set in every fold
    assert test.mean() == pytest.approx(cfg.fractions[2], abs=0.05)
    val = np.stack([(f == "val").to_numpy() for f in folds])
    assert np.array_equal(val.sum(0), (~test).astype(int))  # each non-test sample is val exactly once
    for f in folds:
        _assert_grouped(f)


def test_mode_mismatch_is_refused():
    with pytest.raises(ConfigError, match="kfold_splits"):
        make_splits(DF, TaskConfig(type="binary", targets=["y"]), SplitConfig(mode="kfold"), np.zeros(N))


def test_leaking_split_raises_naming_groups():
    df = pd.DataFrame({"group": [f"p{i // 2}" for i in range(40)],
                       "split": ["train", "test"] * 20})  # every patient on both sides
    overlap = check_leakage(df)
    assert len(overlap) == 20 and overlap[0] == ("p0", ["test", "train"])
    with pytest.raises(LeakageError, match=r"20 groups .*'p0' in test, train.*and 10 more"):
        enforce_no_leakage(df, allow_group_overlap=False)
    assert enforce_no_leakage(df, allow_group_overlap=True) == overlap
    clean = df.assign(split=["train"] * 20 + ["test"] * 20)
    assert enforce_no_leakage(clean, allow_group_overlap=False) == []


def test_a_missing_regression_target_is_a_stratum_every_split_shares():
    singles = DF.assign(group=DF["sample_id"])
    r = np.random.default_rng(1).normal(size=(N, 2))
    r[np.random.default_rng(2).random(N) < 0.55, 1] = np.nan  # MMSE-like: less than half of the rows have it
    task = TaskConfig(type="regression", targets=["age", "mmse"], primary_metric="r2/age", missing_targets="mask")
    split = make_splits(singles, task, GEN, r)
    for name in ("train", "val", "test"):
        assert np.isnan(r[(split == name).to_numpy(), 1]).mean() == pytest.approx(0.55, abs=0.06)
    r[0, 0] = np.inf
    with pytest.raises(FmprobeError, match="missing or non-finite"):
        make_splits(singles, task, GEN, r)
