"""A diffusers autoencoder (the LTX-Video VAE, ``AutoencoderKLLTXVideo``, or any other ``AutoencoderKL*``) as an
fmprobe Encoder: the generator's latent space as tokens with their grid, and its decoder to render latents back.

Why an encoder: the VLM study compares a VLM's tokens with the latents a video generator works in (alignment) and
trains adapters that predict those latents (``fmprobe reconstruct``); both need the latents of the same images in
fmprobe's one shape, ``[B, t*h*w, C]`` in raster order with grid ``(t, h, w)``.

Extraction points (``model.layers``): ``-1`` (or ``latent``) is the posterior mean of the encoder (the latents the
decoder takes, before any pipeline scaling by ``latents_mean`` / ``latents_std`` / ``scaling_factor``); a module
path inside the VAE (``encoder.down_blocks.1``) reads that module's feature map ``[B, C, (t,) h, w]``. Images go in
at ``model.image_size`` (a multiple of the spatial compression) scaled to [-1, 1]; a video VAE takes them as clips of
one frame (LTX-Video: ``[B, 3, 1, H, W]``, one latent frame).
"""

from __future__ import annotations

from typing import Any

import torch

from fmprobe.backbones.base import Encoder, EncoderOutput, InputSpec, LayerRef
from fmprobe.backbones.hf_vision import torch_dtype
from fmprobe.backbones.hooks import record_outputs, resolve_module
from fmprobe.backbones.weights_digest import WeightsDigest
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

HALF = (0.5, 0.5, 0.5)  # diffusers VAEs take pixels in [-1, 1]
LATENT = ("-1", "latent")


def load_vae(source: str, model: ModelConfig, config: dict[str, Any]) -> "VAEEncoder":
    """The diffusers class named by ``config['_class_name']`` loaded from ``source`` (``model.subfolder`` inside it)."""
    import diffusers

    name = str(config.get("_class_name", ""))
    cls = getattr(diffusers, name, None)
    if cls is None or not name.startswith("Autoencoder"):
        raise EncoderError(f"'{model.name}' is a diffusers '{name}', not an autoencoder fmprobe can read latents from "
                           "(AutoencoderKL, AutoencoderKLLTXVideo, ...); point model.name / model.subfolder at the VAE")
    kwargs = {"subfolder": model.subfolder} if model.subfolder else {}
    try:
        vae, info = cls.from_pretrained(source, torch_dtype=torch_dtype(model), output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise EncoderError(f"cannot load {name} from '{source}': {err}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise EncoderError(f"'{source}' lacks {len(missing)} weights of a {name} ({', '.join(missing[:6])}); "
                           "check model.name / model.subfolder")  # fmt: skip
    return VAEEncoder(vae, model)


class VAEEncoder(Encoder):
    """A diffusers VAE behind :class:`Encoder` (see the module docstring), with :meth:`decode` for reconstructions."""

    def __init__(self, vae: torch.nn.Module, model: ModelConfig):
        super().__init__()
        self.model = vae.requires_grad_(False)
        self.name = model.name + (f"/{model.subfolder}" if model.subfolder else "")
        self.video = hasattr(vae, "temporal_compression_ratio")  # video VAEs take [B, C, T, H, W]
        factor = int(getattr(vae, "spatial_compression_ratio", 0) or 2 ** (len(vae.config.block_out_channels) - 1))
        if model.image_size is None or model.image_size % factor:
            raise EncoderError(f"{self.name} takes any image whose side is a multiple of its spatial compression "
                               f"{factor}; set model.image_size to one (got {model.image_size})")  # fmt: skip
        self.compression = factor
        self.input_spec = InputSpec(kind="image", image_size=(model.image_size, model.image_size), mean=HALF, std=HALF,
                                    patch_size=factor)  # fmt: skip
        self._digest = WeightsDigest()
        self.eval()

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    def encode(self, pixels: torch.Tensor, layers: list[LayerRef], attentions: bool = False) -> EncoderOutput:
        self.check_input(pixels)
        if attentions:
            raise EncoderError(f"{self.name} is a convolutional autoencoder: it has no attention maps to read")
        if not layers:
            raise EncoderError(f"{self.name}: no layers requested; set model.layers: [-1] (the latents)")
        hooked = {str(ref): str(ref) for ref in layers if str(ref).strip() not in LATENT}
        for path in hooked.values():
            resolve_module(self.model, path, owner=self.name)
        x = self._as_input(pixels)
        with record_outputs(self.model, hooked, owner=self.name) as recorded:
            mean = self.model.encode(x).latent_dist.mode()
        out = EncoderOutput(tokens={}, prefix={}, grid={})
        for ref in layers:
            key = str(ref)
            out.tokens[key], out.grid[key] = self._tokens(recorded[key] if key in hooked else mean, key)
            out.prefix[key] = out.tokens[key][:, :0]
        return out

    def latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Latent tokens ``[B, t*h*w, C]`` of normalised pixels and their grid."""
        out = self.encode(pixels, [-1])
        return out.tokens["-1"], out.grid["-1"]

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Latent tokens ``[B, t*h*w, C]`` -> images ``[B, 3, H, W]`` in [0, 1] (the first frame of a video VAE).

        Differentiable (an adapter trains through it); a decoder conditioned on the denoising timestep (LTX-Video
        0.9.1+) decodes at timestep 0: the latents are taken as clean."""
        t, h, w = grid
        z = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], t, h, w).to(self._dtype())
        if not self.video:
            z = z[:, :, 0]
        kwargs = {}
        if getattr(self.model.config, "timestep_conditioning", False):
            kwargs["temb"] = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        image = self.model.decode(z, **kwargs).sample
        if self.video:
            image = image[:, :, 0]
        return ((image.float() + 1) / 2).clamp(0, 1)

    def fingerprint(self) -> str:
        header = type(self).__name__ + repr(self.input_spec) + repr(sorted(self.model.config.items()))
        return self._digest(self.model, header)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _as_input(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        x = pixels.to(device=param.device, dtype=param.dtype)
        return x[:, :, None] if self.video else x

    def _tokens(self, x: torch.Tensor, key: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        if x.dim() == 4:
            x = x[:, :, None]
        if x.dim() != 5:
            raise EncoderError(f"{self.name}: '{key}' outputs shape {tuple(x.shape)}, not a feature map [B, C, (t,) h, w]; "
                               "pick a module that outputs one (or -1 for the latents)")  # fmt: skip
        b, c, t, h, w = x.shape
        return x.flatten(2).transpose(1, 2), (t, h, w)
