"""``model:`` section -> a loaded :class:`Encoder`: the one place that knows which family wraps which checkpoint.

``model.name`` is the registry name ``dinov2-small-offline``, a local directory, or a hub id (needs network the
first time). ``kind: auto`` reads ``model_type`` from its config.json; another kind must agree with it. A checkpoint
that ships its own modeling code (config.json ``auto_map``, a model type transformers does not have) is a
remote-code VLM (InternVL2, CogVLM2): kind ``vlm``, loaded only with ``model.trust_remote_code: true``.
Models built from code (``kind``: timm, open_clip, python, monai) load through their own modules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from fmprobe.backbones.base import Encoder
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

OFFLINE_DINOV2 = "dinov2-small-offline"
KNOWN_NAMES = (OFFLINE_DINOV2,)  # model.name values fmprobe resolves itself (neither a folder nor a hub id)

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
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "llava": "vlm",
    "llava_next": "vlm",
    "llava_onevision": "vlm",
    "internvl": "vlm",
}
REMOTE = "remote code"  # the model type of a checkpoint with its own modeling code and no native type


def load_encoder(model: ModelConfig) -> Encoder:
    """Load the backbone ``model`` names, frozen (eval mode, no gradients) in ``model.dtype``."""
    with _quiet_transformers_bars():
        return _load(model)


@contextmanager
def _quiet_transformers_bars() -> Iterator[None]:
    """transformers draws a bar per load ("Loading weights", "Writing model shards"), which breaks fmprobe's own
    progress lines and fills logs. Silenced for this load only: the caller's tqdm hook is put back afterwards, and
    huggingface_hub's download bars are left alone."""
    previous = hf_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def _load(model: ModelConfig) -> Encoder:
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
    config = _config_json(source, model.subfolder)
    if "_diffusers_version" in config:
        return _load_vae(source, model, config)
    if model.subfolder is not None:
        raise EncoderError(f"model.subfolder '{model.subfolder}' picks a diffusers VAE inside a pipeline repository; "
                           f"'{model.name}' is a transformers model: remove it")  # fmt: skip
    model_type = REMOTE if _is_remote(config) else str(config["model_type"])
    kind = "vlm" if model_type == REMOTE else MODEL_TYPES.get(model_type)
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
    vlm_keys = [k for k in ("prompt", "trust_remote_code", "layout") if getattr(model, k) not in (None, False)]
    if vlm_keys and kind != "vlm":
        why = "its encoder feeds the image tokens alone" if kind.startswith("qwen") else "it is not a VLM"
        raise EncoderError(f"model.{', model.'.join(vlm_keys)} only apply to VLMs of kind vlm (LLaVA, LLaVA-NeXT, "
                           f"LLaVA-OneVision, InternVL, remote code); '{model.name}' is a '{model_type}' model and {why}: "
                           "remove them")  # fmt: skip
    if kind == "vlm":
        from fmprobe.backbones.vlm.encoder import load_vlm

        return load_vlm(source, model, config)
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


def _load_vae(source: str, model: ModelConfig, config: dict) -> Encoder:
    if model.kind not in ("auto", "vae"):
        raise EncoderError(f"model.kind is '{model.kind}' but '{model.name}' is a diffusers "
                           f"'{config.get('_class_name')}'; set model.kind: vae or auto")  # fmt: skip
    from fmprobe.backbones.vae import load_vae

    return load_vae(source, model, config)


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


def _config_json(source: str, subfolder: str | None = None) -> dict:
    """The source's config.json (local directory or hub id; in ``subfolder`` for a diffusers pipeline's VAE), with a
    ``model_type``, remote code, or a diffusers ``_class_name``."""
    path = Path(source)
    if subfolder and path.is_dir():
        if not (path / subfolder).is_dir():
            raise EncoderError(f"model.subfolder '{subfolder}': '{source}' has no such folder; give the folder inside "
                               "the pipeline that holds the VAE's config.json (Lightricks/LTX-Video: vae)")  # fmt: skip
        path = path / subfolder
    if path.exists() and not path.is_dir():
        raise EncoderError(
            f"model.name '{source}' is a file; give the model's directory (with config.json), a hub id, or "
            f"kind: vjepa2-native with model.checkpoint for a native V-JEPA 2 .pt"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise EncoderError(
            f"model.name '{source}' is a folder without config.json; give the folder a model was saved to with "
            "save_pretrained (it holds config.json and the weights)"
        )
    if not path.exists() and not _could_be_hub_id(source):
        raise EncoderError(_unknown_model(source, "the name cannot be a hub id (those read 'name' or 'namespace/name')"))
    try:
        config_path = cached_file(source, "config.json", subfolder=subfolder or "")
    except (OSError, ValueError) as err:
        hub_says = (str(err).strip().splitlines() or [type(err).__name__])[0]  # its first sentence says why
        raise EncoderError(_unknown_model(source, f"the Hugging Face hub did not provide it ({hub_says})")) from None
    with open(config_path) as f:
        config = json.load(f)
    if "model_type" not in config and "auto_map" not in config and "_diffusers_version" not in config:
        raise EncoderError(
            f"{config_path} has no 'model_type', so its family is unknown; re-save the model with save_pretrained"
        )
    return config


def _is_remote(config: dict) -> bool:
    """Its own modeling code (auto_map) under a model type transformers does not implement."""
    if "auto_map" not in config:
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return config.get("model_type") not in CONFIG_MAPPING_NAMES


def _could_be_hub_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _unknown_model(name: str, not_on_hub: str) -> str:
    """What to fix when ``model.name`` names nothing: the three kinds of name it may hold."""
    where = "" if Path(name).expanduser().is_absolute() else f" (relative to the working folder {Path.cwd()})"
    return (
        f"model.name '{name}' is neither an existing local folder nor a known model name: no such folder "
        f"exists{where}, and {not_on_hub}. Give the "
        "folder of a model saved with save_pretrained (holding config.json), a hub id such as "
        f"'facebook/dinov2-base', or one of fmprobe's names: {', '.join(KNOWN_NAMES)}"
    )
