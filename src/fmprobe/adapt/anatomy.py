"""Where things live inside each wrapped model: blocks, attention projections, the final norm.

The one place that knows module names per family (transformers 5 names, read from the installed source; timm
vision transformers read from the model itself: ``blocks``, ``attn.qkv`` or ``attn.q_proj/k_proj/v_proj``,
``norm``), so LoRA presets, partial unfreezing, layer-wise decay and drop-path share them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from fmprobe.backbones.base import Encoder, LayerRef
from fmprobe.backbones.blip2 import PROJECTOR_POINTS, Blip2ImageEncoder
from fmprobe.backbones.hf_vision import HFVisionEncoder
from fmprobe.backbones.qwen2_5_vl import QwenVisionEncoder
from fmprobe.backbones.vlm.encoder import VLMEncoder
from fmprobe.backbones.timm_encoder import TimmEncoder
from fmprobe.errors import ConfigError


@dataclass(frozen=True)
class Anatomy:
    """Module paths relative to ``encoder.model``."""

    blocks: str  # the nn.ModuleList of transformer blocks
    q: str | None  # query / key / value projections inside a block (None when fused)
    k: str | None
    v: str | None
    qkv: str | None  # the fused projection (BLIP-2's EVA-CLIP)
    final_norm: str | None  # the norm applied to every token after the last block (None: there is none)


_ANATOMY: dict[str, Anatomy] = {
    "dinov2": Anatomy("encoder.layer", "attention.q_proj", "attention.k_proj", "attention.v_proj", None, "layernorm"),
    "vjepa2": Anatomy("encoder.layer", "attention.query", "attention.key", "attention.value", None,
                      "encoder.layernorm"),  # the predictor has the same names: paths stay under encoder.
    "videomae": Anatomy("encoder.layer", "attention.attention.query", "attention.attention.key",
                        "attention.attention.value", None, "layernorm"),
    "clip_vision_model": Anatomy("encoder.layers", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", None,
                                 None),  # post_layernorm touches the pooled CLS only, never the tokens
    "siglip_vision_model": Anatomy("encoder.layers", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                   None, "post_layernorm"),
    "blip_2_vision_model": Anatomy("encoder.layers", None, None, None, "self_attn.qkv", "post_layernorm"),
    # the merger's ln_q feeds only the merger's tokens (read as the module path "merger"), so no final norm
    "qwen2_5_vl_vision": Anatomy("blocks", None, None, None, "attn.qkv", None),
    "qwen2_vl_vision": Anatomy("blocks", None, None, None, "attn.qkv", None),
    "qwen3_vl_vision": Anatomy("blocks", None, None, None, "attn.qkv", None),
    # InternVL's native tower (InternViT converted): separate projections; its final layernorm is an Identity
    "internvl_vision": Anatomy("encoder.layer", "attention.q_proj", "attention.k_proj", "attention.v_proj", None, None),
}
_ANATOMY["dinov2_with_registers"] = _ANATOMY["dinov2"]


def hf_model(encoder: Encoder) -> nn.Module:
    """The model an adaptation strategy changes (a transformers model or a timm model); refuses encoders it cannot
    train through."""
    if isinstance(encoder, TimmEncoder):
        return encoder.model
    if isinstance(encoder, VLMEncoder):
        _refuse_language_points(encoder.name, encoder.tokenizer is not None, "vision-tower blocks or the projector")
        return encoder.tower
    if isinstance(encoder, QwenVisionEncoder):
        _refuse_language_points(encoder.name, encoder.vlm is not None, "a vision block or visual.merger")
        return encoder.visual
    if not isinstance(encoder, HFVisionEncoder):
        raise ConfigError(
            f"{encoder.name} ({type(encoder).__name__}) cannot be adapted end to end: fmprobe knows the layout of "
            "transformers vision models and timm vision transformers only; use adapt.strategy: frozen"
        )
    return encoder.model


def family(encoder: Encoder) -> str:
    """The family name used in messages: transformers' model_type, or ``timm:<architecture class>``."""
    model = hf_model(encoder)
    if isinstance(encoder, TimmEncoder):
        return f"timm:{type(model).__name__}"
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def anatomy(encoder: Encoder) -> Anatomy:
    if isinstance(encoder, VLMEncoder):
        return _vlm_tower(encoder)
    model = hf_model(encoder)
    if isinstance(encoder, TimmEncoder):
        return _timm_anatomy(encoder, model)
    model_type = model.config.model_type
    if model_type not in _ANATOMY:
        raise ConfigError(f"adaptation does not know the layout of '{model_type}' models; use adapt.strategy: frozen")
    found = _ANATOMY[model_type]
    if found.final_norm is not None and getattr(model, found.final_norm.split(".")[-1], 1) is None:
        return Anatomy(found.blocks, found.q, found.k, found.v, found.qkv, None)  # VideoMAE with mean pooling
    return found


