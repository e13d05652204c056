"""End-to-end training of backbone + head on pixels, per head and seed, returning what ``train_heads`` returns.

``adapt_heads`` is the non-frozen twin of ``experiments.probing.train_heads``: the same selection discipline
(best epoch and thresholds on validation only; every split predicted once with the chosen weights), the same
regression target standardisation and the same ``ProbeResults``, so ``summarise_run`` and the report work
unchanged. What moves in the backbone is ``adapt.strategy``'s business (see fmprobe.adapt.setup); ``staged``
first trains the heads on the cached features exactly as the frozen path does, then continues end to end from
each seed's best stage-1 head. The run directory gets ``adaptation.json`` (trainable / total parameters,
parameter groups, LoRA targets) and, for LoRA, each seed's adapter saved on its own under
``checkpoints/<head>/seed<k>/adapter``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from fmprobe import distributed
from fmprobe.adapt.data_parallel import DataParallel
from fmprobe.adapt.lora import merge_adapter, save_adapter
from fmprobe.adapt.mixup import apply_mix, draw_mix, enabled, soft_targets
from fmprobe.adapt.model import AdaptModel, Standardise
from fmprobe.adapt.param_groups import count, set_lrs
from fmprobe.adapt.sampling import balanced_weights, epoch_order
from fmprobe.adapt.setup import Prepared, prepare
from fmprobe.adapt.tta import tta_scores
from fmprobe.atomic import atomic_path, write_json
from fmprobe.backbones.base import Encoder
from fmprobe.devices import config_device
from fmprobe.config import DataConfig, Experiment, HeadConfig
from fmprobe.data.dataset import MediaDataset, collate_samples
from fmprobe.data.masks import MaskedMediaDataset, collate_with_masks
from fmprobe.data.transforms import Preprocess
from fmprobe.errors import ConfigError, FmprobeError, ReaderError
from fmprobe.evaluate.metrics import higher_is_better
from fmprobe.evaluate.thresholds import tune_thresholds
from fmprobe.experiments.probing import (
    SPLITS,
    FitTargets,
    HeadRun,
    ProbeResults,
    head_inputs,
    output_dim,
    train_heads,
)
from fmprobe.features.store import FeatureSet
from fmprobe.heads import build_head
from fmprobe.train.losses import as_target_tensor, build_loss
from fmprobe.train.seeding import data_generator, seeded
from fmprobe.train.trainer import EarlyStopper, improved, lookup_metric, scalar_values, to_scores

if TYPE_CHECKING:
    from fmprobe.adapt.multitask import JointSegmentation


def adapt_heads(
    exp: Experiment,
    features: FeatureSet,
    df: pd.DataFrame,
    split_ids: dict[str, list[str]],
    targets: dict[str, np.ndarray],
    class_names: list[str] | None,
    run_dir: Path,
    *,
    encoder: Encoder | None = None,
) -> ProbeResults:
    """Train every head x seed end to end; ``df`` holds the manifest rows (sample_id, path) of ``split_ids``."""
    cfg = exp.adapt
    if cfg.strategy == "frozen":
        raise ValueError("adapt_heads is for end-to-end strategies; strategy frozen goes through train_heads")
    device, autocast, scaler = runtime(exp)
    if encoder is None:
        from fmprobe.backbones.registry import load_encoder

        encoder = load_encoder(exp.model)
    by_id = df.drop_duplicates("sample_id").set_index("sample_id")
    columns = ["sample_id", "path"] + (["mask"] if exp.segmentation is not None else [])
    columns += ["clip_start"] if exp.data.clip_start_column else []
    rows = {s: by_id.loc[ids].reset_index()[columns] for s, ids in split_ids.items()}
    seg = None
    if exp.segmentation is not None:  # a decoder per head, trained jointly (fmprobe.adapt.multitask)
        from fmprobe.adapt.multitask import JointSegmentation

        seg = JointSegmentation(exp, features, df, split_ids, encoder.input_spec, run_dir)

    results = ProbeResults()
    fitting = FitTargets.for_task(exp, targets, class_names, results)
    fit_targets, score_fn, shift, scale = fitting.targets, fitting.score, fitting.shift, fitting.scale

    stage1 = None
    if cfg.strategy == "staged":
        stage1 = train_heads(exp, features, split_ids, targets, class_names, run_dir / "checkpoints" / "stage1")
    report: dict[str, Any] = {"strategy": cfg.strategy, "heads": {}}
    out_dim = output_dim(exp, class_names)
    for head_cfg in exp.heads:
        standardise = None
        if head_cfg.pooling != "attentive":  # the frozen path's z-scoring, from the same training features
            x = head_inputs(features.subset(split_ids["train"]), head_cfg)
            standardise = Standardise(x.mean(axis=0), x.std(axis=0) + 1e-6)
            results.standardisation[head_cfg.name] = "z-score with training-split mean/std (of the frozen backbone)"
        in_dim = int(features.pooled(str(head_cfg.layer), "mean").shape[1])
        in_dim = 2 * in_dim if head_cfg.pooling == "cls+mean" else in_dim
        report["heads"][head_cfg.name] = {}
        for seed in exp.train.seeds:
            first = None
            if stage1 is not None:
                first = next(r for r in stage1.runs if r.head == head_cfg.name and r.seed == seed)
            run, info = _fit_one(
                exp, copy.deepcopy(encoder), head_cfg, seed, in_dim=in_dim, out_dim=out_dim, standardise=standardise,
                rows=rows, targets=targets, fit_targets=fit_targets, score_fn=score_fn, shift=shift, scale=scale,
                stage1=first, checkpoint_root=run_dir / "checkpoints", device=device, autocast=autocast,
                scaler=scaler, class_names=class_names, seg=seg,
            )  # fmt: skip
            results.runs.append(run)
            report["heads"][head_cfg.name][str(seed)] = info
    if distributed.is_main():  # several processes (data parallel): process 0 writes
        write_json(run_dir / "adaptation.json", report)
    results.segmentation = seg.results() if seg is not None else None
    return results


def runtime(exp: Experiment) -> tuple[torch.device, Callable[[], contextlib.AbstractContextManager], Any]:
    """The device, an autocast context factory and a GradScaler (fp16) — or a clear refusal."""
    cfg = exp.adapt
    device = config_device(cfg.device, "adapt.device")
    if cfg.precision != "fp32" and device.type != "cuda":
        raise ConfigError(
            f"adapt.precision {cfg.precision} (autocast) is only used on a GPU, and adapt.device is {device.type}; "
            "set adapt.precision: fp32 on CPU, or adapt.device: cuda"
        )
    if exp.model.dtype != "float32":
        raise ConfigError(
            f"end-to-end training keeps weights in float32, but model.dtype is {exp.model.dtype}; set model.dtype: "
            "float32 and use adapt.precision (bf16/fp16 autocast on GPU) for mixed precision"
        )
    if cfg.precision == "fp32":
        return device, contextlib.nullcontext, None
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    return device, lambda: torch.autocast("cuda", dtype=dtype), scaler


def _fit_one(
    exp: Experiment, encoder: Encoder, head_cfg: HeadConfig, seed: int, *, in_dim: int, out_dim: int,
    standardise: Standardise | None, rows: dict[str, pd.DataFrame], targets: dict[str, np.ndarray],
    fit_targets: dict[str, np.ndarray], score_fn: Callable, shift: Any, scale: Any, stage1: HeadRun | None,
    checkpoint_root: Path, device: torch.device, autocast: Callable, scaler: Any, class_names: list[str] | None,
    seg: JointSegmentation | None = None,
) -> tuple[HeadRun, dict[str, Any]]:
    task = exp.task
    with seeded(seed, device):
        head = build_head(head_cfg, in_dim, out_dim)
        head.reset_parameters()
        if stage1 is not None:
            assert stage1.checkpoint_dir is not None
            head.load_state_dict(torch.load(stage1.checkpoint_dir / "best.pt", weights_only=True))
        prepared = prepare(exp, encoder, head, head_cfg, steps_per_epoch=_steps_per_epoch(exp, len(rows["train"])))
        if seg is None:
            model = AdaptModel(encoder, head, layer=head_cfg.layer, pooling=head_cfg.pooling, features=exp.features,
                               standardise=standardise).to(device)  # fmt: skip
        else:  # + this head's segmentation decoder, on the same encoder pass
            decoder = seg.decoder(seed)
            seg.add_group(prepared, decoder)
            model = seg.model(encoder, head, layer=head_cfg.layer, pooling=head_cfg.pooling, standardise=standardise,
                              decoder=decoder).to(device)  # fmt: skip
        loss, loss_info = build_loss(exp.loss, task, targets["train"],
                                     num_classes=len(class_names) if class_names else None)
        loss.to(device)
        if enabled(exp.adapt.mix) and loss_info["type"] == "focal" and task.type == "multiclass":
            raise ConfigError("adapt.mix needs soft targets, which multiclass focal loss cannot take; use loss.type ce")
        trainer = _Trainer(exp, model, prepared, loss, score_fn, rows, fit_targets, seed, device, autocast, scaler,
                           out_dim, seg=seg)  # fmt: skip
        fit = trainer.fit(offset=len(stage1.curves) if stage1 is not None else 0)
    curves = ([{**row, "stage": 1} for row in stage1.curves] + [{**row, "stage": 2} for row in fit["curves"]]
              if stage1 is not None else fit["curves"])  # fmt: skip

    info: dict[str, Any] = {
        "trainable_params": prepared.trainable, "total_params": count(model.parameters()),
        "lora_targets": prepared.lora_targets, "partial_modules": prepared.partial_modules,
        "param_groups": [{k: g[k] for k in ("name", "base_lr", "weight_decay", "warmup_steps", "start_step")}
                         | {"params": count(g["params"])} for g in prepared.groups],
        "skipped_train_samples": trainer.skipped,
    }  # fmt: skip
    ckpt_dir = checkpoint_root / head_cfg.name / f"seed{seed}"
    main = distributed.is_main()  # several processes hold the same weights: process 0 saves them
    for name, state in (("best", fit["best"]), ("last", fit["last"])) if main else ():
        with atomic_path(ckpt_dir / f"{name}.pt") as tmp:
            torch.save(state, tmp)
    if prepared.peft_model is not None:  # the best weights are loaded: save the adapter alone, then merge if asked
        adapter_dir = ckpt_dir / "adapter"
        if main:
            adapter_dir = save_adapter(prepared.peft_model, adapter_dir)
        info["adapter_dir"] = str(adapter_dir.relative_to(checkpoint_root.parent))
        if exp.adapt.lora.merge:
            merge_adapter(encoder, prepared.peft_model)
            info["merged"] = True
    scores = {s: trainer.predict(s) * scale + shift for s in SPLITS}
    thresholds = None
    if task.type in ("binary", "multilabel"):
        thresholds = tune_thresholds(task.type, targets["val"], scores["val"], mode=exp.eval.thresholds,
                                     class_names=task.targets)  # fmt: skip
    if seg is not None:
        seg.evaluate(model, head_cfg.name, seed, fit, device=device, autocast=autocast)
    run = HeadRun(
        head=head_cfg.name, seed=seed, best_epoch=fit["best_epoch"], best_val_score=fit["best_score"],
        stopped_early=fit["stopped"], curves=curves, scores=scores,
        thresholds=None if thresholds is None else [float(t) for t in np.atleast_1d(thresholds)],
        loss_info=loss_info, trainable_params=prepared.trainable, checkpoint_dir=ckpt_dir,
    )  # fmt: skip
    return run, info


def _steps_per_epoch(exp: Experiment, n_train: int) -> int:
    return math.ceil(math.ceil(n_train / exp.train.batch_size) / exp.train.grad_accum)


class _Trainer:
    """The epoch loop: augmented batches (train preprocessing, mixing, sampler), accumulation, per-group schedules,
    validation every epoch (with TTA), early stopping, best/last states of what trains."""

    def __init__(
        self, exp: Experiment, model: AdaptModel, prepared: Prepared, loss: nn.Module, score_fn: Callable,
        rows: dict[str, pd.DataFrame], fit_targets: dict[str, np.ndarray], seed: int, device: torch.device,
        autocast: Callable, scaler: Any, out_dim: int, seg: JointSegmentation | None = None,
    ):
        self.exp, self.model, self.prepared, self.loss, self.score_fn = exp, model, prepared, loss, score_fn
        self.seg = seg
        self.rows, self.y, self.seed, self.device = rows, fit_targets, seed, device
        self.autocast, self.scaler, self.out_dim = autocast, scaler, out_dim
        self.task_type = exp.task.type
        self.spec = model.encoder.input_spec
        self.eval_data = _eval_data(exp.data, exp.adapt.tta.clips)
        self.skipped: list[list[str]] = []
        self.y_train = as_target_tensor(fit_targets["train"], self.task_type)
        self.y_val = as_target_tensor(fit_targets["val"], self.task_type)
        self.weights = balanced_weights(fit_targets["train"], self.task_type) if exp.adapt.balanced_sampler else None
        # several processes (fmprobe.distributed): shards of each global batch, DDP (a no-op for one process)
        self.parallel = DataParallel(model, loss, self.y_train, self.task_type, mix=enabled(exp.adapt.mix),
                                     device=device)  # fmt: skip
        trainable = {id(p) for g in prepared.groups for p in g["params"]}
        self.state_keys = [k for k, p in model.named_parameters() if id(p) in trainable]
        self.state_keys += [k for k, _ in model.named_buffers() if k.startswith(("head.", "standardise.", "decoder."))]

    def state(self) -> dict[str, torch.Tensor]:
        full = self.model.state_dict()
        return {k: full[k].detach().clone() for k in self.state_keys}

    def fit(self, offset: int) -> dict[str, Any]:
        exp, cfg = self.exp, self.exp.adapt
        staged = cfg.strategy == "staged"
        epochs = cfg.stage2.epochs if staged else exp.train.epochs
        primary = exp.task.primary_metric
        hib = higher_is_better(primary)
        if staged:
            stopper = None if cfg.stage2.patience is None else EarlyStopper(primary, not hib, cfg.stage2.patience, 0.0)
        else:
            stopper = EarlyStopper.from_config(exp.train, primary, hib)
        for g in self.prepared.groups:
            if g["warmup_steps"] > epochs * self.prepared.steps_per_epoch - g["start_step"]:
                raise ConfigError(f"the warmup of parameter group {g['name']} is longer than the training")
        optimizer = torch.optim.AdamW(self.prepared.groups, lr=0.0)
        total = epochs * self.prepared.steps_per_epoch
        order, mix_rng = data_generator(self.seed), np.random.default_rng(self.seed)
        self.parallel.reseed(self.seed)
        curves: list[dict[str, float]] = []
        best: dict[str, torch.Tensor] = {}
        best_score, best_epoch, stopped, step = math.nan, 0, False, 0
        for epoch in range(1, epochs + 1):
            self.prepared.gate(epoch)
            train_loss, lr, seen_scores, seen_idx, step = self._epoch(epoch, optimizer, order, mix_rng, step, total)
            val_scores = self.predict("val")
            with torch.no_grad():
                val_loss = float(self.loss(_as_logits(torch.from_numpy(val_scores), self.task_type).to(self.device),
                                           self.y_val.to(self.device)))  # fmt: skip
            val_metrics = scalar_values(self.score_fn(self.y["val"], val_scores))
            train_metrics = scalar_values(self.score_fn(self.y["train"][seen_idx], seen_scores))
            score = lookup_metric(val_metrics, primary, "primary metric")
            if math.isnan(score):
                raise FmprobeError(f"validation {primary} is NaN in epoch {epoch}; the validation split probably "
                                   "lacks a class — fix the split")  # fmt: skip
            curves.append({"epoch": offset + epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                           **{f"val_{k}": v for k, v in val_metrics.items()},
                           f"train_{primary}": lookup_metric(train_metrics, primary, "primary metric"),
                           **(self.seg.end_epoch() if self.seg is not None else {})})  # fmt: skip
            if not best or improved(score, best_score, not hib, 0.0):
                best_score, best_epoch, best = score, offset + epoch, self.state()
            if stopper is not None and stopper.exhausted({**val_metrics, "loss": val_loss}):
                stopped = epoch < epochs
                break
        last = self.state()
        missing = self.model.load_state_dict(best, strict=False).unexpected_keys
        assert not missing, missing
        return {"best": best, "last": last, "best_epoch": best_epoch, "best_score": best_score, "curves": curves,
                "stopped": stopped}  # fmt: skip

    def _epoch(
        self, epoch: int, optimizer: torch.optim.Optimizer, order: torch.Generator, mix_rng: np.random.Generator,
        step: int, total: int,
    ) -> tuple[float, float, np.ndarray, np.ndarray, int]:
        exp = self.exp
        self.model.train()
        # a fresh augmentation draw per epoch (MediaDataset seeds crops by (seed, index))
        data_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        indices = epoch_order(len(self.y_train), order, self.weights).tolist()
        batches = [indices[i : i + exp.train.batch_size] for i in range(0, len(indices), exp.train.batch_size)]
        total_loss, n_seen, lr = 0.0, 0, math.nan
        seen_scores, seen_idx = [], []
        loads = [self.parallel.loads(b) for b in batches]
        loader = iter(self._loader(self.rows["train"], exp.data, train=True, seed=data_seed, sampler=loads))
        model = self.parallel.training_model()
        for start in range(0, len(batches), exp.train.grad_accum):
            chunk = batches[start : start + exp.train.grad_accum]
            group = [(b, self._good(next(loader))) for b in chunk]
            group = [(b, batch) for b, batch in group if batch is not None]
            group_size = self.parallel.group_size(chunk, [batch for _, batch in group])
            set_lrs(optimizer, step, total)
            optimizer.zero_grad(set_to_none=True)
            for i, (global_batch, batch) in enumerate(group):
                idx = batch["index"]
                pixels = batch["pixels"].to(self.device)
                y = self.y_train[idx]
                mix = draw_mix(exp.adapt.mix, len(idx), tuple(pixels.shape[-2:]), mix_rng)
                if mix.kind != "none":
                    pixels, y = apply_mix(mix, pixels, soft_targets(y, self.task_type, self.out_dim))
                pixels, y, idx, weight, loss_share, real = self.parallel.take(global_batch, idx, pixels, y, group_size)
                with self.parallel.sync(last=i == len(group) - 1):  # DDP reduces on the group's last backward
                    with self.autocast():
                        logits = model(pixels)
                        value = self.loss(logits.float(), y.to(self.device))
                        joint = value if self.seg is None else value + self.seg.batch_loss(self.model, batch["mask"])
                    scaled = joint * weight
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                total_loss += value.item() * loss_share
                n_seen += real
                seen_scores.append(to_scores(logits.detach().float().cpu(), self.task_type)[:real])
                seen_idx.append(idx[:real])
            lr = optimizer.param_groups[0]["lr"]
            if group_size:
                if self.scaler is not None:
                    self.scaler.step(optimizer)
                    self.scaler.update()
                else:
                    optimizer.step()
            step += 1
        total_loss, n_seen, seen_scores, seen_idx = self.parallel.gather_epoch(total_loss, n_seen, seen_scores,
                                                                               seen_idx)  # fmt: skip
        if not math.isfinite(total_loss):
            raise FmprobeError(f"training loss became {total_loss} in epoch {epoch}; lower the learning rates")
        return (total_loss / max(n_seen, 1), lr, torch.cat(seen_scores).numpy(), torch.cat(seen_idx).numpy(), step)

    def _good(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Training batches honour data.on_error: raise, or skip the sample and record it."""
        for _, sample_id, message in batch["errors"]:
            if self.exp.data.on_error == "raise":
                raise ReaderError(message)  # the dataset's message names the sample and file
            self.parallel.refuse_skip(message)
            self.skipped.append([sample_id, message])
        return batch if batch["pixels"] is not None else None

    def _loader(
        self, rows: pd.DataFrame, data: DataConfig, *, train: bool, seed: int, sampler: Any = None
    ) -> DataLoader:
        dataset = MediaDataset(rows, data, Preprocess(self.spec, data, train=train), seed=seed)
        collate = collate_samples
        if train and self.seg is not None:  # training batches carry their masks (same crop and flip as the pixels)
            dataset = MaskedMediaDataset(rows, data, dataset.preprocess, len(self.seg.cfg.class_names), seed=seed)
            collate = collate_with_masks
        if sampler is not None:
            return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                              num_workers=self.exp.data.num_workers)  # fmt: skip
        return DataLoader(dataset, batch_size=self.exp.train.batch_size, collate_fn=collate_samples,
                          num_workers=self.exp.data.num_workers)  # fmt: skip

    @torch.no_grad()
    def predict(self, split: str) -> np.ndarray:
        """Scores of a split in the task's convention, averaged over the TTA views; every sample must read."""
        self.model.eval()
        out = []
        mine = self.parallel.eval_batches(len(self.rows[split]), self.exp.train.batch_size)
        for batch in self._loader(self.rows[split], self.eval_data, train=False, seed=0, sampler=mine):
            if batch["errors"]:
                message = batch["errors"][0][2]
                raise ReaderError(f"{message} (it was readable when features were extracted)")
            with self.autocast():
                out.append(tta_scores(self.model, batch["pixels"].to(self.device), self.exp.adapt.tta,
                                      lambda z: to_scores(z.float().cpu(), self.task_type)))  # fmt: skip
        return torch.cat(self.parallel.gather_eval(out)).numpy()


def _eval_data(data: DataConfig, clips: int) -> DataConfig:
    """Evaluation reads ``adapt.tta.clips`` uniformly spaced clips when asked (videos and slice stacks only)."""
    if clips == 1:
        return data
    if data.kind == "image" or (data.kind == "volume" and data.volume_mode == "slices"):
        raise ConfigError("adapt.tta.clips > 1 needs clips: data.kind video, or volume with volume_mode stack")
    return data.model_copy(update={"clip_position": "uniform", "num_clips": clips})


def _as_logits(scores: torch.Tensor, task_type: str) -> torch.Tensor:
    """Logits whose scores are ``scores`` (the validation loss of the TTA-averaged prediction)."""
    eps = 1e-7
    if task_type == "binary":
        return torch.logit(scores.clamp(eps, 1 - eps)).unsqueeze(1)
    if task_type == "multilabel":
        return torch.logit(scores.clamp(eps, 1 - eps))
    if task_type == "multiclass":
        return scores.clamp_min(eps).log()
    return scores
