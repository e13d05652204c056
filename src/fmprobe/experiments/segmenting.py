"""The auxiliary segmentation probe on cached tokens: masks per split, decoder inputs, one decoder per seed.

Frozen path: a separate probe (no parameters shared with the heads, so joint training would change nothing),
trained on the cached patch tokens of ``segmentation.layer`` for the samples with a mask, its epoch chosen on
validation mIoU (early stopping with ``train.early_stopping``'s patience when set), then every split scored
once. The adapted path (fmprobe.adapt.multitask) reuses the masks, the token statistics and, for ``staged``,
these decoders as its stage 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmprobe.atomic import atomic_path
from fmprobe.backbones.base import InputSpec
from fmprobe.config import Experiment
from fmprobe.data.masks import load_masks
from fmprobe.errors import ConfigError
from fmprobe.evaluate.segmentation import (SegCounts, SegResults, SegRun, iou_counts, location_prior, seg_metrics,
                                           summarise_segmentation)  # fmt: skip
from fmprobe.experiments.probing import SPLITS, SplitData, save_checkpoints
from fmprobe.features.store import FeatureSet
from fmprobe.heads.segmentation import SegDecoder, frame_tokens, segmentation_loss
from fmprobe.train.seeding import data_generator, seeded
from fmprobe.train.trainer import EVAL_BATCH, EarlyStopper, improved, lr_at


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
    return np.ascontiguousarray(frame_tokens(subset.tokens(layer), subset.grid(layer), frames_per_sample(exp)))


def token_stats(x: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``[n, h, w, D]`` tokens (chunked: no float32 copy of the whole split)."""
    d = x.shape[-1]
    total, sq, count = np.zeros(d), np.zeros(d), 0
    for i in range(0, len(x), chunk):
        part = np.asarray(x[i : i + chunk], dtype=np.float64).reshape(-1, d)
        total, sq, count = total + part.sum(0), sq + (part**2).sum(0), count + len(part)
    mean = total / count
    return mean.astype(np.float32), (np.sqrt(np.maximum(sq / count - mean**2, 0)) + 1e-6).astype(np.float32)


@torch.no_grad()
def decoder_predict(decoder: SegDecoder, x: np.ndarray) -> np.ndarray:
    """``[n, H', W']`` uint8 argmax labels."""
    decoder.eval()
    out = [decoder(torch.from_numpy(np.asarray(x[i : i + EVAL_BATCH]))).argmax(1).to(torch.uint8)
           for i in range(0, len(x), EVAL_BATCH)]  # fmt: skip
    return torch.cat(out).numpy()


def _counts(decoder: SegDecoder, x: np.ndarray, masks: np.ndarray, ids: list[str], k: int) -> SegCounts:
    return SegCounts(ids, *iou_counts(decoder_predict(decoder, x), masks, k))


