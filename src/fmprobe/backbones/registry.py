"""``model:`` section -> a loaded :class:`Encoder`: the one place that knows which family wraps which checkpoint.

``model.name`` is the registry name ``dinov2-small-offline``, a local directory, or a hub id (needs network the
first time). ``kind: auto`` reads ``model_type`` from its config.json; another kind must agree with it.
Models built from code (``kind``: timm, open_clip, python, monai) load through their own modules.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.utils import cached_file

from fmprobe.backbones.base import Encoder
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

OFFLINE_DINOV2 = "dinov2-small-offline"

# config.json model_type -> model.kind (full two-tower / VLM checkpoints load their vision tower only)
MODEL_TYPES: dict[str, str] = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "vjepa2": "vjepa2",
    "videomae": "videomae",
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "blip-2": "blip2",
    "blip_2_vision_model": "blip2",
    "qwen2_5_vl": "qwen2_5_vl",
}


def load_encoder(model: ModelConfig) -> Encoder:
    """Load the backbone ``model`` names, frozen (eval mode, no gradients) in ``model.dtype``."""
    if model.kind == "vjepa2-native":
        return _load_native_vjepa2(model)
    if model.kind == "timm":
        from fmprobe.backbones.timm_encoder import load_timm

        return load_timm(model)
    if model.kind == "open_clip":
        from fmprobe.backbones.open_clip_encoder import load_open_clip

        return load_open_clip(model)
    if model.kind == "python":
        from fmprobe.backbones.python_encoder import load_python

        return load_python(model)
    if model.kind == "monai":
        from fmprobe.backbones.monai_encoder import load_monai

        return load_monai(model)
    source = str(_offline_dir()) if model.name == OFFLINE_DINOV2 else _expand(model.name)
    model_type = _model_type(source)
    kind = MODEL_TYPES.get(model_type)
    if kind is None:
        raise EncoderError(
            f"'{model.name}' is a '{model_type}' model, which fmprobe does not wrap; supported model types: "
            f"{', '.join(sorted(MODEL_TYPES))} (or kind: vjepa2-native with model.checkpoint; kind: timm, open_clip, "
            f"monai or python for models built from code)"
        )
    if model.kind not in ("auto", kind):
        raise EncoderError(
            f"model.kind is '{model.kind}' but '{model.name}' is a '{model_type}' model; set model.kind: {kind} or auto"
        )
    return _build(kind, model_type, source, model)


def _build(kind: str, model_type: str, source: str, model: ModelConfig) -> Encoder:
    name = model.name
    if kind == "dinov2":
        from fmprobe.backbones.dinov2 import Dinov2ImageEncoder

        return Dinov2ImageEncoder.from_pretrained(source, model, name=name, registers=model_type.endswith("registers"))
    if kind == "vjepa2":
        from fmprobe.backbones.vjepa2 import VJEPA2VideoEncoder

        return VJEPA2VideoEncoder.from_pretrained(source, model, name=name)
    if kind == "videomae":
        from fmprobe.backbones.videomae import VideoMAEVideoEncoder

        return VideoMAEVideoEncoder.from_pretrained(source, model, name=name)
    if kind == "clip":
        from fmprobe.backbones.clip_siglip import ClipImageEncoder

        return ClipImageEncoder.from_pretrained(source, model, name=name)
    if kind == "siglip":
        from fmprobe.backbones.clip_siglip import SiglipImageEncoder

        return SiglipImageEncoder.from_pretrained(source, model, name=name)
    if kind == "blip2":
        from fmprobe.backbones.blip2 import Blip2ImageEncoder

        return Blip2ImageEncoder.from_pretrained(source, model, name=name, full_model=model_type == "blip-2")
    from fmprobe.backbones.qwen2_5_vl import QwenVisionEncoder

    return QwenVisionEncoder(source, model)


def _load_native_vjepa2(model: ModelConfig) -> Encoder:
    assert model.checkpoint is not None  # ModelConfig requires it for this kind
    from fmprobe.backbones.hf_vision import torch_dtype
    from fmprobe.backbones.vjepa2 import VJEPA2VideoEncoder
    from fmprobe.backbones.vjepa2_native import load_native_vjepa2

    hf_model = load_native_vjepa2(
        _expand(model.checkpoint), crop_size=model.image_size, frames_per_clip=model.native_frames,
        num_heads=model.native_num_heads,
    ).to(torch_dtype(model))
    name = f"vjepa2-native:{Path(model.checkpoint).name}"
    return VJEPA2VideoEncoder.from_model(hf_model, model, name=name, source=None)


def _offline_dir() -> Path:
    from fmprobe.backbones.offline import offline_dinov2_dir

    return offline_dinov2_dir()


def _expand(name: str) -> str:
    """A local path with ``~`` expanded; a hub id unchanged."""
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def _model_type(source: str) -> str:
    """``model_type`` from the source's config.json (local directory or hub id)."""
    if Path(source).exists() and not Path(source).is_dir():
        raise EncoderError(
            f"model.name '{source}' is a file; give the model's directory (with config.json), a hub id, or "
            f"kind: vjepa2-native with model.checkpoint for a native V-JEPA 2 .pt"
        )
    try:
        path = cached_file(source, "config.json")
    except (OSError, ValueError) as err:
        raise EncoderError(
            f"cannot find model '{source}': not a local directory with config.json, nor a reachable hub id ({err})"
        ) from None
    with open(path) as f:
        config = json.load(f)
    if "model_type" not in config:
        raise EncoderError(
            f"{path} has no 'model_type', so its family is unknown; re-save the model with save_pretrained"
        )
    return str(config["model_type"])
