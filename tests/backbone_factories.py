"""Random-initialised models of the libraries fmprobe loads from code (timm, open_clip, MONAI), saved to disk the way
their users' checkpoints are, and the ``model:`` config sections that load them back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# A small ViT with the layout of the big ones: 2 blocks, 32-px input, 8-px patches (a 4 x 4 grid), 4 registers.
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
MONAI_VIT = {"in_channels": 1, "img_size": [16, 16, 8], "patch_size": [8, 8, 4], "hidden_size": 32, "mlp_dim": 64,
             "num_layers": 2, "num_heads": 2}  # fmt: skip


def timm_model(name: str = "vit_small_patch16_224", seed: int = 0, **args: Any) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=0, **{**TINY_VIT, **args}).eval()


def save_timm(path: Path, name: str = "vit_small_patch16_224", *, seed: int = 0, wrap: str | None = None,
              prefix: str = "", extra: dict[str, torch.Tensor] | None = None, **args: Any) -> dict[str, Any]:
    """Save a random timm model's state dict (keys under ``prefix``, inside ``{wrap: ...}`` when given, plus
    ``extra`` tensors) and return the config section that loads it without any adjustment."""
    net = timm_model(name, seed, **args)
    state = {prefix + k: v for k, v in net.state_dict().items()} | (extra or {})
    torch.save({wrap: state} if wrap else state, path)
    return {"kind": "timm", "name": name, "weights": str(path), "args": {**TINY_VIT, **args}}


def save_monai_vit(path: Path, seed: int = 0, **args: Any) -> dict[str, Any]:
    from monai.networks.nets import ViT

    torch.manual_seed(seed)
    torch.save(ViT(**{**MONAI_VIT, **args}).state_dict(), path)
    return {"kind": "monai", "name": "ViT", "weights": str(path), "args": {**MONAI_VIT, **args}}
