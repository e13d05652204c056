"""The auxiliary segmentation probe on cached tokens: masks per split, decoder inputs, one decoder per seed.

Frozen path: a separate probe (no parameters shared with the heads, so joint training would change nothing),
trained on the cached patch tokens of ``segmentation.layer`` for the samples with a mask, its epoch chosen on
validation mIoU (early stopping with ``train.early_stopping``'s patience when set), then every split scored
once. The adapted path (fmprobe.adapt.multitask) reuses the masks, the token statistics and, for ``staged``,
these decoders as its stage 1. Decoders train through the training core (``fmprobe.train``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmprobe.backbones.base import InputSpec, spatial_grid
from fmprobe.config import Experiment
from fmprobe.data.masks import load_masks
from fmprobe.errors import ConfigError
from fmprobe.evaluate.results import SPLITS, SegCounts, SegResults, SegRun
from fmprobe.evaluate.segmentation import iou_counts, location_prior, seg_metrics
from fmprobe.features.store import FeatureSet
from fmprobe.heads.segmentation import SegDecoder, frame_tokens, segmentation_loss
from fmprobe.probes.frozen import save_checkpoints
from fmprobe.train.core import EpochReport, FitPlan, StopRule, fit
from fmprobe.train.members import ModuleMember
from fmprobe.train.optim import decay_groups
from fmprobe.train.seeding import seeded
from fmprobe.train.sources import EVAL_BATCH, CachedBatches, HeadData


def check_segmentation(exp: Experiment) -> None:
    """Refuse, before any work, what the segmentation head cannot do honestly."""
    seg, data = exp.segmentation, exp.data
    if seg is None:
        return
    if len(seg.class_names) > 256:
        raise ConfigError(f"segmentation.class_names has {len(seg.class_names)} classes; at most 256 are supported")
    if data.kind == "volume":
        raise ConfigError("segmentation masks are 2D (one per image, or per video clip's center frame); volumes are "
                          "not supported: export the slices as images with their masks and use data.kind: image")
    if data.kind == "video" and (data.clip_position != "center" or data.num_clips != 1):
        raise ConfigError("segmentation on video needs one clip per sample whose center frame the mask labels: set "
                          f"data.clip_position: center and data.num_clips: 1 (got {data.clip_position}, "
                          f"{data.num_clips})")  # fmt: skip
    if exp.split.mode == "kfold":
        raise ConfigError("segmentation does not run with split.mode kfold; use split.mode given or generate")
    if not exp.features.store_tokens:
        raise ConfigError("segmentation reads patch tokens: set features.store_tokens: true")
    adapt = exp.adapt
    if adapt.strategy != "frozen":
        if adapt.mix.prob > 0 and (adapt.mix.mixup_alpha > 0 or adapt.mix.cutmix_alpha > 0):
            raise ConfigError("adapt.mix (mixup/CutMix) would mix pixels without mixing masks; with segmentation set "
                              "adapt.mix.mixup_alpha and cutmix_alpha to 0")  # fmt: skip
        if adapt.tta.clips > 1:
            raise ConfigError("adapt.tta.clips > 1 scores several clips, but a mask labels one clip's center frame; "
                              "with segmentation keep adapt.tta.clips: 1")  # fmt: skip


def frames_per_sample(exp: Experiment) -> int:
    return exp.data.frames_per_clip if exp.data.kind == "video" else 1


def stored_input_spec(features: FeatureSet) -> InputSpec:
    """The encoder's input spec as recorded with the cached features (the masks follow its geometry)."""
    spec = json.loads((features.store_dir / "config.json").read_text())["input_spec"]
    return InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})


@dataclass
class MaskSet:
    """Evaluation masks ``[n, H', W']`` uint8 of the samples with one, per split, in split order."""

    ids: dict[str, list[str]]
    masks: dict[str, np.ndarray]
    rows: dict[str, pd.DataFrame]  # their manifest rows (sample_id, path, mask)


