"""Stratified, grouped splits and the leakage check.

A group (patient, video, volume) never spans two splits: splits are built from scikit-learn's
``StratifiedGroupKFold`` over a stratification key per task (the class; the label combination for
multilabel, rare combinations merged; quantile bins for regression). ``make_splits`` cuts the data
into ``_UNITS`` stratified group folds and hands whole folds to train/val/test in proportion to
``split.fractions`` (so fractions are met to about 1/20, and exactly per group).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from fmprobe.config import SplitConfig, TaskConfig
from fmprobe.errors import ConfigError, FmprobeError, LeakageError, ManifestError

SPLITS = ("train", "val", "test")
_UNITS = 20  # folds handed out to train/val/test
_RARE = "__rare__"


def make_splits(
    df: pd.DataFrame, task: TaskConfig, split_cfg: SplitConfig, y: np.ndarray, *, group_col: str = "group"
) -> pd.Series:
    """``split`` column (train/val/test, index of ``df``), stratified by target and grouped by ``group_col``."""
    if split_cfg.mode != "generate":
        raise ConfigError(
            f"make_splits generates splits (split.mode: generate), but split.mode is '{split_cfg.mode}'"
            + ("; use kfold_splits" if split_cfg.mode == "kfold" else "; the manifest's split column is used as given")
        )
    groups = _groups(df, group_col)
    strat = stratification_key(task.type, y, n_folds=_UNITS, n_rows=len(df))
    n_folds = min(_UNITS, len(np.unique(groups)))
    counts = _allocate(split_cfg.fractions, n_folds)
    folds = _fold_ids(strat, groups, n_folds, split_cfg.seed)
    order = np.random.default_rng(split_cfg.seed).permutation(n_folds)
    fold_split = np.empty(n_folds, dtype=object)
    fold_split[order] = np.repeat(SPLITS, counts)
    split = pd.Series(fold_split[folds], index=df.index, name="split")
    empty = [name for name, f in zip(SPLITS, split_cfg.fractions, strict=True) if f > 0 and not (split == name).any()]
    if empty:
        raise FmprobeError(f"split(s) {empty} came out empty: too few groups for split.fractions {split_cfg.fractions}")
    return split


def kfold_splits(
    df: pd.DataFrame, task: TaskConfig, split_cfg: SplitConfig, y: np.ndarray, *, group_col: str = "group"
) -> Iterator[pd.Series]:
    """Yield ``split_cfg.folds`` split columns: a fixed held-out test set (``fractions[2]`` of the data;
    none if 0) and, in turn, one of k stratified group folds of the rest as val, the others as train."""
    if split_cfg.mode != "kfold":
        raise ConfigError(f"kfold_splits needs split.mode: kfold, got '{split_cfg.mode}'")
    groups = _groups(df, group_col)
    y = np.asarray(y)
    test_frac = split_cfg.fractions[2]
    is_test = np.zeros(len(df), dtype=bool)
    if test_frac > 0:
        holdout = split_cfg.model_copy(update={"mode": "generate", "fractions": [1 - test_frac, 0.0, test_frac]})
        is_test = (make_splits(df, task, holdout, y, group_col=group_col) == "test").to_numpy()
    rest = np.flatnonzero(~is_test)
    n_groups = len(np.unique(groups[rest]))
    if n_groups < split_cfg.folds:
        raise FmprobeError(
            f"split.folds is {split_cfg.folds} but only {n_groups} groups remain outside the test set; "
            "lower split.folds or split.fractions[2]"
        )
    strat = stratification_key(task.type, y[rest], n_folds=split_cfg.folds, n_rows=len(rest))
    folds = _fold_ids(strat, groups[rest], split_cfg.folds, split_cfg.seed)
    for k in range(split_cfg.folds):
        out = np.where(is_test, "test", "train").astype(object)
        out[rest[folds == k]] = "val"
        yield pd.Series(out, index=df.index, name="split")


def stratification_key(task_type: str, y: np.ndarray, *, n_folds: int, n_rows: int) -> np.ndarray:
    """One stratum label per row: class (binary/multiclass), label combination (multilabel),
    quantile-bin combination (regression; a missing value is a bin of its own); combinations rarer than
    ``n_folds`` are merged into one stratum."""
    y = np.asarray(y)
    if len(y) != n_rows:
        raise FmprobeError(f"got {len(y)} targets for {n_rows} manifest rows")
    values = y.astype(np.float64).reshape(n_rows, -1)
    # a missing regression target (task.missing_targets: mask) is its own stratum: every split gets its share
    allowed = np.isnan(values) if task_type == "regression" else np.zeros(values.shape, dtype=bool)
    bad = np.flatnonzero(~(np.isfinite(values) | allowed).all(axis=1))
    if bad.size:
        raise FmprobeError(f"{bad.size} rows have missing or non-finite targets (first rows {bad[:5].tolist()})")
    if task_type in ("binary", "multiclass"):
        return y.reshape(-1).astype(np.int64).astype(str)
    y2 = y.reshape(n_rows, -1)
    if task_type == "multilabel":
        parts = y2.astype(np.int64).astype(str)
    else:
        n_bins = int(np.clip(n_rows // (2 * n_folds), 1, 5))
        parts = np.stack(
            [pd.qcut(y2[:, c], q=n_bins, labels=False, duplicates="drop").astype(str) for c in range(y2.shape[1])],
            axis=1,
        ) if n_bins > 1 else np.zeros_like(y2, dtype=str)
    key = np.array(["|".join(row) for row in parts])
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    key = np.where(counts[inverse] < n_folds, _RARE, key)
    rare = key == _RARE
    if 0 < rare.sum() < n_folds:  # the merged stratum is itself too rare: join the largest one
        values, counts = np.unique(key[~rare], return_counts=True)
        key[rare] = values[np.argmax(counts)] if values.size else _RARE
    return key


def check_leakage(df: pd.DataFrame, group_col: str = "group", split_col: str = "split") -> list[tuple[str, list[str]]]:
    """Groups found in more than one split, with those splits (rows without a split are ignored)."""
    for col in (group_col, split_col):
        if col not in df.columns:
            raise ManifestError(f"cannot check leakage: the manifest has no '{col}' column")
    assigned = df[df[split_col].notna()]
    per_group = assigned.groupby(assigned[group_col].astype(str), sort=True)[split_col].unique()
    return [(str(g), sorted(map(str, s))) for g, s in per_group.items() if len(s) > 1]


def enforce_no_leakage(
    df: pd.DataFrame, allow_group_overlap: bool, *, group_col: str = "group", split_col: str = "split"
) -> list[tuple[str, list[str]]]:
    """Raise LeakageError if a group spans splits, unless allowed; return the overlap for the report."""
    overlap = check_leakage(df, group_col=group_col, split_col=split_col)
    if overlap and not allow_group_overlap:
        shown = "; ".join(f"'{g}' in {', '.join(s)}" for g, s in overlap[:10])
        more = f" (and {len(overlap) - 10} more)" if len(overlap) > 10 else ""
        raise LeakageError(
            f"{len(overlap)} groups ('{group_col}') appear in more than one split: {shown}{more}. "
            "Samples of one patient/video/volume on both sides inflate the results: fix the split column, "
            "or use split.mode: generate; set split.allow_group_overlap: true only if you accept the leak"
        )
    return overlap


def _groups(df: pd.DataFrame, group_col: str) -> np.ndarray:
    if group_col not in df.columns:
        raise ManifestError(f"cannot make grouped splits: the manifest has no '{group_col}' column")
    missing = df.index[df[group_col].isna()].tolist()
    if missing:
        raise ManifestError(f"{len(missing)} rows have no '{group_col}' (first rows {missing[:5]})")
    return df[group_col].astype(str).to_numpy()


def _fold_ids(strat: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row from StratifiedGroupKFold (each group lands in exactly one fold).

    With one sample per group this is StratifiedKFold, used directly: StratifiedGroupKFold loops over
    groups in Python and is slow for many thousands of them.
    """
    if n_folds < 2:
        raise FmprobeError(f"need at least 2 groups to split, got {len(np.unique(groups))}")
    x = np.zeros(len(groups))
    if len(np.unique(groups)) == len(groups):
        parts = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x, strat)
    else:
        parts = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x, strat, groups)
    folds = np.full(len(groups), -1)
    for k, (_, held) in enumerate(parts):
        folds[held] = k
    return folds


def _allocate(fractions: list[float], n_folds: int) -> np.ndarray:
    """Whole folds per split in proportion to fractions (largest remainder), >= 1 for every non-zero one."""
    frac = np.asarray(fractions, dtype=np.float64)
    needed = int((frac > 0).sum())
    if n_folds < needed:
        raise FmprobeError(
            f"only {n_folds} groups, too few for {needed} non-empty splits (split.fractions {fractions}); "
            "add data or set a fraction to 0"
        )
    raw = frac * n_folds
    counts = np.floor(raw).astype(int)
    counts[(frac > 0) & (counts == 0)] = 1
    while counts.sum() > n_folds:
        counts[np.argmax(np.where(counts > 1, counts - raw, -np.inf))] -= 1
    while counts.sum() < n_folds:
        counts[np.argmax(np.where(frac > 0, raw - counts, -np.inf))] += 1
    return counts
