"""DINOv2 (and DINOv2 with registers): image encoder, CLS + register prefix, position embeddings interpolated."""

from __future__ import annotations

from transformers import Dinov2Model, Dinov2WithRegistersModel

from fmprobe.backbones.hf_vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    HFVisionEncoder,
    interpolating_image_spec,
    load_pretrained,
)
from fmprobe.config import ModelConfig


class Dinov2ImageEncoder(HFVisionEncoder):
    """``-1`` is after DINOv2's final layernorm; prefix = CLS then ``num_register_tokens`` registers.

    Dinov2Embeddings always interpolates its position table to the input grid, so the input size is free: by
    default the checkpoint's preprocessing crop (224 for the published models), not config.json's 518.
    """

    blocks_path = "encoder.layer"

    @classmethod
    def from_pretrained(cls, source: str, model: ModelConfig, *, name: str, registers: bool) -> Dinov2ImageEncoder:
        hf_model = load_pretrained(Dinov2WithRegistersModel if registers else Dinov2Model, source, model)
        spec = interpolating_image_spec(hf_model.config, source, model, (IMAGENET_MEAN, IMAGENET_STD))
        num_prefix = 1 + int(getattr(hf_model.config, "num_register_tokens", 0) or 0)
        return cls(hf_model, name=name, input_spec=spec, num_prefix=num_prefix)
