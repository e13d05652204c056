"""Labelled subsets of the training split: few-shot episodes, nested label fractions, and their batching.

Every subset is a list of rows of the *training* split, so validation and test groups can never enter one. Both
protocols count labels in groups (patients, videos), never in slices of one group:

- ``shot_episodes``: K examples per class, each from its own group (K patients with that class, one example of the
  class from each), drawn independently per episode;
- ``nested_fractions``: per seed one stratified order of the training groups; a share f labels the first
  ceil(f x groups) of them, so every share contains the smaller ones.

A draw that cannot hold every class (a class with fewer than K groups, a share too small) is reported by
``missing_classes`` / the ``Unavailable`` reason, never silently dropped or shrunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fmprobe.data.splits import stratification_key


@dataclass(frozen=True)
class Unavailable:
    """Why a label budget cannot be drawn."""

    reason: str


def class_columns(task_type: str, y: np.ndarray, num_classes: int | None) -> np.ndarray:
    """Per row, membership ``[n, C]`` of every class an episode must hold (binary: negative and positive)."""
    y = np.asarray(y)
    if task_type == "multiclass":
        assert num_classes is not None
        return np.eye(num_classes, dtype=bool)[y.astype(np.int64)]
    if task_type == "binary":
        return np.stack([y == 0, y == 1], axis=1)
    raise ValueError(f"few-shot episodes draw K examples per class: binary or multiclass tasks, not {task_type}")


def shot_episodes(groups: Sequence[str], y: np.ndarray, *, task_type: str, class_names: Sequence[str], k: int,
                  episodes: int, seed: int = 0) -> list[np.ndarray] | Unavailable:  # fmt: skip
    """``episodes`` draws of K examples per class from K distinct groups each (rows of the training split)."""
    member = class_columns(task_type, y, len(class_names) if task_type == "multiclass" else None)
    groups = np.asarray(groups)
    by_class = []
    for c, name in enumerate(class_names):
        rows = np.flatnonzero(member[:, c])
        owners, first = np.unique(groups[rows], return_inverse=True)
        if len(owners) < k:
            return Unavailable(f"class '{name}' has {len(owners)} training group(s), fewer than K = {k}")
        by_class.append((rows, first, len(owners)))
    draws = []
    for e in range(episodes):
        rng = np.random.default_rng([seed, k, e])
        picked = []
        for rows, owner, n_owners in by_class:
            for g in rng.choice(n_owners, size=k, replace=False):
                candidates = rows[owner == g]
                picked.append(candidates[rng.integers(len(candidates))])
        draws.append(np.asarray(picked, dtype=np.int64))
    return draws


def group_order(groups: Sequence[str], y: np.ndarray, *, task_type: str, seed: int) -> list[str]:
    """The training groups in a seeded, stratified order: each group takes the stratum of its rows' most common
    stratification key (class, label combination, target quantile bin), groups are shuffled within their
    stratum, and the strata are interleaved by relative position, so every prefix holds about its share of
    every stratum."""
    groups = np.asarray(groups).astype(str)
    names, inverse = np.unique(groups, return_inverse=True)
    keys = stratification_key(task_type, np.asarray(y), n_folds=1, n_rows=len(groups))  # no stratum merged
    rng = np.random.default_rng(seed)
    strata: dict[str, list[int]] = {}
    for g in range(len(names)):
        values, counts = np.unique(keys[inverse == g], return_counts=True)
        strata.setdefault(str(values[np.argmax(counts)]), []).append(g)
    position = np.empty(len(names))
    for members in strata.values():
        shuffled = rng.permutation(members)
        position[shuffled] = (np.arange(len(shuffled)) + rng.uniform(size=len(shuffled))) / len(shuffled)
    return [str(names[g]) for g in np.argsort(position, kind="stable")]


def fraction_groups(n_groups: int, fraction: float) -> int:
    """Groups labelled at a share of the training groups: ceil(fraction x groups), at least one."""
    return max(1, math.ceil(fraction * n_groups - 1e-9))


def nested_fractions(groups: Sequence[str], y: np.ndarray, *, task_type: str, fractions: Sequence[float],
                     seed: int) -> dict[float, np.ndarray]:  # fmt: skip
    """Rows of the training split labelled at each share, for one seed; the shares are nested."""
    order = group_order(groups, y, task_type=task_type, seed=seed)
    rank = {g: i for i, g in enumerate(order)}
    row_rank = np.array([rank[str(g)] for g in groups])
    return {f: np.flatnonzero(row_rank < fraction_groups(len(order), f)) for f in fractions}


def missing_classes(task_type: str, y: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """What a labelled subset lacks to fit every head: a class without an example (binary, multiclass), a label
    without a positive or a negative (multilabel), a target without variation (regression)."""
    y = np.asarray(y)
    if task_type == "multiclass":
        present = np.bincount(y.astype(np.int64), minlength=len(class_names)) > 0
        return [n for n, p in zip(class_names, present) if not p]
    if task_type == "binary":
        return [n for n, v in (("negative", 0), ("positive", 1)) if not np.any(y == v)]
    y2 = y.reshape(len(y), -1)
    if task_type == "multilabel":
        return [f"{n} ({side})" for c, n in enumerate(class_names)
                for side, v in (("positive", 1), ("negative", 0)) if not np.any(y2[:, c] == v)]  # fmt: skip
    return [f"{n} (constant)" for c, n in enumerate(class_names) if len(y2) < 2 or np.ptp(y2[:, c]) == 0]


def padded(subsets: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``[S, n_max]`` (short subsets padded with their first row) and the mask of real rows."""
    n = max(len(s) for s in subsets)
    rows = torch.zeros(len(subsets), n, dtype=torch.long)
    mask = torch.zeros(len(subsets), n, dtype=torch.bool)
    for i, s in enumerate(subsets):
        rows[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        rows[i, len(s) :] = int(s[0])
        mask[i, : len(s)] = True
    return rows, mask


def batches(subsets: Sequence[np.ndarray], cells_per_row: int, budget: int = 2**24) -> list[list[int]]:
    """Indices of ``subsets`` in batches whose padded ``rows x cells_per_row`` stays within ``budget`` (the memory
    a fitter's batched tensors take) and whose sizes differ by at most a quarter (padding wastes little)."""
    order = sorted(range(len(subsets)), key=lambda i: len(subsets[i]))
    out: list[list[int]] = []
    for i in order:
        n = len(subsets[i])
        if out and (len(out[-1]) + 1) * n * cells_per_row <= budget and 4 * n <= 5 * len(subsets[out[-1][0]]):
            out[-1].append(i)
        else:
            out.append([i])
    return out
