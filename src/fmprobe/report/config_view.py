"""The configuration as a reader of the report needs it: the settings that applied to this run, and the loss as
words and rounded numbers. The full resolved config stays in ``config.resolved.yaml`` next to the report."""

from __future__ import annotations

from typing import Any

import yaml

from fmprobe.config import Experiment

CLIP_FIELDS = ("frames_per_clip", "frame_step", "clip_position", "num_clips", "clip_start_column")
VOLUME_FIELDS = ("volume_mode", "slice_axis", "window")
NATIVE_FIELDS = ("checkpoint", "native_frames", "native_num_heads")
FITTED_GRIDS = ("k", "C")  # a fitted head's loss record: the k / C values it chose among (knn, logreg)
LOSS_FIELDS = {"focal": ("focal_alpha", "focal_gamma"), "huber": ("huber_delta",)}  # only read by these types
ADAPT_ONLY = {  # adapt settings read only by these strategies
    "lora": ("lora", "staged"), "partial_blocks": ("partial",), "unfreeze": ("staged",), "stage2": ("staged",),
    "unfreeze_at_epoch": ("lora", "partial"), "adapters": ("lora", "staged"),
}


def applied_config(exp: Experiment) -> str:
    """The resolved config as YAML without the settings this run never read: adaptation settings of a frozen run,
    LoRA of a partial run, clip settings of an image task, focal parameters of a BCE loss, empty sections."""
    cfg = exp.model_dump(mode="json")
    data = cfg["data"]
    if exp.data.kind == "image":
        for key in CLIP_FIELDS + VOLUME_FIELDS:
            data.pop(key, None)
    elif exp.data.kind == "video":
        for key in VOLUME_FIELDS:
            data.pop(key, None)
    if exp.model.kind != "vjepa2-native":
        for key in NATIVE_FIELDS:
            cfg["model"].pop(key, None)
    loss_type = exp.loss.type
    for kind, keys in LOSS_FIELDS.items():
        if loss_type != kind:
            for key in keys:
                cfg["loss"].pop(key, None)
    strategy = exp.adapt.strategy
    if strategy == "frozen":
        cfg["adapt"] = {"strategy": "frozen"}
    else:
        for key, strategies in ADAPT_ONLY.items():
            if strategy not in strategies or (key == "lora" and strategy == "staged" and exp.adapt.unfreeze != "lora"):
                cfg["adapt"].pop(key, None)
    for section, key in (("train", "grid"), ("train", "early_stopping"), ("data", "mask_column")):
        if cfg[section].get(key) is None:
            cfg[section].pop(key, None)
    for section in ("segmentation",):
        if cfg.get(section) is None:
            cfg.pop(section)
    if not (exp.tracking.mlflow or exp.tracking.wandb):
        cfg.pop("tracking")
    return yaml.safe_dump(cfg, sort_keys=False, width=100)


def loss_text(info: dict[str, Any], metrics: dict[str, Any]) -> str:
    """``BCE · pos_weight grey_matter 1.05, white_matter 0.98`` from a head's ``loss`` record: weights named by
    class or label and rounded to 3 significant digits; settings that are off are not listed."""
    names = metrics["task"]["class_names"] if metrics["task"]["type"] == "multiclass" else metrics["task"]["targets"]
    parts = [] if info.get("type") == "none" else [str(info.get("type", "?")).upper()]  # knn, prototype: no loss
    for key, value in info.items():
        if key == "type" or value is None or value == 0.0 or value == "none":
            continue
        if key in FITTED_GRIDS:  # the values a fitted head chose among on validation
            parts.append(f"{key} tried {', '.join(f'{v:g}' for v in value)}")
            continue
        parts.append(f"{key.replace('_', ' ')} {_numbers(value, names)}")
    return " · ".join(parts)


def _numbers(value: Any, names: list[str] | None) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_numbers(v, names)}" for k, v in value.items())
    if isinstance(value, list):
        labels = names if names is not None and len(names) == len(value) else [str(i) for i in range(len(value))]
        return ", ".join(f"{n} {_numbers(v, None)}" for n, v in zip(labels, value))
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
