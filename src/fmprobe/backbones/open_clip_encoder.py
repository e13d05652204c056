"""open_clip image towers (``model.kind: open_clip``): BiomedCLIP, PubMedCLIP-style and every open_clip CLIP.

``name`` is an open_clip architecture (``ViT-B-16``) with ``weights`` a checkpoint file, or ``hf-hub:org/repo`` /
``local-dir:/path`` holding open_clip_config.json and the weights. open_clip builds and loads the whole model itself,
strictly (``require_pretrained``: no weights is an error; every key must match); ``args`` go to
``open_clip.create_model``. Only the image tower is kept. Mean, std and size come from the tower's preprocess_cfg.

Extraction points are the tower's blocks (its timm trunk's, for towers such as BiomedCLIP's); ``-1`` is the tokens
the tower's own forward returns with ``output_tokens`` (after its final norm); ``pooled`` is the image embedding
(after the projection), the vector CLIP compares with text.
"""

from __future__ import annotations

import torch
from torch import nn

from fmprobe.backbones.base import InputSpec
from fmprobe.backbones.checkpoints import LoadReport
from fmprobe.backbones.hf_vision import torch_dtype
from fmprobe.backbones.module_encoder import ModuleEncoder, Outputs
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

HUB_PREFIXES = ("hf-hub:", "local-dir:")


class OpenClipEncoder(ModuleEncoder):
    """An open_clip image tower read through its ``forward_intermediates``."""

    has_pooled = True

    def run(self, pixels: torch.Tensor, blocks: list[int], final: bool, pooled: bool) -> Outputs:
        last = self.num_points - 1
        wanted = sorted(set(blocks) | ({last} if final else set()))
        taken = self.model.forward_intermediates(
            pixels, indices=wanted or [last], output_fmt="NCHW", output_extra_tokens=True, intermediates_only=not pooled
        )
        maps = taken["image_intermediates"]
        prefixes = taken.get("image_intermediates_prefix") or [None] * len(maps)
        by_index = dict(zip(wanted or [last], zip(maps, prefixes)))
        out = Outputs(blocks={i: by_index[i] for i in blocks}, pooled=taken.get("image_features"))
        if final:
            tokens, prefix = by_index[last]
            sequence = tokens.flatten(2).transpose(1, 2)
            if prefix is not None:
                sequence = torch.cat([prefix, sequence], dim=1)
            out.final = self._final_norm()(sequence)
        return out

    def _final_norm(self) -> nn.Module:
        """The norm the tower's forward applies to its output tokens (identity where it applies none)."""
        visual = self.model
        if hasattr(visual, "trunk"):  # a timm trunk: forward_features ends with its norm
            return visual.trunk.norm
        if getattr(visual, "attn_pool", None) is not None:
            raise EncoderError(f"{self.name}: this tower pools its tokens with attention queries, so its output tokens "
                               "are not patch tokens; read a block index or 'pooled'")
        return nn.Identity() if getattr(visual, "final_ln_after_pool", False) else visual.ln_post

    def patch_grid(self, pixels: torch.Tensor) -> tuple[int, int, int] | None:
        visual = self.model
        embed = getattr(getattr(visual, "trunk", None), "patch_embed", None)
        if embed is not None:
            h, w = embed.dynamic_feat_size((pixels.shape[-2], pixels.shape[-1]))
            return 1, int(h), int(w)
        ph, pw = visual.patch_size
        return 1, pixels.shape[-2] // ph, pixels.shape[-1] // pw


def load_open_clip(model: ModelConfig) -> OpenClipEncoder:
    """Build and load the model with open_clip (strictly), keep its image tower, wrap it frozen."""
    import open_clip

    hub = model.name.startswith(HUB_PREFIXES)
    try:
        clip = open_clip.create_model(model.name, pretrained=None if hub else model.weights, require_pretrained=True,
                                      **model.args)  # fmt: skip
    except Exception as err:  # open_clip raises RuntimeError/ValueError/KeyError/OSError for configs and checkpoints
        raise EncoderError(f"open_clip cannot build and load '{model.name}' (weights {model.weights}): {err}") from None
    visual = clip.visual
    if not hasattr(visual, "forward_intermediates"):
        raise EncoderError(f"the image tower of '{model.name}' ({type(visual).__name__}) has no forward_intermediates; "
                           "wrap it with kind: python and a declared contract")
    visual = visual.to(torch_dtype(model))
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        num_points, num_prefix = len(trunk.feature_info), int(getattr(trunk, "num_prefix_tokens", 0) or 0)
    else:
        num_points, num_prefix = len(visual.transformer.resblocks), 1  # open_clip's ViT always has a class token
    report = LoadReport(source=model.weights or model.name, loaded=len(clip.state_dict()))
    identity = {"architecture": model.name, "args": model.args}
    return OpenClipEncoder(visual, name=model.name, input_spec=_input_spec(visual, model), num_prefix=num_prefix,
                           num_points=num_points, identity=identity, load_report=report)  # fmt: skip


def _input_spec(visual: nn.Module, model: ModelConfig) -> InputSpec:
    cfg = visual.preprocess_cfg
    size = cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    if model.image_size is not None and model.image_size != height:
        raise EncoderError(f"{model.name} is built for {height}x{width} input; model.image_size {model.image_size} "
                           "needs model.args: {force_image_size: N} (open_clip resizes the position table)")
    patch = visual.patch_size[0] if hasattr(visual, "patch_size") else visual.trunk.patch_embed.patch_size[0]
    return InputSpec(kind="image", image_size=(int(height), int(width)), mean=tuple(map(float, cfg["mean"])),
                     std=tuple(map(float, cfg["std"])), patch_size=int(patch))  # fmt: skip
