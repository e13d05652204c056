"""Which sample goes to train, val and test for a run, with the leakage check that always runs."""

from __future__ import annotations

from typing import Any

import pandas as pd

from fmprobe.config import SplitConfig, TaskConfig
from fmprobe.data.manifest import Manifest
from fmprobe.data.splits import enforce_no_leakage, kfold_splits, make_splits
from fmprobe.errors import ConfigError, ManifestError

SPLIT_NAMES = ("train", "val", "test")


def resolve_splits(manifest: Manifest, task: TaskConfig, cfg: SplitConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Return the manifest with a complete ``split`` column, and what the report must say about it."""
    df = manifest.df.copy()
    if cfg.mode == "given":
        if "split" not in df.columns or df["split"].isna().all():
            raise ConfigError(
                "split.mode is 'given' but the manifest has no split column; add a 'split' column "
                "(train/val/test) or set split.mode: generate"
            )
        missing = df.index[df["split"].isna()]
        if len(missing):
            ids = ", ".join(df.loc[missing[:10], "sample_id"].astype(str))
            raise ManifestError(
                f"{len(missing)} rows have no split value (e.g. {ids}); fill them or set split.mode: generate"
            )
    elif cfg.mode == "generate":
        df["split"] = make_splits(df, task, cfg, manifest.targets(df)).to_numpy()
    else:
        raise ConfigError(f"split.mode '{cfg.mode}' gives several folds; use resolve_folds")
    return df, _checked(df, cfg)


def resolve_folds(manifest: Manifest, task: TaskConfig, cfg: SplitConfig) -> list[tuple[pd.DataFrame, dict[str, Any]]]:
    """One (manifest with split column, report info) per fold: a single one unless split.mode is kfold.

    kfold keeps one held-out test set (``fractions[2]`` of the groups) and rotates validation over
    ``folds`` stratified group folds of the rest, so every fold is scored on the same test samples.
    """
    if cfg.mode != "kfold":
        return [resolve_splits(manifest, task, cfg)]
    if cfg.fractions[2] <= 0:
        raise ConfigError("split.mode kfold needs a held-out test set: set split.fractions[2] above 0")
    folds = []
    for k, column in enumerate(kfold_splits(manifest.df, task, cfg, manifest.targets(manifest.df))):
        df = manifest.df.copy()
        df["split"] = column.to_numpy()
        folds.append((df, {**_checked(df, cfg), "fold": k, "folds": cfg.folds}))
    return folds


def _checked(df: pd.DataFrame, cfg: SplitConfig) -> dict[str, Any]:
    counts = {s: int((df["split"] == s).sum()) for s in SPLIT_NAMES}
    empty = [s for s, n in counts.items() if n == 0]
    if empty:
        raise ConfigError(f"split(s) {empty} have no samples (sizes: {counts}); every run needs train, val and test")
    overlap = enforce_no_leakage(df, allow_group_overlap=cfg.allow_group_overlap)
    return {
        "mode": cfg.mode,
        "sizes": counts,
        "groups": {s: int(df.loc[df["split"] == s, "group"].nunique()) for s in SPLIT_NAMES},
        "allow_group_overlap": cfg.allow_group_overlap,
        "group_overlap": overlap,
        "seed": cfg.seed if cfg.mode != "given" else None,
    }
