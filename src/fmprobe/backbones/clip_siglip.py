"""CLIP and SigLIP vision towers (loaded alone, also from a full two-tower checkpoint)."""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionModel, SiglipVisionModel

from fmprobe.backbones.hf_vision import (
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    HFVisionEncoder,
    as_int,
    interpolating_image_spec,
    load_pretrained,
)
from fmprobe.config import ModelConfig


class InterpolatingImageEncoder(HFVisionEncoder):
    """An image tower whose forward() takes ``interpolate_pos_encoding``: asked for only off the native size."""

    blocks_path = "encoder.layers"

    def forward_kwargs(self) -> dict[str, Any]:
        native = as_int(self.model.config.image_size, "image_size", self.name)
        return {"interpolate_pos_encoding": self.input_spec.image_size != (native, native)}


class ClipImageEncoder(InterpolatingImageEncoder):
    """CLIP: one CLS prefix token. Its ``last_hidden_state`` (layer -1) is the raw last block output, because
    CLIP's ``post_layernorm`` applies to the pooled CLS only."""

    @classmethod
    def from_pretrained(cls, source: str, model: ModelConfig, *, name: str) -> ClipImageEncoder:
        hf_model = load_pretrained(CLIPVisionModel, source, model)
        spec = interpolating_image_spec(hf_model.config, source, model, (CLIP_MEAN, CLIP_STD))
        return cls(hf_model, name=name, input_spec=spec, num_prefix=1)


class SiglipImageEncoder(InterpolatingImageEncoder):
    """SigLIP: no CLS (prefix P=0); layer -1 is after its ``post_layernorm``."""

    @classmethod
    def from_pretrained(cls, source: str, model: ModelConfig, *, name: str) -> SiglipImageEncoder:
        hf_model = load_pretrained(SiglipVisionModel, source, model)
        spec = interpolating_image_spec(hf_model.config, source, model, (HALF, HALF))
        return cls(hf_model, name=name, input_spec=spec, num_prefix=0)
