"""BLIP-2's EVA-CLIP vision tower, loaded alone (the Q-Former and language model are never built)."""

from __future__ import annotations

from transformers import Blip2Config, Blip2VisionModel

from fmprobe.backbones.clip_siglip import InterpolatingImageEncoder
from fmprobe.backbones.hf_vision import CLIP_MEAN, CLIP_STD, interpolating_image_spec, load_pretrained
from fmprobe.config import ModelConfig


class Blip2ImageEncoder(InterpolatingImageEncoder):
    """One CLS prefix token; layer -1 is after the tower's ``post_layernorm``."""

    @classmethod
    def from_pretrained(cls, source: str, model: ModelConfig, *, name: str, full_model: bool) -> Blip2ImageEncoder:
        if full_model:
            # a full BLIP-2 checkpoint stores the tower under "vision_model."; without the mapping transformers
            # would leave every vision weight random (load_pretrained refuses that anyway)
            vision_config = Blip2Config.from_pretrained(source).vision_config
            hf_model = load_pretrained(Blip2VisionModel, source, model, config=vision_config,
                                       key_mapping={r"^vision_model\.": ""})  # fmt: skip
        else:
            hf_model = load_pretrained(Blip2VisionModel, source, model)
        spec = interpolating_image_spec(hf_model.config, source, model, (CLIP_MEAN, CLIP_STD))
        return cls(hf_model, name=name, input_spec=spec, num_prefix=1)