def _vlm_tower(encoder: VLMEncoder) -> Anatomy:
    """A VLM's vision tower: blocks from the family, attention projections from the table (native towers) or the
    declared layout (remote code). No final norm: VLM block points are raw block outputs."""
    layout = encoder.family
    blocks = layout.tower_blocks.removeprefix(layout.tower + ".")
    if layout.tower_qkv is not None:
        return Anatomy(blocks, None, None, None, layout.tower_qkv, None)
    known = _ANATOMY.get(getattr(getattr(encoder.tower, "config", None), "model_type", None))
    if known is None:
        raise ConfigError(f"{encoder.name}: adaptation does not know the attention layout of its vision tower; "
                          "declare model.layout.tower_qkv, or use adapt.strategy: frozen")  # fmt: skip
    return Anatomy(blocks, known.q, known.k, known.v, known.qkv, None)


def _timm_anatomy(encoder: Encoder, model: nn.Module) -> Anatomy:
    """A timm ViT-style model (VisionTransformer, Eva, ...): ``blocks`` of ``attn`` with a fused ``qkv`` or separate
    ``q_proj`` / ``k_proj`` / ``v_proj``, and ``norm`` when forward_features applies one (not with fc_norm)."""
    blocks = getattr(model, "blocks", None)
    names = {name for name, _ in blocks[0].named_modules()} if isinstance(blocks, nn.Sequential | nn.ModuleList) else {}
    if "attn.qkv" in names:
        q = k = v = None
        qkv: str | None = "attn.qkv"
    elif {"attn.q_proj", "attn.k_proj", "attn.v_proj"} <= names:
        q, k, v, qkv = "attn.q_proj", "attn.k_proj", "attn.v_proj", None
    else:
        raise ConfigError(
            f"{encoder.name} ({type(model).__name__}) is not a timm vision transformer with blocks.N.attn.qkv (or "
            "q_proj/k_proj/v_proj), so adaptation does not know its layout; use adapt.strategy: frozen"
        )
    norm = getattr(model, "norm", None)
    return Anatomy("blocks", q, k, v, qkv, None if norm is None or isinstance(norm, nn.Identity) else "norm")


def num_blocks(encoder: Encoder) -> int:
    return len(hf_model(encoder).get_submodule(anatomy(encoder).blocks))


def block_index(name: str, blocks_path: str) -> int | None:
    """Block number of a parameter/module path inside the blocks list, or None outside it."""
    m = re.match(re.escape(blocks_path) + r"\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None


def head_block(encoder: Encoder, layer: LayerRef) -> tuple[int, bool]:
    """(last block whose output the head reads, whether the final norm is on the path) for a head's layer; a head
    on BLIP-2's ``qformer`` / ``language_projection`` reads through the projector from the final output."""
    if isinstance(encoder, VLMEncoder):
        block = encoder.block_index(layer)
        if block is None:
            raise ConfigError(f"partial unfreezing counts blocks back from the head's layer, which must be a vision-tower "
                              f"block of {encoder.name} (e.g. -2@tiles), not '{layer}'")  # fmt: skip
        return block, False
    n = num_blocks(encoder)
    if isinstance(encoder, Blip2ImageEncoder) and str(layer) in PROJECTOR_POINTS:
        return n - 1, True  # BLIP-2's projector reads the tower's final output (after post_layernorm)
    ref = int(layer) if isinstance(layer, str) and re.fullmatch(r"-?\d+", layer.strip()) else layer
    if isinstance(ref, str):
        raise ConfigError(
            f"partial unfreezing counts blocks back from the head's layer, which must be a block index, not the "
            f"module path '{ref}'; set the head's layer to a block index or -1"
        )
    if ref == -1:
        return n - 1, True
    if not -n <= ref < n:
        raise ConfigError(f"layer {ref} is out of range for {n} blocks")
    return ref % n, False


def _refuse_language_points(name: str, reads_language_model: bool, instead: str) -> None:
    """A VLM trains end to end through its vision tower only; points in the language model cannot be adapted."""
    if reads_language_model:
        raise ConfigError(f"{name}: end-to-end adaptation trains the vision tower, but model.layers reads "
                          f"language-model points; read {instead}, or use adapt.strategy: frozen")
