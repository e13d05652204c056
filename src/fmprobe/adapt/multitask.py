"""Multi-task end-to-end training: the main head and a segmentation decoder on one shared, moving backbone.

Loss = main loss + ``segmentation.loss_weight`` x pixel cross-entropy over the batch's rows that have a mask
(rows without one contribute nothing). Each head of the run gets its own decoder; one encoder pass feeds both
(the head's layer and ``segmentation.layer``). The checkpoint is chosen on the main validation metric, as
without segmentation, and the decoder's mIoU is reported at that checkpoint. ``staged`` starts each seed's
decoder from the frozen-token decoder of stage 1 (fmprobe.probes.segmentation), as its heads start from theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from fmprobe.adapt.model import AdaptModel, Standardise, encoder_batch, encoder_inputs
from fmprobe.adapt.param_groups import GroupSpec, build_groups, count
from fmprobe.adapt.setup import Prepared
from fmprobe.backbones.base import Encoder, EncoderOutput, InputSpec, LayerRef, spatial_grid
from fmprobe.config import Experiment, FeatureConfig
from fmprobe.data.dataset import MediaDataset, collate_samples
from fmprobe.data.transforms import Preprocess
from fmprobe.errors import ReaderError
from fmprobe.evaluate.results import SPLITS, SegCounts, SegResults, SegRun
from fmprobe.evaluate.segmentation import iou_counts, seg_metrics
from fmprobe.probes.segmentation import (decoder_tokens, fit_decoder, frames_per_sample, load_split_masks,
                                         prior_counts, token_stats)  # fmt: skip
from fmprobe.train.core import Fit
from fmprobe.features.extract import frames_grid, pool_tokens
from fmprobe.features.store import FeatureSet
from fmprobe.heads.segmentation import SegDecoder, frame_tokens, segmentation_loss


class MultiTaskModel(AdaptModel):
    """``forward(pixels) -> main logits`` exactly as :class:`AdaptModel` (so TTA, data parallel and prediction work
    unchanged); the same pass's segmentation logits ``[B, K, H, W]`` are kept in ``seg_logits``."""

    def __init__(self, encoder: Encoder, head: nn.Module, *, layer: LayerRef, pooling: str, features: FeatureConfig,
                 standardise: Standardise | None, decoder: SegDecoder, seg_layer: LayerRef, frames: int):  # fmt: skip
        super().__init__(encoder, head, layer=layer, pooling=pooling, features=features, standardise=standardise)
        self.decoder = decoder
        self.seg_layer, self.frames = seg_layer, frames
        self.seg_logits: torch.Tensor | None = None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits, self.seg_logits = self.both(pixels)
        return logits

    def both(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = [self.layer] if str(self.seg_layer) == str(self.layer) else [self.layer, self.seg_layer]
        out = self.encoder.encode(encoder_batch(self.encoder, pixels), layers)
        inputs = encoder_inputs(self.encoder, pixels, self.layer, self.pooling, self.features, out=out)
        return self.head(self.standardise(inputs)), self.decoder(self._seg_tokens(out, pixels))

    def _seg_tokens(self, out: EncoderOutput, pixels: torch.Tensor) -> torch.Tensor:
        """The center frame's ``[B, h, w, D]`` tokens, pooled as the feature cache pools them."""
        b, k, t = pixels.shape[:3]
        name = str(self.seg_layer)
        tokens = out.tokens[name].float()
        grid = spatial_grid(out.grid[name], name, "the segmentation decoder")
        grid = frames_grid(grid, t, self.encoder.input_spec.kind == "video")
        tokens = tokens.reshape(b, k, -1, tokens.shape[-1]).mean(1)
        tokens, grid = pool_tokens(tokens, grid, self.features.token_grid, self.features.temporal_pool, point=name)
        return frame_tokens(tokens, grid, self.frames)


class JointSegmentation:
    """What the adapt trainer needs for the segmentation term: masks, decoders, their parameter group, the loss,
    and the evaluation of every split at the chosen checkpoint."""

    def __init__(self, exp: Experiment, features: FeatureSet, df: pd.DataFrame, split_ids: dict[str, list[str]],
                 spec: InputSpec, run_dir: Path):  # fmt: skip
        assert exp.segmentation is not None
        self.exp, self.cfg, self.spec = exp, exp.segmentation, spec
        self.masks = load_split_masks(exp, df, split_ids, spec)
        x_train = decoder_tokens(exp, features, self.masks.ids["train"])
        self.in_dim = int(x_train.shape[-1])
        self.mean, self.std = token_stats(x_train)  # fixed z-scoring, from the frozen backbone's training tokens
        self.stage1: dict[int, dict[str, torch.Tensor]] = {}
        if exp.adapt.strategy == "staged":  # stage 1: the frozen-token decoder of each seed
            x = {s: decoder_tokens(exp, features, self.masks.ids[s]) for s in SPLITS}
            for seed in exp.train.seeds:
                folder = run_dir / "checkpoints" / "stage1" / "segmentation" / f"seed{seed}"
                _, decoder = fit_decoder(exp, x, self.masks, seed, mean=self.mean, std=self.std,
                                         out_size=spec.image_size, checkpoint_dir=folder)  # fmt: skip
                self.stage1[seed] = decoder.state_dict()
        self.runs: list[SegRun] = []
        self.test_masks: dict[str, np.ndarray] = {}
        self._epoch_losses: list[float] = []

    def decoder(self, seed: int) -> SegDecoder:
        """A fresh decoder (call inside the seed's RNG block), or stage 1's for staged."""
        decoder = SegDecoder(self.in_dim, len(self.cfg.class_names), self.cfg.decoder, self.spec.image_size,
                             self.mean, self.std)  # fmt: skip
        decoder.reset_parameters()
        if seed in self.stage1:
            decoder.load_state_dict(self.stage1[seed])
        return decoder

    def model(self, encoder: Encoder, head: nn.Module, *, layer: LayerRef, pooling: str,
              standardise: Standardise | None, decoder: SegDecoder) -> MultiTaskModel:  # fmt: skip
        return MultiTaskModel(encoder, head, layer=layer, pooling=pooling, features=self.exp.features,
                              standardise=standardise, decoder=decoder, seg_layer=self.cfg.layer,
                              frames=frames_per_sample(self.exp))  # fmt: skip

    def add_group(self, prepared: Prepared, decoder: SegDecoder) -> None:
        """The decoder trains like the head's group (lr, weight decay, warmup), at ``segmentation.lr`` when set."""
        adapt, train = self.exp.adapt, self.exp.train
        head = adapt.stage2.head if adapt.strategy == "staged" else adapt.head
        spec = GroupSpec(lr=self.cfg.lr or head.lr or train.lr,
                         weight_decay=train.weight_decay if head.weight_decay is None else head.weight_decay,
                         warmup_epochs=train.warmup_epochs if head.warmup_epochs is None else head.warmup_epochs)
        groups = build_groups({"segmentation": list(decoder.named_parameters())}, {"segmentation": spec},
                              steps_per_epoch=prepared.steps_per_epoch)  # fmt: skip
        prepared.groups += groups
        prepared._params += [(g["start_step"], p) for g in groups for p in g["params"]]
        prepared.trainable += count(decoder.parameters())

    def batch_loss(self, model: MultiTaskModel, mask: torch.Tensor) -> torch.Tensor:
        """``loss_weight`` x the cross-entropy of the last forward pass's segmentation logits (masked rows only)."""
        logits, model.seg_logits = model.seg_logits, None
        assert logits is not None, "batch_loss needs a forward pass first"
        value = segmentation_loss(logits, mask.to(logits.device))
        self._epoch_losses.append(value.item())
        return self.cfg.loss_weight * value

    def end_epoch(self) -> dict[str, float]:
        """The epoch's mean segmentation loss (per batch), for the curves."""
        mean = float(np.mean(self._epoch_losses)) if self._epoch_losses else float("nan")
        self._epoch_losses = []
        return {"train_seg_loss": mean}

    @torch.no_grad()
    def evaluate(self, model: MultiTaskModel, name: str, seed: int, fit: Fit, *, device: torch.device,
                 autocast: Callable) -> SegRun:  # fmt: skip
        """Every split's counts at the chosen checkpoint (TTA hflip honoured: probabilities averaged)."""
        model.eval()
        k = len(self.cfg.class_names)
        counts = {}
        for split in SPLITS:
            rows = self.masks.rows[split]
            dataset = MediaDataset(rows, self.exp.data, Preprocess(self.spec, self.exp.data, train=False))
            preds = []
            for batch in DataLoader(dataset, batch_size=self.exp.train.batch_size, collate_fn=collate_samples,
                                    num_workers=self.exp.data.num_workers):  # fmt: skip
                if batch["errors"]:
                    raise ReaderError(f"{batch['errors'][0][2]} (it was readable when features were extracted)")
                pixels = batch["pixels"].to(device)
                with autocast():
                    probs = model.both(pixels)[1].float().softmax(1)
                    if self.exp.adapt.tta.hflip:
                        probs = (probs + model.both(pixels.flip(-1))[1].float().softmax(1).flip(-1)) / 2
                preds.append(probs.argmax(1).to(torch.uint8).cpu())
            pred = torch.cat(preds).numpy()
            counts[split] = SegCounts(self.masks.ids[split], *iou_counts(pred, self.masks.masks[split], k))
            if split == "test":
                self.test_masks.setdefault(name, pred)
        val = seg_metrics(counts["val"].inter, counts["val"].union, self.cfg.class_names)["miou"]
        curves = [{"epoch": row["epoch"], "train_seg_loss": row["train_seg_loss"]} for row in fit.curves]
        run = SegRun(name, seed, fit.best_epoch, val, fit.stopped_early, curves, counts,
                     count(model.decoder.parameters()))  # fmt: skip
        self.runs.append(run)
        return run

    def results(self) -> SegResults:
        trained = (f"a {self.cfg.decoder} decoder per head on layer {self.cfg.layer}, trained jointly with the head "
                   f"through the shared {self.exp.adapt.strategy} backbone (loss = main + {self.cfg.loss_weight} x "
                   "segmentation cross-entropy on the rows with a mask); checkpoint chosen on the main validation "
                   "metric")  # fmt: skip
        return SegResults("adapted", trained, self.runs, prior_counts(self.masks, len(self.cfg.class_names)),
                          {s: len(self.masks.ids[s]) for s in SPLITS}, self.test_masks)  # fmt: skip
