"""timm backbones (``model.kind: timm``): RETFound, UNI / UNI2, Virchow2, Prov-GigaPath, H-optimus, EVA-02, any
timm model with ``forward_intermediates``.

``name`` is the timm architecture; a pretrained tag (``vit_large_patch16_224.mae``) picks the pretrained_cfg whose
mean, std and input size the model is fed with (no download: the tag names the config only). ``args`` go to
``timm.create_model``; a ``*_layer`` argument written as a dotted path (``mlp_layer: timm.layers.SwiGLUPacked``) is
imported. The classifier is left out (``num_classes: 0`` unless ``args`` says otherwise) and a checkpoint's
classifier weights, named by the pretrained_cfg, are dropped (listed in the load report). ``weights`` is a state-dict
file, or ``hf-hub:org/repo`` / ``local-dir:/path``, whose config.json timm reads (it must build ``name``) and whose
weights load through ``checkpoints.load_state`` like a file: every key accounted for, nothing resampled.

Extraction points are what ``forward_intermediates`` indexes (the blocks of a ViT, the stages of a CNN); ``-1`` is
the output of ``forward_features`` (after the final norm); ``pooled`` is ``forward_head(pre_logits=True)``.
Prefix tokens (CLS, registers: ``num_prefix_tokens``) are split off.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from fmprobe.backbones.base import InputSpec
from fmprobe.backbones.checkpoints import LoadReport, load_state, read_state_dict
from fmprobe.backbones.hf_vision import torch_dtype
from fmprobe.backbones.module_encoder import ModuleEncoder, Outputs
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

HUB_PREFIXES = ("hf-hub:", "local-dir:")


class TimmEncoder(ModuleEncoder):
    """A timm model; tokens through ``forward_intermediates`` (feature maps flattened, prefix tokens apart)."""

    has_pooled = True

    def run(self, pixels: torch.Tensor, blocks: list[int], final: bool, pooled: bool) -> Outputs:
        out = Outputs()
        if blocks:
            extra = {"return_prefix_tokens": True} if self.num_prefix else {}
            last, taken = self.model.forward_intermediates(pixels, indices=blocks, output_fmt="NCHW", **extra)
            out.blocks = {i: item if isinstance(item, tuple) else (item, None) for i, item in zip(blocks, taken)}
        else:
            last = self.model.forward_features(pixels)
        out.final = last
        if pooled:
            out.pooled = self.model.forward_head(last, pre_logits=True)
        return out

    def patch_grid(self, pixels: torch.Tensor) -> tuple[int, int, int] | None:
        embed = getattr(self.model, "patch_embed", None)
        if embed is None:
            return None
        size = (pixels.shape[-2], pixels.shape[-1])
        h, w = embed.dynamic_feat_size(size) if hasattr(embed, "dynamic_feat_size") else embed.grid_size
        return 1, int(h), int(w)

    def attention_paths(self) -> list[str]:
        blocks = getattr(self.model, "blocks", None)
        paths = [f"blocks.{i}.attn.attn_drop" for i in range(len(blocks or []))]
        names = {name for name, _ in self.model.named_modules()}
        if not paths or any(p not in names for p in paths):
            raise EncoderError(
                f"{self.name}: attention maps are read from each block's attn.attn_drop (timm's explicit attention "
                f"path), which {type(self.model).__name__} does not have; turn attention diagnostics off for it"
            )
        return paths


def load_timm(model: ModelConfig) -> TimmEncoder:
    """Build ``model.name`` with ``model.args``, load ``model.weights``, wrap it frozen."""
    import timm

    assert model.weights is not None  # ModelConfig requires it for kind: timm
    args = {"num_classes": 0, **resolve_layer_args(model.args)}
    hub = model.weights.startswith(HUB_PREFIXES)
    try:
        net = timm.create_model(model.weights if hub else model.name, pretrained=False, **args)
    except (RuntimeError, ValueError, TypeError, KeyError, OSError) as err:
        built = model.weights if hub else model.name
        raise EncoderError(f"timm cannot build '{built}' with args {args}: {err}") from None
    architecture = str(net.pretrained_cfg.get("architecture", model.name))
    if hub and architecture != timm.models.split_model_name_tag(model.name)[0]:
        raise EncoderError(f"model.name is '{model.name}' but {model.weights} builds '{architecture}'; set "
                           f"model.name: {architecture}")
    if not hasattr(net, "forward_intermediates"):
        raise EncoderError(f"timm model '{architecture}' has no forward_intermediates, so its tokens cannot be read "
                           "per block; wrap it with kind: python and a declared contract")
    report = _load(net, model, hub)
    net = net.to(torch_dtype(model))
    num_prefix = int(getattr(net, "num_prefix_tokens", 0) or 0)
    identity = {"architecture": model.name, "args": model.args, "num_classes": args["num_classes"]}
    return TimmEncoder(net, name=model.name, input_spec=_input_spec(net, model), num_prefix=num_prefix,
                       num_points=len(net.feature_info), identity=identity, load_report=report)  # fmt: skip


def resolve_layer_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with each ``*_layer`` value written as a dotted path (``torch.nn.SiLU``) imported."""
    resolved = dict(args)
    for key, value in args.items():
        if key.endswith("_layer") and isinstance(value, str) and "." in value:
            module, _, attr = value.rpartition(".")
            try:
                resolved[key] = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as err:
                raise EncoderError(f"model.args.{key}: cannot import '{value}': {err}") from None
    return resolved