def load_split_masks(exp: Experiment, df: pd.DataFrame, split_ids: dict[str, list[str]], spec: InputSpec) -> MaskSet:
    assert exp.segmentation is not None
    by_id = df.drop_duplicates("sample_id").set_index("sample_id")
    ids, masks, rows = {}, {}, {}
    for split in SPLITS:
        columns = ["sample_id", "path", "mask"] + (["clip_start"] if exp.data.clip_start_column else [])
        part = by_id.loc[split_ids[split]].reset_index()[columns]
        part = part[part["mask"].notna()].reset_index(drop=True)
        if part.empty:
            why = {"train": "to train the decoder", "val": "to choose its epoch", "test": "to report its mIoU"}[split]
            raise ConfigError(f"no {split} sample has a mask in column '{exp.data.mask_column}' (data.mask_column); "
                              f"segmentation needs masks in the {split} split {why}")  # fmt: skip
        ids[split], rows[split] = part["sample_id"].tolist(), part
        masks[split] = load_masks(part, exp.data, spec, len(exp.segmentation.class_names), exp.features.batch_size)
    return MaskSet(ids, masks, rows)


def decoder_tokens(exp: Experiment, features: FeatureSet, ids: list[str]) -> np.ndarray:
    """Cached ``[n, h, w, D]`` float16 tokens of the mask layer, center frame for clips."""
    assert exp.segmentation is not None
    layer = str(exp.segmentation.layer)
    subset = features.subset(ids)
    grid = spatial_grid(subset.grid(layer), layer, "the segmentation decoder")
    return np.ascontiguousarray(frame_tokens(subset.tokens(layer), grid, frames_per_sample(exp)))


