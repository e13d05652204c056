"""The batch source of end-to-end training: pixels read, preprocessed and augmented per epoch.

Training batches follow the epoch's order (a permutation, or class-balanced draws with
``train.balanced_sampler``) from ``data_generator(seed)``; each epoch gets a fresh augmentation draw
(``MediaDataset`` seeds crops by (seed, index)); mixup/CutMix mix pixels and targets per batch; with several
processes each takes its shard of every global batch (``adapt.data_parallel``). A sample that fails to read
honours ``data.on_error`` (raise, or skip and record). Evaluation reads each split once per call, with
test-time augmentation averaged as scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from fmprobe.adapt.data_parallel import DataParallel
from fmprobe.adapt.mixup import apply_mix, draw_mix, enabled, soft_targets
from fmprobe.adapt.tta import tta_scores
from fmprobe.config import DataConfig, Experiment
from fmprobe.data.dataset import MediaDataset, collate_samples
from fmprobe.data.masks import MaskedMediaDataset, collate_with_masks
from fmprobe.data.transforms import Preprocess
from fmprobe.errors import ConfigError, ReaderError
from fmprobe.train.core import Batch, Members
from fmprobe.train.sampling import balanced_weights, epoch_order
from fmprobe.train.scoring import to_scores
from fmprobe.train.seeding import data_generator

if TYPE_CHECKING:
    from fmprobe.adapt.multitask import JointSegmentation


class PixelBatches:
    def __init__(self, exp: Experiment, rows: dict[str, pd.DataFrame], fit_targets: dict[str, np.ndarray], seed: int,
                 *, device: torch.device, task_type: str, out_dim: int, parallel: DataParallel,
                 autocast: Callable, seg: JointSegmentation | None, steps_per_epoch: int):  # fmt: skip
        self.exp, self.rows, self.y, self.seed, self.device = exp, rows, fit_targets, seed, device
        self.task_type, self.out_dim, self.parallel, self.autocast, self.seg = task_type, out_dim, parallel, autocast, seg
        self.steps_per_epoch = steps_per_epoch
        self.spec = parallel.model.encoder.input_spec
        self.eval_data = _eval_data(exp.data, exp.adapt.tta.clips)
        self.y_train = parallel.y_train
        self.weights = balanced_weights(fit_targets["train"], task_type) if exp.train.balanced_sampler else None
        self.order, self.mix_rng = data_generator(seed), np.random.default_rng(seed)
        self.skipped: list[list[str]] = []

    def targets(self, split: str) -> np.ndarray:
        return self.y[split]

    def groups(self, epoch: int) -> Iterator[list[Batch]]:
        exp, parallel = self.exp, self.parallel
        data_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        indices = epoch_order(len(self.y_train), self.order, self.weights).tolist()
        batches = [indices[i : i + exp.train.batch_size] for i in range(0, len(indices), exp.train.batch_size)]
        loads = [parallel.loads(b) for b in batches]
        loader = iter(self._loader(self.rows["train"], exp.data, train=True, seed=data_seed, sampler=loads))
        for start in range(0, len(batches), exp.train.grad_accum):
            chunk = batches[start : start + exp.train.grad_accum]
            group = [(b, self._good(next(loader))) for b in chunk]
            group = [(b, batch) for b, batch in group if batch is not None]
            group_size = parallel.group_size(chunk, [batch for _, batch in group])
            yield [self._batch(global_batch, batch, group_size) for global_batch, batch in group]

    def _batch(self, global_batch: list[int], batch: dict[str, Any], group_size: int) -> Batch:
        idx = batch["index"]
        pixels = batch["pixels"].to(self.device)
        y = self.y_train[idx]
        mix = draw_mix(self.exp.adapt.mix, len(idx), tuple(pixels.shape[-2:]), self.mix_rng)
        if mix.kind != "none":
            pixels, y = apply_mix(mix, pixels, soft_targets(y, self.task_type, self.out_dim))
        part = self.parallel.take(global_batch, idx, pixels, y, group_size)
        extra = {"mask": batch["mask"]} if self.seg is not None else {}
        return Batch(part.pixels, part.y.to(self.device), part.idx, part.weight, part.loss_share, part.real, extra)

    def _good(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Training batches honour data.on_error: raise, or skip the sample and record it."""
        for _, sample_id, message in batch["errors"]:
            if self.exp.data.on_error == "raise":
                raise ReaderError(message)  # the dataset's message names the sample and file
            self.parallel.refuse_skip(message)
            self.skipped.append([sample_id, message])
        return batch if batch["pixels"] is not None else None

    def _loader(self, rows: pd.DataFrame, data: DataConfig, *, train: bool, seed: int, sampler: Any) -> DataLoader:
        dataset = MediaDataset(rows, data, Preprocess(self.spec, data, train=train), seed=seed)
        collate = collate_samples
        if train and self.seg is not None:  # training batches carry their masks (same crop and flip as the pixels)
            dataset = MaskedMediaDataset(rows, data, dataset.preprocess, len(self.seg.cfg.class_names), seed=seed)
            collate = collate_with_masks
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.exp.data.num_workers)

    def gather(self, loss_sum: np.ndarray, seen: int, outputs: list[torch.Tensor], index: list[torch.Tensor]
               ) -> tuple[np.ndarray, int, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        return self.parallel.gather_epoch(loss_sum, seen, outputs, index)

    @torch.no_grad()
    def predict(self, members: Members, split: str) -> tuple[torch.Tensor, str]:
        """Scores ``[1, N, ...]`` of a split in the task's convention, averaged over the TTA views; every sample
        must read."""
        members.train(False)
        model = self.parallel.model
        out = []
        mine = self.parallel.eval_batches(len(self.rows[split]), self.exp.train.batch_size)
        for batch in self._loader(self.rows[split], self.eval_data, train=False, seed=0, sampler=mine):
            if batch["errors"]:
                message = batch["errors"][0][2]
                raise ReaderError(f"{message} (it was readable when features were extracted)")
            with self.autocast():
                out.append(tta_scores(model, batch["pixels"].to(self.device), self.exp.adapt.tta,
                                      lambda z: to_scores(z.float().cpu(), self.task_type)))  # fmt: skip
        return torch.cat(self.parallel.gather_eval(out))[None], "scores"


def pixel_inputs(exp: Experiment) -> dict[str, Any]:
    """What end-to-end training trains on (recorded in metrics.json beside the curves): pixels through the moving
    backbone, with the augmentation (``data.augment``), mixing and sampling in force."""
    mix = exp.adapt.mix
    return {"inputs": "pixels read and encoded every epoch by the backbone as it trains",
            "augmentation": exp.data.augment.model_dump(),
            "mix": mix.model_dump() if enabled(mix) else None,
            "sampling": "class-balanced draws" if exp.train.balanced_sampler else "a permutation per epoch"}


def _eval_data(data: DataConfig, clips: int) -> DataConfig:
    """Evaluation reads ``adapt.tta.clips`` uniformly spaced clips when asked (videos and slice stacks only)."""
    if clips == 1:
        return data
    if data.kind == "image" or (data.kind == "volume" and data.volume_mode == "slices"):
        raise ConfigError("adapt.tta.clips > 1 needs clips: data.kind video, or volume with volume_mode stack")
    return data.model_copy(update={"clip_position": "uniform", "num_clips": clips})
