"""A torch Dataset over manifest rows that reports bad samples instead of raising.

The extraction loop decides what a bad sample means (``data.on_error``: raise or skip), so one
corrupt file never kills a DataLoader worker and every skip is recorded with its reason.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from fmprobe.config import DataConfig
from fmprobe.data.readers import read_media
from fmprobe.data.transforms import Preprocess
from fmprobe.errors import ReaderError


class MediaDataset(Dataset):
    """Item ``i`` = ``{"index": i, "sample_id", "pixels": [K, T, 3, H, W] (empty on error), "error": str | None,
    "seconds": (reading, preprocessing)}`` (the time is what the extraction loop's breakdown reports).

    Randomness (random clips, train crops) is seeded by ``(seed, i)``: the same sample gets the same
    draw in any worker, in any order, on any run.
    """

    def __init__(self, manifest_df: pd.DataFrame, data_cfg: DataConfig, preprocess: Preprocess, seed: int = 0):
        self.sample_ids = manifest_df["sample_id"].astype(str).tolist()
        self.paths = manifest_df["path"].astype(str).tolist()
        self.clip_starts = clip_starts(manifest_df, data_cfg)
        self.data_cfg = data_cfg
        self.preprocess = preprocess
        self.seed = seed

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample_id, path = self.sample_ids[index], self.paths[index]
        rng = np.random.default_rng([self.seed, index])
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        start, read_end = time.perf_counter(), None
        try:
            media = read_media(path, self.data_cfg, sample_id=sample_id, rng=rng, clip_start=self.clip_starts[index])
            read_end = time.perf_counter()
            pixels = self.preprocess(media, generator)
        except ReaderError as err:
            if err.sample_id is None:  # raised by the transform, which does not know the sample
                err = ReaderError(err.reason, sample_id=sample_id, path=path)
            return {"index": index, "sample_id": sample_id, "pixels": torch.empty(0), "error": str(err),
                    "seconds": stage_seconds(start, read_end)}  # fmt: skip
        return {"index": index, "sample_id": sample_id, "pixels": pixels, "error": None,
                "seconds": stage_seconds(start, read_end)}  # fmt: skip


def clip_starts(manifest_df: pd.DataFrame, data_cfg: DataConfig) -> list[int | None]:
    """Each row's clip start (``data.clip_start_column``, loaded as the manifest's ``clip_start``), or None per
    row without the option. Rows that lost the column on the way are an error, not centre clips."""
    if data_cfg.clip_start_column is None:
        return [None] * len(manifest_df)
    if "clip_start" not in manifest_df.columns:
        raise ValueError(f"data.clip_start_column is '{data_cfg.clip_start_column}' but these manifest rows have "
                         "no 'clip_start' column: pass the rows of load_manifest with all their columns")
    return [int(v) for v in manifest_df["clip_start"]]


def stage_seconds(start: float, read_end: float | None) -> tuple[float, float]:
    """(reading, preprocessing) seconds of an item whose work began at ``start`` and whose reading ended at
    ``read_end`` (None if it failed: then all the time went to reading)."""
    end = time.perf_counter()
    return (end - start, 0.0) if read_end is None else (read_end - start, end - read_end)


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch the good items, keep the bad ones apart.

    Returns ``{"index": LongTensor [B], "sample_id": list[str], "pixels": [B, K, T, 3, H, W] or None
    when no item in the batch is good, "errors": list[(index, sample_id, message)], "seconds": (reading,
    preprocessing) summed over the items}``.
    """
    good = [it for it in items if it["error"] is None]
    return {
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "sample_id": [it["sample_id"] for it in good],
        "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
        "errors": [(it["index"], it["sample_id"], it["error"]) for it in items if it["error"] is not None],
        "seconds": tuple(sum(it["seconds"][k] for it in items) for k in range(2)),
    }