def token_stats(x: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``[n, h, w, D]`` tokens (chunked: no float32 copy of the whole split)."""
    d = x.shape[-1]
    total, sq, count = np.zeros(d), np.zeros(d), 0
    for i in range(0, len(x), chunk):
        part = np.asarray(x[i : i + chunk], dtype=np.float64).reshape(-1, d)
        total, sq, count = total + part.sum(0), sq + (part**2).sum(0), count + len(part)
    mean = total / count
    return mean.astype(np.float32), (np.sqrt(np.maximum(sq / count - mean**2, 0)) + 1e-6).astype(np.float32)


def decoder_labels(logits: torch.Tensor) -> torch.Tensor:
    """``[B, K, H', W']`` logits -> ``[B, H', W']`` uint8 argmax labels."""
    return logits.argmax(1).to(torch.uint8)


@torch.no_grad()
def decoder_predict(decoder: SegDecoder, x: np.ndarray) -> np.ndarray:
    """``[n, H', W']`` uint8 argmax labels."""
    decoder.eval()
    out = [decoder_labels(decoder(torch.from_numpy(np.asarray(x[i : i + EVAL_BATCH]))))
           for i in range(0, len(x), EVAL_BATCH)]  # fmt: skip
    return torch.cat(out).numpy()


def _counts(decoder: SegDecoder, x: np.ndarray, masks: np.ndarray, ids: list[str], k: int) -> SegCounts:
    return SegCounts(ids, *iou_counts(decoder_predict(decoder, x), masks, k))


class MiouScorer:
    """Validation mIoU of decoders' predicted labels ``[H, n, H', W']`` (no loss: the labels are argmaxes)."""

    primary, lower_is_better, train_metric = "miou", False, False

    def __init__(self, class_names: list[str]):
        self.class_names = class_names

    def __call__(self, y: np.ndarray, outputs: torch.Tensor, kind: str) -> dict[str, np.ndarray]:
        k = len(self.class_names)
        return {"miou": np.array([seg_metrics(*iou_counts(labels.numpy(), y, k), self.class_names)["miou"]
                                  for labels in outputs])}  # fmt: skip


def fit_decoder(
    exp: Experiment, x: dict[str, np.ndarray], masks: MaskSet, seed: int, *, mean: np.ndarray, std: np.ndarray,
    out_size: tuple[int, int], checkpoint_dir: Path | None, on_epoch: Callable[[EpochReport], None] | None = None,
) -> tuple[SegRun, SegDecoder]:
    """Train one decoder on cached tokens (AdamW, warmup + cosine, batches of train.batch_size); it returns holding
    its best-validation-mIoU weights, with every split scored. ``on_epoch`` hears every epoch."""
    seg, train = exp.segmentation, exp.train
    assert seg is not None
    k = len(seg.class_names)
    source = CachedBatches({s: HeadData(x[s], masks.masks[s]) for s in ("train", "val")},
                           to_tensor=lambda m: torch.from_numpy(m.astype(np.int64)), batch_size=train.batch_size,
                           grad_accum=train.grad_accum, seed=seed)  # fmt: skip
    es = train.early_stopping
    plan = FitPlan(train.epochs, None if es is None else StopRule("miou", es.patience, es.min_delta),
                   on_epoch=on_epoch)
    with seeded(seed):
        decoder = SegDecoder(x["train"].shape[-1], k, seg.decoder, out_size, mean, std)
        decoder.reset_parameters()
        groups = decay_groups(decoder, lr=seg.lr or train.lr, weight_decay=train.weight_decay,
                              warmup_steps=train.warmup_epochs * source.steps_per_epoch)  # fmt: skip
        member = ModuleMember("segmentation", decoder, groups, segmentation_loss, decoder_labels)
        result = fit(member, source, MiouScorer(seg.class_names), plan).fits[0]
    if checkpoint_dir is not None:
        save_checkpoints(checkpoint_dir, result.best_state, result.last_state)
    counts = {s: _counts(decoder, x[s], masks.masks[s], masks.ids[s], k) for s in SPLITS}
    run = SegRun("segmentation", seed, result.best_epoch, result.best_val_score, result.stopped_early,
                 result.curves, counts, sum(p.numel() for p in decoder.parameters()), checkpoint_dir)  # fmt: skip
    return run, decoder


def prior_counts(masks: MaskSet, num_classes: int) -> SegCounts:
    """The location-prior baseline scored on test."""
    prior = location_prior(masks.masks["train"], num_classes)
    test = masks.masks["test"]
    return SegCounts(masks.ids["test"], *iou_counts(np.broadcast_to(prior, test.shape), test, num_classes))


def segment_frozen(exp: Experiment, features: FeatureSet, df: pd.DataFrame, split_ids: dict[str, list[str]],
                   checkpoint_root: Path | None, *,
                   on_epoch: Callable[[int, EpochReport], None] | None = None) -> SegResults:  # fmt: skip
    """Every seed's decoder on the cached tokens; ``df`` holds the manifest rows (with ``mask``);
    ``on_epoch(seed, report)`` hears every epoch."""
    seg = exp.segmentation
    assert seg is not None
    spec = stored_input_spec(features)
    masks = load_split_masks(exp, df, split_ids, spec)
    x = {s: decoder_tokens(exp, features, masks.ids[s]) for s in SPLITS}
    mean, std = token_stats(x["train"])
    runs, test_masks = [], {}
    for seed in exp.train.seeds:
        folder = None if checkpoint_root is None else checkpoint_root / "segmentation" / f"seed{seed}"
        run, decoder = fit_decoder(exp, x, masks, seed, mean=mean, std=std, out_size=spec.image_size,
                                   checkpoint_dir=folder,
                                   on_epoch=None if on_epoch is None else partial(on_epoch, seed))  # fmt: skip
        runs.append(run)
        test_masks.setdefault(run.name, decoder_predict(decoder, x["test"]))
    trained = (f"a separate {seg.decoder} decoder on the frozen cached tokens of layer {seg.layer} (no parameters "
               "shared with the heads); each seed's epoch chosen on validation mIoU")  # fmt: skip
    return SegResults("frozen", trained, runs, prior_counts(masks, len(seg.class_names)),
                      {s: len(masks.ids[s]) for s in SPLITS}, test_masks)  # fmt: skip
