"""Batch sources of the training core for inputs held in memory or memory-mapped: cached features (an epoch is a
pass in a seeded order) and random minibatches drawn with replacement (a fixed number of steps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from fmprobe.train.core import Batch, Members
from fmprobe.train.sampling import epoch_order
from fmprobe.train.schedule import steps_per_epoch
from fmprobe.train.seeding import data_generator

EVAL_BATCH = 512  # no gradients at evaluation: larger batches, fewer Python round trips
EVAL_VALUES = 1 << 22  # ... and for small rows (pooled features) up to this many input values (16 MB) per batch


class HeadData(NamedTuple):
    """Inputs ([N, D] pooled, [N, Ntok, D] tokens or [N, h, w, D] grids; fp16 or memmap-backed arrays are cast
    per batch) and their fit targets."""

    x: torch.Tensor | np.ndarray
    y: np.ndarray


def feature_batch(x: torch.Tensor | np.ndarray, rows: torch.Tensor | slice, device: str | torch.device
                  ) -> torch.Tensor:  # fmt: skip
    """Rows of ``x`` (indices, or a contiguous block: of a float32 tensor already on ``device``, a view with no copy)
    as float32 on ``device`` (memory-mapped arrays are read here)."""
    if isinstance(rows, slice):
        block = x[rows]
    elif isinstance(x, torch.Tensor):
        block = x.index_select(0, rows.to(x.device))
    else:
        block = x[rows.numpy()]
    if not isinstance(block, torch.Tensor):
        block = torch.from_numpy(np.ascontiguousarray(block))
    return block.to(device=device, dtype=torch.float32)


class _OneProcess:
    def gather(self, loss_sum: np.ndarray, seen: int, outputs: list[torch.Tensor], index: list[torch.Tensor]
               ) -> tuple[np.ndarray, int, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        """One process trains on these inputs: its record is the whole record."""
        return loss_sum, seen, outputs, index


class CachedBatches(_OneProcess):
    """Training batches of ``batch_size`` in an order drawn from ``data_generator(seed)`` each epoch (a
    permutation, or class-balanced draws with ``sample_weights``), grouped by ``grad_accum``; every split
    predicted in batches of EVAL_BATCH. ``to_tensor`` turns fit targets into what the loss takes."""

    def __init__(self, data: dict[str, HeadData], *, to_tensor: Callable[[np.ndarray], torch.Tensor],
                 batch_size: int, grad_accum: int, seed: int, device: str | torch.device = "cpu",
                 sample_weights: np.ndarray | None = None):  # fmt: skip
        for split, part in data.items():
            if len(part.x) != len(part.y):
                raise ValueError(f"{split}: {len(part.x)} feature rows but {len(part.y)} targets")
            if len(part.y) == 0:
                raise ValueError(f"{split}: no samples")
        self.data, self.device = data, device
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.y_train = to_tensor(data["train"].y).to(device)
        self.order, self.weights = data_generator(seed), sample_weights
        self.steps_per_epoch = steps_per_epoch(len(self.y_train), batch_size, grad_accum)

    def groups(self, epoch: int) -> Iterator[list[Batch]]:
        x, y = self.data["train"].x, self.y_train
        batches = epoch_order(len(y), self.order, self.weights).split(self.batch_size)
        for start in range(0, len(batches), self.grad_accum):
            group = batches[start : start + self.grad_accum]
            sizes = [idx.numel() for idx in group]
            total = sum(sizes)
            yield [Batch(feature_batch(x, idx, self.device), y[idx if y.is_cpu else idx.to(y.device)], idx,
                         n / total, n, n) for idx, n in zip(group, sizes)]  # fmt: skip

    def targets(self, split: str) -> np.ndarray:
        return self.data[split].y

    def predict(self, members: Members, split: str) -> tuple[torch.Tensor, str]:
        members.train(False)
        return predict_inputs(members.predict, self.data[split].x, self.device), "logits"


@torch.no_grad()
def predict_inputs(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor | np.ndarray,
                   device: str | torch.device) -> torch.Tensor:  # fmt: skip
    """Outputs ``[H, N, ...]`` of ``predict`` (members in eval mode) on ``x``, in blocks of EVAL_BATCH rows or,
    for small rows, EVAL_VALUES values (a validation split of pooled features is usually one block)."""
    size = max(EVAL_BATCH, EVAL_VALUES // max(1, int(np.prod(x.shape[1:]))))
    outputs = [predict(feature_batch(x, slice(i, i + size), device)) for i in range(0, len(x), size)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


class DrawnBatches(_OneProcess):
    """``steps`` minibatches of ``batch_size`` rows drawn with replacement, as one epoch. The draws come from
    the torch stream of the enclosing ``seeded`` block (so a probe's initialisation and its batches follow one
    seed). Inputs and targets are whatever ``take(rows)`` returns; there is no validation split."""

    def __init__(self, n: int, take: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], *,
                 steps: int, batch_size: int):  # fmt: skip
        self.n, self.take, self.steps, self.batch_size = n, take, steps, min(batch_size, n)
        self.steps_per_epoch = steps

    def groups(self, epoch: int) -> Iterator[list[Batch]]:
        for _ in range(self.steps):
            rows = torch.randint(self.n, (self.batch_size,))
            inputs, targets = self.take(rows)
            yield [Batch(inputs, targets, rows, 1.0, len(rows), len(rows))]

    def targets(self, split: str) -> np.ndarray:
        raise KeyError(f"drawn batches have no {split} split to score")

    def predict(self, members: Members, split: str) -> tuple[torch.Tensor, str]:
        raise KeyError(f"drawn batches have no {split} split to predict")
