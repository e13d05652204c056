"""Tiny random transformers models wrapped as fmprobe encoders, for the adaptation tests."""

from __future__ import annotations

import torch
import transformers
from transformers import (
    Blip2VisionConfig, Blip2VisionModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, VJEPA2Config,
    VJEPA2Model,
)  # fmt: skip

from fmprobe.backbones.base import InputSpec
from fmprobe.backbones.blip2 import Blip2ImageEncoder
from fmprobe.backbones.clip_siglip import ClipImageEncoder
from fmprobe.backbones.dinov2 import Dinov2ImageEncoder
from fmprobe.backbones.vjepa2 import VJEPA2VideoEncoder
from fmprobe.config import ModelConfig

transformers.logging.set_verbosity_error()
TINY = dict(hidden_size=16, num_attention_heads=2)
IMAGE = InputSpec(kind="image", image_size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, patch_size=8)


def dinov2(blocks: int = 3, seed: int = 0) -> Dinov2ImageEncoder:
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**TINY, num_hidden_layers=blocks, mlp_ratio=2, image_size=16, patch_size=8))
    return Dinov2ImageEncoder(model, name="tiny-dinov2", input_spec=IMAGE, num_prefix=1)


def clip() -> ClipImageEncoder:
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY, num_hidden_layers=2, intermediate_size=32, image_size=16,
                                             patch_size=8))  # fmt: skip
    return ClipImageEncoder(model, name="tiny-clip", input_spec=IMAGE, num_prefix=1)


def blip2() -> Blip2ImageEncoder:
    torch.manual_seed(0)
    model = Blip2VisionModel(Blip2VisionConfig(**TINY, num_hidden_layers=2, intermediate_size=32, image_size=16,
                                               initializer_range=0.02,  # its default 1e-10 gives constant tokens
                                               patch_size=8))  # fmt: skip
    return Blip2ImageEncoder(model, name="tiny-blip2", input_spec=IMAGE, num_prefix=1)


def vjepa2_model(seed: int = 0, blocks: int = 2) -> VJEPA2Model:
    torch.manual_seed(seed)
    return VJEPA2Model(VJEPA2Config(**TINY, num_hidden_layers=blocks, mlp_ratio=2, crop_size=32, patch_size=16,
                                    frames_per_clip=4, tubelet_size=2, pred_hidden_size=16,
                                    pred_num_attention_heads=2, pred_num_hidden_layers=1))  # fmt: skip


def vjepa2(blocks: int = 2) -> VJEPA2VideoEncoder:
    return VJEPA2VideoEncoder.from_model(vjepa2_model(blocks=blocks), ModelConfig(), name="tiny-vjepa2", source=None)
