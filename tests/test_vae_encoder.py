"""A diffusers VAE (the LTX-Video VAE's architecture, and an image AutoencoderKL) read through the Encoder interface:
latents as tokens in raster order with their grid, feature maps of inner modules, the decoder, and the refusals."""

from __future__ import annotations

import shutil

import pytest
import torch

from fmprobe.backbones.registry import load_encoder
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError
from fmprobe.standin import models


@pytest.fixture(scope="module")
def ltx(tmp_path_factory):
    return models.ltx_video_vae(tmp_path_factory.mktemp("ltx") / "vae")


def test_ltx_latents_are_the_posterior_mean_in_raster_order(ltx):
    import diffusers

    encoder = load_encoder(ModelConfig(name=str(ltx), image_size=64, layers=[-1, "encoder.down_blocks.0"]))
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    out = encoder.encode(pixels, [-1, "encoder.down_blocks.0"])
    vae = diffusers.AutoencoderKLLTXVideo.from_pretrained(ltx)
    with torch.no_grad():
        z = vae.encode(pixels[:, :, None]).latent_dist.mode()  # [B, C, 1, 8, 8]
    assert out.grid["-1"] == (1, 8, 8) and out.tokens["-1"].shape == (2, 64, 8)
    tokens = out.tokens["-1"].reshape(2, 8, 8, 8)  # [B, h, w, C]
    torch.testing.assert_close(tokens[:, 3, 5], z[:, :, 0, 3, 5])
    torch.testing.assert_close(out.tokens["-1"], z.flatten(2).transpose(1, 2))
    assert out.tokens["encoder.down_blocks.0"].shape == (2, 64, 32) and out.prefix["-1"].shape == (2, 0, 8)
    # the decoder renders the latents as the VAE itself does, mapped to [0, 1]
    with torch.no_grad():
        expected = ((vae.decode(z).sample[:, :, 0] + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(encoder.decode(out.tokens["-1"], out.grid["-1"]), expected)


def test_decoder_is_differentiable_and_timestep_conditioned_vaes_decode(tmp_path):
    path = models.ltx_video_vae(tmp_path / "vae", channels=(16, 16), timestep_conditioning=True)
    encoder = load_encoder(ModelConfig(name=str(path), image_size=32))
    z, grid = encoder.latents(torch.zeros(1, 3, 32, 32))
    z = z.clone().requires_grad_(True)
    encoder.decode(z, grid).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_image_vae_and_pipeline_subfolder(tmp_path):
    models.autoencoder_kl(tmp_path / "pipeline" / "vae")
    encoder = load_encoder(ModelConfig(name=str(tmp_path / "pipeline"), subfolder="vae", image_size=32))
    z, grid = encoder.latents(torch.zeros(2, 3, 32, 32))
    assert grid == (1, 16, 16) and z.shape == (2, 256, 4)
    assert encoder.decode(z, grid).shape == (2, 3, 32, 32) and encoder.name.endswith("pipeline/vae")


def test_vae_refusals(ltx, tiny_dinov2_dir, tmp_path):
    with pytest.raises(EncoderError, match="multiple of its spatial compression 8"):
        load_encoder(ModelConfig(name=str(ltx), image_size=60))
    with pytest.raises(EncoderError, match="set model.image_size"):
        load_encoder(ModelConfig(name=str(ltx)))
    with pytest.raises(EncoderError, match="set model.kind: vae or auto"):
        load_encoder(ModelConfig(name=str(ltx), kind="dinov2", image_size=64))
    with pytest.raises(EncoderError, match="has no such folder"):
        load_encoder(ModelConfig(name=str(tiny_dinov2_dir), subfolder="vae"))
    shutil.copytree(tiny_dinov2_dir, tmp_path / "pipe" / "vae")
    with pytest.raises(EncoderError, match="is a transformers model: remove it"):
        load_encoder(ModelConfig(name=str(tmp_path / "pipe"), subfolder="vae"))
    encoder = load_encoder(ModelConfig(name=str(ltx), image_size=64))
    with pytest.raises(EncoderError, match="no module 'encoder.nope'"):
        encoder.encode(torch.zeros(1, 3, 64, 64), ["encoder.nope"])
