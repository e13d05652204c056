"""End-to-end training of backbone + head on pixels, per head and seed, returning what ``train_heads`` returns.

``adapt_heads`` is the non-frozen twin of ``probes.frozen.train_heads``: the same selection discipline (best
epoch and thresholds on validation only; every split predicted once with the chosen weights), the same
regression target standardisation and the same ``ProbeResults``, so the run summary and the report work
unchanged. What moves in the backbone is ``adapt.strategy``'s business (see fmprobe.adapt.setup); ``staged``
first trains the heads on the cached features exactly as the frozen path does, then continues end to end from
each seed's best stage-1 head. Training itself is the core's (``fmprobe.train.core.fit``): this module supplies
its members (:mod:`fmprobe.adapt.members`: the backbone + head, the optimizer's parameter groups) and its batch
source (:mod:`fmprobe.adapt.pixels`: augmented, mixed, data-parallel pixel batches). The run directory gets
``adaptation.json`` (trainable / total parameters, parameter groups, LoRA targets) and, for LoRA, each seed's
adapter saved on its own under ``checkpoints/<head>/seed<k>/adapter``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from fmprobe import distributed
from fmprobe.adapt.data_parallel import DataParallel
from fmprobe.adapt.lora import merge_adapter, save_adapter
from fmprobe.adapt.members import EndToEndMembers
from fmprobe.adapt.mixup import enabled
from fmprobe.adapt.model import AdaptModel, Standardise
from fmprobe.adapt.param_groups import count
from fmprobe.adapt.pixels import PixelBatches, pixel_inputs
from fmprobe.adapt.setup import prepare
from fmprobe.atomic import atomic_path, write_json
from fmprobe.backbones.base import Encoder
from fmprobe.config import Experiment, HeadConfig
from fmprobe.devices import config_device
from fmprobe.errors import ConfigError
from fmprobe.evaluate.results import SPLITS, HeadRun, ProbeResults
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.evaluate.thresholds import tune_thresholds
from fmprobe.features.store import FeatureSet
from fmprobe.heads import build_head
from fmprobe.probes.frozen import train_heads
from fmprobe.probes.inputs import head_inputs
from fmprobe.probes.targets import TARGETS_NOTE, FitTargets
from fmprobe.train.core import EpochReport, FitPlan, StopRule, fit
from fmprobe.train.heads import stop_rule
from fmprobe.train.losses import as_target_tensor, build_loss
from fmprobe.train.schedule import steps_per_epoch
from fmprobe.train.seeding import seeded

if TYPE_CHECKING:
    from fmprobe.adapt.multitask import JointSegmentation


def adapt_heads(
    exp: Experiment,
    task: ResolvedTask,
    features: FeatureSet,
    df: pd.DataFrame,
    split_ids: dict[str, list[str]],
    targets: dict[str, np.ndarray],
    run_dir: Path,
    *,
    encoder: Encoder | None = None,
    on_epoch: Callable[[int, EpochReport], None] | None = None,
) -> ProbeResults:
    """Train every head x seed end to end; ``df`` holds the manifest rows (sample_id, path) of ``split_ids``;
    ``on_epoch(seed, report)`` hears every epoch of both stages."""
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
    fitting = FitTargets.for_task(task, targets)
    if task.type == "regression":
        results.standardisation["targets"] = TARGETS_NOTE
    stage1 = None
    moving = pixel_inputs(exp)
    results.training_inputs = [{"stage": "all epochs", **moving}]
    if cfg.strategy == "staged":
        stage1 = train_heads(exp, task, features, split_ids, targets, run_dir / "checkpoints" / "stage1",
                             on_epoch=on_epoch)
        results.training_inputs = [{**stage1.training_inputs[0], "stage": 1}, {"stage": 2, **moving}]
    report: dict[str, Any] = {"strategy": cfg.strategy, "heads": {}}
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
                exp, task, copy.deepcopy(encoder), head_cfg, seed, in_dim=in_dim, standardise=standardise,
                rows=rows, targets=targets, fitting=fitting, stage1=first, checkpoint_root=run_dir / "checkpoints",
                device=device, autocast=autocast, scaler=scaler, seg=seg,
                on_epoch=None if on_epoch is None else partial(on_epoch, seed),
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


def _plan(exp: Experiment, task: ResolvedTask, offset: int, autocast: Callable, scaler: Any) -> FitPlan:
    """Epochs and early stopping: stage 2's own for staged, train:'s otherwise."""
    cfg = exp.adapt
    if cfg.strategy == "staged":
        stopping = None if cfg.stage2.patience is None else StopRule(task.primary, cfg.stage2.patience)
        return FitPlan(cfg.stage2.epochs, stopping, offset, autocast, scaler)
    return FitPlan(exp.train.epochs, stop_rule(exp.train.early_stopping, task.primary), offset, autocast, scaler)


def _fit_one(
    exp: Experiment, task: ResolvedTask, encoder: Encoder, head_cfg: HeadConfig, seed: int, *, in_dim: int,
    standardise: Standardise | None, rows: dict[str, pd.DataFrame], targets: dict[str, np.ndarray],
    fitting: FitTargets, stage1: HeadRun | None, checkpoint_root: Path, device: torch.device, autocast: Callable,
    scaler: Any, seg: JointSegmentation | None = None, on_epoch: Callable[[EpochReport], None] | None = None,
) -> tuple[HeadRun, dict[str, Any]]:
    plan = replace(_plan(exp, task, len(stage1.curves) if stage1 is not None else 0, autocast, scaler),
                   on_epoch=on_epoch)
    with seeded(seed, device):
        head = build_head(head_cfg, in_dim, task.out_dim)
        head.reset_parameters()
        if stage1 is not None:
            assert stage1.checkpoint_dir is not None
            head.load_state_dict(torch.load(stage1.checkpoint_dir / "best.pt", weights_only=True))
        steps = steps_per_epoch(len(rows["train"]), exp.train.batch_size, exp.train.grad_accum)
        prepared = prepare(exp, encoder, head, head_cfg, steps_per_epoch=steps)
        if seg is None:
            model = AdaptModel(encoder, head, layer=head_cfg.layer, pooling=head_cfg.pooling, features=exp.features,
                               standardise=standardise).to(device)  # fmt: skip
        else:  # + this head's segmentation decoder, on the same encoder pass
            decoder = seg.decoder(seed)
            seg.add_group(prepared, decoder)
            model = seg.model(encoder, head, layer=head_cfg.layer, pooling=head_cfg.pooling, standardise=standardise,
                              decoder=decoder).to(device)  # fmt: skip
        for g in prepared.groups:
            if g["warmup_steps"] > plan.epochs * steps - g["start_step"]:
                raise ConfigError(f"the warmup of parameter group {g['name']} is longer than the training")
        loss, loss_info = build_loss(exp.loss, exp.task, targets["train"], num_classes=task.num_classes)
        loss.to(device)
        if enabled(exp.adapt.mix) and loss_info["type"] == "focal" and task.type == "multiclass":
            raise ConfigError("adapt.mix needs soft targets, which multiclass focal loss cannot take; use loss.type ce")
        parallel = DataParallel(model, loss, as_target_tensor(fitting.targets["train"], task.type), task.type,
                                mix=enabled(exp.adapt.mix), device=device)  # fmt: skip
        source = PixelBatches(exp, rows, fitting.targets, seed, device=device, task_type=task.type,
                              out_dim=task.out_dim, parallel=parallel, autocast=autocast, seg=seg,
                              steps_per_epoch=steps)  # fmt: skip
        members = EndToEndMembers(head_cfg.name, model, prepared, loss, parallel, device=device, seg=seg)
        parallel.reseed(seed)
        result = fit(members, source, fitting.scorer(task, loss, device), plan).fits[0]
    curves = ([{**row, "stage": 1} for row in stage1.curves] + [{**row, "stage": 2} for row in result.curves]
              if stage1 is not None else result.curves)  # fmt: skip

    info: dict[str, Any] = {
        "trainable_params": prepared.trainable, "total_params": count(model.parameters()),
        "lora_targets": prepared.lora_targets, "partial_modules": prepared.partial_modules,
        "param_groups": [{k: g[k] for k in ("name", "base_lr", "weight_decay", "warmup_steps", "start_step")}
                         | {"params": count(g["params"])} for g in prepared.groups],
        "skipped_train_samples": source.skipped,
    }  # fmt: skip
    ckpt_dir = checkpoint_root / head_cfg.name / f"seed{seed}"
    main = distributed.is_main()  # several processes hold the same weights: process 0 saves them
    for name, state in (("best", result.best_state), ("last", result.last_state)) if main else ():
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
    scores = {s: fitting.to_units(source.predict(members, s)[0][0].numpy()) for s in SPLITS}
    thresholds = None
    if task.type in ("binary", "multilabel"):
        thresholds = tune_thresholds(task.type, targets["val"], scores["val"], mode=exp.eval.thresholds,
                                     class_names=list(task.targets))  # fmt: skip
    if seg is not None:
        seg.evaluate(model, head_cfg.name, seed, result, device=device, autocast=autocast)
    run = HeadRun(
        head=head_cfg.name, seed=seed, best_epoch=result.best_epoch, best_val_score=result.best_val_score,
        stopped_early=result.stopped_early, curves=curves, scores=scores,
        thresholds=None if thresholds is None else [float(t) for t in np.atleast_1d(thresholds)],
        loss_info=loss_info, trainable_params=prepared.trainable, checkpoint_dir=ckpt_dir,
        last_epoch=result.last_epoch,
    )  # fmt: skip
    return run, info
