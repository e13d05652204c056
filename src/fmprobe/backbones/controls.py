"""Control encoders: what a probe gets from raw pixels, and from tokens that carry nothing at all.

A foundation model's probe score means little alone. ``PixelPatchEncoder`` (flattened pixel patches) is the
floor a model must beat to show it learned something beyond the pixels; ``RandomTokenEncoder`` (noise that
ignores the image) is the chance level a probe reaches from the data's layout and its own biases.
Both have one extraction point, named by layer ``-1`` or ``0``; neither has prefix tokens or attention maps.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fmprobe.backbones.base import Encoder, EncoderOutput, InputSpec, LayerRef
from fmprobe.errors import EncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ControlEncoder(Encoder):
    """Shared checks and output packing; subclasses compute the tokens."""

    def __init__(self, name: str, patch: int, image_size: int):
        super().__init__()
        if patch < 1 or image_size < patch or image_size % patch:
            raise EncoderError(f"{name}: image_size {image_size} must be a positive multiple of the patch size {patch}")
        self.name = name
        self.input_spec = InputSpec(
            kind="image", image_size=(image_size, image_size), mean=IMAGENET_MEAN, std=IMAGENET_STD, patch_size=patch
        )
        self.eval()

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor, layers: list[LayerRef], attentions: bool = False) -> EncoderOutput:
        self.check_input(pixels)
        if attentions:
            raise EncoderError(f"{self.name} has no attention maps; turn attention diagnostics off for this control")
        if not layers:
            raise EncoderError(f"{self.name}: no layers requested; set model.layers: [-1]")
        bad = [ref for ref in layers if str(ref).strip() not in ("-1", "0")]
        if bad:
            raise EncoderError(f"{self.name} has one extraction point (layer -1 or 0); cannot extract layers {bad}")
        tokens = self.tokens(pixels.float())
        spec = self.input_spec
        grid = (1, spec.image_size[0] // spec.patch_size, spec.image_size[1] // spec.patch_size)
        prefix = tokens[:, :0]
        keys = [str(ref) for ref in layers]
        return EncoderOutput(
            tokens={k: tokens for k in keys}, prefix={k: prefix for k in keys}, grid={k: grid for k in keys}
        )

    def _digest(self, *parts: object) -> str:
        digest = hashlib.sha256(type(self).__name__.encode())
        digest.update(repr((self.input_spec, *parts)).encode())
        return digest.hexdigest()


class PixelPatchEncoder(_ControlEncoder):
    """Tokens = the normalised pixels of each patch, flattened channel-first (D = 3 * patch * patch)."""

    def __init__(self, patch: int = 16, image_size: int = 112, *, name: str | None = None):
        super().__init__(name or f"pixel-patch-{patch}", patch, image_size)
        self.dim = 3 * patch * patch

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return patchify(pixels, self.input_spec.patch_size)

    def fingerprint(self) -> str:
        return self._digest(self.dim)


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), C*p*p]`` patches in raster order, each flattened as (c, y, x)."""
    return torch.nn.functional.unfold(pixels, kernel_size=patch, stride=patch).transpose(1, 2).contiguous()


class RandomTokenEncoder(_ControlEncoder):
    """Standard-normal tokens drawn from a generator keyed by ``seed`` and a hash of each image's bytes.

    The same image always gets the same tokens (so features cache and runs reproduce), while the tokens carry
    no information about what the image shows.
    """

    def __init__(self, dim: int = 384, patch: int = 16, image_size: int = 112, seed: int = 0, *, name: str | None = None):
        if dim < 1:
            raise EncoderError(f"RandomTokenEncoder: dim must be >= 1, got {dim}")
        super().__init__(name or f"random-tokens-{dim}", patch, image_size)
        self.dim = dim
        self.seed = seed

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        spec = self.input_spec
        n = (spec.image_size[0] // spec.patch_size) * (spec.image_size[1] // spec.patch_size)
        out = np.empty((pixels.shape[0], n, self.dim), dtype=np.float32)
        for i, image in enumerate(pixels.detach().cpu().numpy()):
            key = int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "little")
            out[i] = np.random.default_rng([self.seed, key]).standard_normal((n, self.dim), dtype=np.float32)
        return torch.from_numpy(out).to(pixels.device)

    def fingerprint(self) -> str:
        return self._digest(self.dim, self.seed)
