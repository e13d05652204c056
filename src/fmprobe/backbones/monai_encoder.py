"""MONAI's 3D Vision Transformer (``model.kind: monai``, ``name: ViT``): the encoder of UNETR and of CT/MR
foundation models built on it, fed whole volumes ``[B, 1, x, y, z]`` (RAS+ axes, as MONAI pipelines orient them).

``args`` go to ``monai.networks.nets.ViT`` (``img_size``, ``patch_size``, ``hidden_size``, ...; ``in_channels`` 1,
``spatial_dims`` 3); ``weights`` is its state-dict file (``rename: {"vit.": ""}`` reads a UNETR checkpoint's encoder).
Extraction points are the transformer blocks; ``-1`` is the output of the final ``norm``; the token grid is
``img_size / patch_size`` per axis; with ``classification: true`` the CLS token is the prefix. Attention maps are
the softmax each block's self-attention keeps before its dropout (not with ``use_flash_attention``).
Other MONAI networks (SwinUNETR's Swin encoder, ...) go through ``kind: python`` with a factory and a contract.
"""

from __future__ import annotations

from typing import Any

import torch

from fmprobe.backbones.base import InputSpec
from fmprobe.backbones.checkpoints import load_weights
from fmprobe.backbones.hf_vision import torch_dtype
from fmprobe.backbones.hooks import record_outputs
from fmprobe.backbones.module_encoder import ModuleEncoder, Outputs
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

SUPPORTED = ("ViT",)


class MonaiViTEncoder(ModuleEncoder):
    """``monai.networks.nets.ViT`` read through hooks on its blocks and final norm."""

    def __init__(self, model: torch.nn.Module, *, grid: tuple[int, int, int], **kwargs: Any):
        self.grid = grid
        super().__init__(model, **kwargs)

    def run(self, pixels: torch.Tensor, blocks: list[int], final: bool, pooled: bool) -> Outputs:
        paths = {str(i): f"blocks.{i}" for i in blocks} | ({"final": "norm"} if final else {})
        with record_outputs(self.model, paths, owner=self.name) as recorded:
            self.model(pixels)
        return Outputs(blocks={i: (recorded[str(i)], None) for i in blocks}, final=recorded.get("final"))

    def patch_grid(self, pixels: torch.Tensor) -> tuple[int, int, int] | None:
        return self.grid  # check_input holds the input to img_size

    def attention_paths(self) -> list[str]:
        if any(block.attn.use_flash_attention for block in self.model.blocks):
            raise EncoderError(f"{self.name} computes attention with use_flash_attention, which never materialises "
                               "the maps; build it without (model.args.use_flash_attention: false)")
        return [f"blocks.{i}.attn.drop_weights" for i in range(len(self.model.blocks))]


def load_monai(model: ModelConfig) -> MonaiViTEncoder:
    from monai.networks import nets
    from monai.utils import ensure_tuple_rep

    if model.name not in SUPPORTED:
        raise EncoderError(f"kind: monai wraps {', '.join(SUPPORTED)}; for '{model.name}' (e.g. SwinUNETR's encoder) "
                           "use kind: python with a factory returning the encoder and a contract of what it returns")
    args = dict(model.args)
    if args.get("spatial_dims", 3) != 3 or args.get("in_channels") != 1:
        raise EncoderError("kind: monai ViT takes 3D volumes of one channel: set model.args.spatial_dims: 3 and "
                           "in_channels: 1 (2D ViTs: kind: timm)")
    try:
        net = nets.ViT(**args)
    except (TypeError, ValueError, AssertionError) as err:
        raise EncoderError(f"monai.networks.nets.ViT cannot be built with args {args}: {err}") from None
    report = load_weights(net, model, owner=model.name)
    size, patch = (ensure_tuple_rep(args[key], 3) for key in ("img_size", "patch_size"))
    grid = (int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1]), int(size[2]) // int(patch[2]))
    spec = InputSpec.volume((int(size[0]), int(size[1]), int(size[2])))
    return MonaiViTEncoder(net.to(torch_dtype(model)), grid=grid, name=f"monai:{model.name}", input_spec=spec,
                           num_prefix=1 if net.classification else 0, num_points=len(net.blocks),
                           identity={"network": model.name, "args": args}, load_report=report)  # fmt: skip