def _load(net: torch.nn.Module, model: ModelConfig, hub: bool) -> LoadReport:
    assert model.weights is not None
    if hub:
        state: Any = _hub_state_dict(model.weights)
        if model.weights_key is not None:
            state = read_state_dict(state, model.weights_key, source=model.weights)
    else:
        state = read_state_dict(model.weights, model.weights_key)
    classifier = net.pretrained_cfg.get("classifier") if getattr(net, "num_classes", None) == 0 else None
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    dropped = sorted(k for k in state if any(k in (f"{h}.weight", f"{h}.bias") for h in heads))
    report = load_state(net, {k: v for k, v in state.items() if k not in dropped}, model, owner=model.name)
    report.dropped = sorted(report.dropped + dropped)
    return report


def _hub_state_dict(source: str) -> dict[str, torch.Tensor]:
    """The weights next to a hub / local-dir config.json, read by timm's own helpers."""
    from timm.models._hub import load_state_dict_from_hf, load_state_dict_from_path

    try:
        if source.startswith("local-dir:"):
            return load_state_dict_from_path(Path(source[len("local-dir:") :]).expanduser())
        return load_state_dict_from_hf(source[len("hf-hub:") :])
    except Exception as err:  # hub, file and format errors all mean "no weights here"
        raise EncoderError(f"cannot read the weights of '{source}': {err}") from None


def _input_spec(net: torch.nn.Module, model: ModelConfig) -> InputSpec:
    """Mean and std from the model's pretrained_cfg (timm's resolve_data_config), input size from it or, for a
    patch-embedding model, the size it was built for; ``model.image_size`` only where the model takes another size
    (no fixed position table, or ``args: {dynamic_img_size: true}``)."""
    from timm.data import resolve_data_config

    data = resolve_data_config({}, model=net)
    channels, height, width = data["input_size"]
    if channels != 3:
        raise EncoderError(f"{model.name} takes {channels}-channel input; fmprobe feeds RGB (3 channels): set "
                           "model.args.in_chans: 3 or wrap it with kind: python")
    embed = getattr(net, "patch_embed", None)
    patch = int(embed.patch_size[0]) if embed is not None else int(net.feature_info[-1]["reduction"])
    if getattr(embed, "img_size", None) is not None:  # the size the model was built for (args.img_size included)
        height, width = embed.img_size
    if model.image_size is not None:
        fixed = net.pretrained_cfg.get("fixed_input_size", False) and not getattr(net, "dynamic_img_size", False)
        if fixed and model.image_size != height:
            raise EncoderError(
                f"{model.name} has a fixed {height}x{width} position table, so model.image_size {model.image_size} "
                "cannot apply; set model.args.dynamic_img_size: true (positions interpolated) or remove image_size"
            )
        if embed is not None and model.image_size % patch:
            raise EncoderError(f"model.image_size {model.image_size} must be a multiple of the patch size {patch}")
        height = width = model.image_size
    return InputSpec(kind="image", image_size=(int(height), int(width)), mean=tuple(map(float, data["mean"])),
                     std=tuple(map(float, data["std"])), patch_size=patch)  # fmt: skip