def fit_decoder(
    exp: Experiment, x: dict[str, np.ndarray], masks: MaskSet, seed: int, *, mean: np.ndarray, std: np.ndarray,
    out_size: tuple[int, int], checkpoint_dir: Path | None,
) -> tuple[SegRun, SegDecoder]:
    """Train one decoder on cached tokens (AdamW, warmup + cosine, batches of train.batch_size); it returns holding
    its best-validation-mIoU weights, with every split scored."""
    seg, train = exp.segmentation, exp.train
    assert seg is not None
    k = len(seg.class_names)
    y_train = torch.from_numpy(masks.masks["train"].astype(np.int64))
    n = len(y_train)
    steps = math.ceil(math.ceil(n / train.batch_size) / train.grad_accum)  # optimizer steps per epoch
    es = train.early_stopping
    stopper = EarlyStopper("miou", False, es.patience, es.min_delta) if es is not None else None
    curves: list[dict[str, float]] = []
    best: dict[str, torch.Tensor] = {}
    best_score, best_epoch, stopped = math.nan, 0, False
    with seeded(seed):
        decoder = SegDecoder(x["train"].shape[-1], k, seg.decoder, out_size, mean, std)
        decoder.reset_parameters()
        params = [p for p in decoder.parameters()]
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim > 1], "weight_decay": train.weight_decay},
             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=seg.lr or train.lr)  # fmt: skip
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
            s, base_lr=1.0, warmup_steps=train.warmup_epochs * steps, total_steps=train.epochs * steps))  # fmt: skip
        order = data_generator(seed)
        for epoch in range(1, train.epochs + 1):
            decoder.train()
            total = 0.0
            batches = torch.randperm(n, generator=order).split(train.batch_size)
            for start in range(0, len(batches), train.grad_accum):  # accumulation as train_head does it
                group = batches[start : start + train.grad_accum]
                group_size = sum(len(b) for b in group)
                optimizer.zero_grad(set_to_none=True)
                for idx in group:
                    loss = segmentation_loss(decoder(torch.from_numpy(x["train"][idx.numpy()])), y_train[idx])
                    (loss * (len(idx) / group_size)).backward()
                    total += loss.item() * len(idx)
                optimizer.step()
                schedule.step()
            val = _counts(decoder, x["val"], masks.masks["val"], masks.ids["val"], k)
            score = seg_metrics(val.inter, val.union, seg.class_names)["miou"]
            curves.append({"epoch": epoch, "train_loss": total / n, "val_miou": score,
                           "lr": optimizer.param_groups[0]["lr"]})  # fmt: skip
            if not best or improved(score, best_score, False, 0.0):
                best_score, best_epoch = score, epoch
                best = {name: v.detach().clone() for name, v in decoder.state_dict().items()}
            if stopper is not None and stopper.exhausted({"miou": score}):
                stopped = epoch < train.epochs
                break
    last = {name: v.detach().clone() for name, v in decoder.state_dict().items()}
    decoder.load_state_dict(best)
    if checkpoint_dir is not None:
        save_checkpoints(checkpoint_dir, best, last)
    counts = {s: _counts(decoder, x[s], masks.masks[s], masks.ids[s], k) for s in SPLITS}
    run = SegRun("segmentation", seed, best_epoch, best_score, stopped, curves, counts,
                 sum(p.numel() for p in params), checkpoint_dir)  # fmt: skip
    return run, decoder


def prior_counts(masks: MaskSet, num_classes: int) -> SegCounts:
    """The location-prior baseline scored on test."""
    prior = location_prior(masks.masks["train"], num_classes)
    test = masks.masks["test"]
    return SegCounts(masks.ids["test"], *iou_counts(np.broadcast_to(prior, test.shape), test, num_classes))


def segment_frozen(exp: Experiment, features: FeatureSet, df: pd.DataFrame, split_ids: dict[str, list[str]],
                   checkpoint_root: Path | None) -> SegResults:  # fmt: skip
    """Every seed's decoder on the cached tokens; ``df`` holds the manifest rows (with ``mask``)."""
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
                                   checkpoint_dir=folder)  # fmt: skip
        runs.append(run)
        test_masks.setdefault(run.name, decoder_predict(decoder, x["test"]))
    trained = (f"a separate {seg.decoder} decoder on the frozen cached tokens of layer {seg.layer} (no parameters "
               "shared with the heads); each seed's epoch chosen on validation mIoU")  # fmt: skip
    return SegResults("frozen", trained, runs, prior_counts(masks, len(seg.class_names)),
                      {s: len(masks.ids[s]) for s in SPLITS}, test_masks)  # fmt: skip


def add_segmentation(metrics: dict, exp: Experiment, seg: SegResults, split: SplitData, run_dir: Path) -> None:
    """Put the segmentation section in ``metrics`` (and each adapted head's block beside its metrics); write
    ``segmentation_curves.parquet`` and the first seed's predicted test masks (``segmentation_test_masks.npz``)."""
    cfg = exp.segmentation
    assert cfg is not None
    groups = dict(zip(split.ids["test"], split.groups["test"])) if exp.data.group_column else None
    block = summarise_segmentation(seg, cfg.class_names, test_groups=groups, n_resamples=exp.eval.bootstrap,
                                   ci=exp.eval.ci)  # fmt: skip
    block.update(decoder=cfg.decoder, layer=cfg.layer, loss_weight=cfg.loss_weight if seg.path == "adapted" else None)
    metrics["segmentation"] = block
    if seg.path == "adapted":
        for head, entry in block["decoders"].items():
            metrics["heads"][head]["segmentation"] = entry
    curves = pd.DataFrame([{"decoder": r.name, "seed": r.seed, **row} for r in seg.runs for row in r.curves])
    with atomic_path(run_dir / "segmentation_curves.parquet") as tmp:
        curves.to_parquet(tmp, index=False)
    with atomic_path(run_dir / "segmentation_test_masks.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, sample_ids=np.array(seg.baseline.ids), **seg.test_masks)
