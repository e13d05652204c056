"""End-to-end training on several processes: one global batch, a contiguous shard of it per process.

Every process draws the same epoch order (same seed), cuts each global batch into contiguous shards and
trains through torch's DistributedDataParallel, which averages the gradients. Each shard's loss is weighted so
that the averaged gradient is the single-process one: for a loss that is a mean over the batch, a shard of n_r
of the batch's n_b samples counts ``world * n_r / n_b`` (for multiclass class weights the weighted mean's
mass, the summed weights, takes the place of the counts), times the batch's share of its accumulation group.
With mixup/CutMix every process reads the whole batch, mixes it exactly as one process would (same draws),
then keeps its shard. A process whose shard is empty (a last batch smaller than the world) runs a placeholder
sample with weight 0, so that every process takes part in every gradient reduction.

Evaluation deals whole batches round-robin and puts the scores back in sample order, so validation scores,
early stopping and thresholds are the same on every process. What differs from one process: floating-point
summation order (gradients agree to ~1e-6), and dropout / drop-path masks, which each process draws from its
own stream. A sample that fails to read during training cannot be skipped the same way on every process:
that raises, whatever ``data.on_error`` says.

With a single process every method returns what the single-process trainer computed before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fmprobe import distributed
from fmprobe.errors import FmprobeError
from fmprobe.train.seeding import restart_stream


class Part(NamedTuple):
    """This process's rows of one global batch and what their mean loss counts for."""

    pixels: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    weight: float  # factor of the rows' mean loss in the backward pass
    loss_share: float  # factor of the rows' mean loss in the epoch's summed training loss
    real: int  # rows that are real samples (0 for a placeholder)


class DataParallel:
    """This process's part of each step of end-to-end training (``adapt.pixels``, ``adapt.members``)."""

    def __init__(self, model: nn.Module, loss: nn.Module, y_train: torch.Tensor, task_type: str, *, mix: bool,
                 device: torch.device):  # fmt: skip
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.model, self.mix, self.device, self.y_train = model, mix, device, y_train
        weight = getattr(loss, "weight", None) if task_type == "multiclass" and not mix else None
        self.class_weight = None if weight is None else weight.detach().cpu().double()
        self._ddp: DistributedDataParallel | None = None
        self._trains: tuple[bool, ...] | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    def reseed(self, seed: int) -> None:
        """Independent dropout / drop-path streams per process (the weights start equal: DDP broadcasts rank 0's)."""
        if self.active:
            restart_stream(int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0]))

    def training_model(self) -> nn.Module:
        """The model to run training forwards through: DDP-wrapped, re-wrapped when the set of trainable
        parameters changed (``adapt.unfreeze_at_epoch``), since DDP reduces the parameters it was built with."""
        if not self.active:
            return self.model
        trains = tuple(p.requires_grad for p in self.model.parameters())
        if trains != self._trains:
            self._ddp = None  # drop the old reducer (and its hooks) before a new one registers its own
            ids = [self.device.index] if self.device.type == "cuda" else None
            # unused: e.g. adapters in blocks after the head's layer, which get no gradient (as in one process)
            self._ddp = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
            self._trains = trains
        return self._ddp

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduced once per optimizer step: on the last micro-batch of an accumulation group."""
        if self._ddp is None or last:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def loads(self, batch: Sequence[int]) -> list[int]:
        """The training indices this process reads for one global batch."""
        if not self.active or self.mix:
            return list(batch)
        return self._shard(batch) or list(batch[:1])

    def _shard(self, batch: Sequence[int]) -> list[int]:
        return [batch[i] for i in distributed.block(len(batch), self.rank, self.world)]

    def group_size(self, batches: Sequence[Sequence[int]], loaded: Sequence[dict[str, Any]]) -> int:
        """Samples in an accumulation group: of the global batches (several processes: no sample is skipped),
        else of what was read."""
        return sum(len(b) for b in batches) if self.active else sum(len(b["index"]) for b in loaded)

    def take(self, batch: Sequence[int], idx: torch.Tensor, pixels: torch.Tensor, y: torch.Tensor,
             group_size: int) -> Part:  # fmt: skip
        """This process's rows of a loaded (and possibly mixed) global ``batch``."""
        if not self.active:
            return Part(pixels, y, idx, len(idx) / group_size, len(idx), len(idx))
        rows = list(distributed.block(len(batch), self.rank, self.world))
        if self.mix:  # the whole batch was read and mixed: keep this process's rows
            keep = rows or [0]
            pixels, y, idx = pixels[keep], y[keep], idx[keep]
        if not rows:
            return Part(pixels, y, idx, 0.0, 0.0, 0)
        share = self._mass(idx) / self._mass(torch.as_tensor(list(batch)))  # of the batch's mean loss
        return Part(pixels, y, idx, self.world * share * len(batch) / group_size, share * len(batch), len(rows))

    def _mass(self, idx: torch.Tensor) -> float:
        """What the loss's mean divides by: the count, or the summed class weights (multiclass)."""
        if self.class_weight is None:
            return float(len(idx))
        return float(self.class_weight[self.y_train[idx].long()].sum())

    def gather_epoch(self, loss_sum: np.ndarray, seen: int, outputs: list[torch.Tensor], idx: list[torch.Tensor]
                     ) -> tuple[np.ndarray, int, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        """The epoch's summed losses, samples, and per-batch outputs ``[H, b, ...]`` / indices of all processes, in
        batch order."""
        if not self.active:
            return loss_sum, seen, outputs, idx
        parts = distributed.all_gather_object((loss_sum, seen, outputs, idx))
        merged_outputs = [torch.cat([p[2][j] for p in parts], dim=1) for j in range(len(outputs))]
        merged_idx = [torch.cat([p[3][j] for p in parts]) for j in range(len(idx))]
        return sum(p[0] for p in parts), sum(p[1] for p in parts), merged_outputs, merged_idx

    def eval_batches(self, n: int, batch_size: int) -> list[list[int]]:
        """The evaluation batches this process scores (whole batches, round-robin)."""
        batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
        return [batches[j] for j in distributed.round_robin(len(batches), self.rank, self.world)]

    def gather_eval(self, out: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every process's evaluation batches back in sample order."""
        return distributed.interleave(distributed.all_gather_object(out)) if self.active else out

    def refuse_skip(self, message: str) -> None:
        if self.active:
            raise FmprobeError(
                f"{message} — when training on {self.world} processes a sample cannot be skipped the same way on "
                "every process (data.on_error: skip); fix the file or remove it from the manifest, or train in "
                "one process"
            )
