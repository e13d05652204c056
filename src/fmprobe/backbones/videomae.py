"""VideoMAE video encoder: fixed sin-cos position table, so input size and clip length must match the config."""

from __future__ import annotations

import torch
from transformers import VideoMAEModel

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


class VideoMAEVideoEncoder(HFVisionEncoder):
    """Clips ``[B, T, C, H, W]`` with T = num_frames; no prefix tokens. Layer -1 is after the final layernorm when
    ``use_mean_pooling`` is false, else the raw last block output (the model then has no final norm)."""

    blocks_path = "encoder.layer"

    @classmethod
    def from_pretrained(cls, source: str, model: ModelConfig, *, name: str) -> VideoMAEVideoEncoder:
        hf_model = load_pretrained(VideoMAEModel, source, model)
        config = hf_model.config
        patch = as_int(config.patch_size, "patch_size", source)
        size = as_int(config.image_size, "image_size", source)
        refuse_resize("VideoMAE", size, model, "its sin-cos position table is fixed to")
        mean, std = normalisation(read_preprocessor(source), (IMAGENET_MEAN, IMAGENET_STD))
        spec = InputSpec(
            kind="video", image_size=(size, size), mean=mean, std=std, num_frames=int(config.num_frames),
            patch_size=patch, tubelet_size=int(config.tubelet_size),
        )  # fmt: skip
        return cls(hf_model, name=name, input_spec=spec, num_prefix=0)

    def check_input(self, pixels: torch.Tensor) -> None:
        spec = self.input_spec
        if pixels.dim() == 5 and tuple(pixels.shape[-2:]) != spec.image_size:
            raise EncoderError(
                f"{self.name}: VideoMAE's position table is fixed to {spec.image_size[0]}x{spec.image_size[1]} "
                f"frames, got {pixels.shape[-2]}x{pixels.shape[-1]}; resize to the model's image_size"
            )
        super().check_input(pixels)
