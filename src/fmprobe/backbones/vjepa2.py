"""V-JEPA 2 video encoder (transformers checkpoints, or native .pt converted by vjepa2_native).

Its 3D RoPE computes token positions from ``crop_size`` and ``frames_per_clip``, whatever the input: any other
input size or clip length would run and return tokens with wrong positions. So such input is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import VJEPA2Model

from fmprobe.backbones.base import InputSpec
from fmprobe.backbones.hf_vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    HFVisionEncoder,
    as_int,
    load_pretrained,
    normalisation,
    read_preprocessor,
    refuse_resize,
)
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError


class VJEPA2VideoEncoder(HFVisionEncoder):
    """Clips ``[B, T, C, H, W]`` with T = frames_per_clip, H = W = crop_size; no prefix tokens; layer -1 is after
    the encoder's final layernorm. The predictor never runs."""

    blocks_path = "encoder.layer"
    input_name = "pixel_values_videos"
    fingerprint_prefix = "encoder."  # the predictor does not shape the features (and is random for native loads)

    @classmethod
    def from_model(
        cls, hf_model: VJEPA2Model, model: ModelConfig, *, name: str, source: str | None
    ) -> VJEPA2VideoEncoder:
        config = hf_model.config
        crop = as_int(config.crop_size, "crop_size", name)
        refuse_resize(f"V-JEPA 2 ({name})", crop, model, "its RoPE positions come from crop_size")
        mean, std = normalisation(read_preprocessor(source), (IMAGENET_MEAN, IMAGENET_STD))
        spec = InputSpec(
            kind="video", image_size=(crop, crop), mean=mean, std=std, num_frames=int(config.frames_per_clip),
            patch_size=as_int(config.patch_size, "patch_size", name), tubelet_size=int(config.tubelet_size),
        )  # fmt: skip
        return cls(hf_model, name=name, input_spec=spec, num_prefix=0)

    @classmethod
    def from_pretrained(cls, source: str, model: ModelConfig, *, name: str) -> VJEPA2VideoEncoder:
        return cls.from_model(load_pretrained(VJEPA2Model, source, model), model, name=name, source=source)

    def forward_kwargs(self) -> dict[str, Any]:
        return {"skip_predictor": True}

    def check_input(self, pixels: torch.Tensor) -> None:
        spec = self.input_spec
        if pixels.dim() == 5:
            if tuple(pixels.shape[-2:]) != spec.image_size:
                raise EncoderError(
                    f"{self.name}: V-JEPA 2 takes {spec.image_size[0]}x{spec.image_size[1]} frames (its crop_size, "
                    f"which fixes the RoPE grid), got {pixels.shape[-2]}x{pixels.shape[-1]}; resize to crop_size"
                )
            if pixels.shape[1] != spec.num_frames:
                raise EncoderError(
                    f"{self.name}: V-JEPA 2 takes clips of {spec.num_frames} frames (its frames_per_clip, which fixes "
                    f"the RoPE grid), got {pixels.shape[1]}; set data.frames_per_clip: {spec.num_frames}"
                )
        super().check_input(pixels)
