"""A diffusers VAE (the LTX-Video VAE's architecture, and an image AutoencoderKL) read through the Encoder interface:
latents as tokens in raster order with their grid, feature maps of inner modules, the decoder, and the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

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


def test_align_points_against_the_vae_latent_channels(ltx, tiny_dinov2_dir, tmp_path):
    """CKA heatmap of a model's points x the VAE's latent channels, each channel its values at every latent token."""
    import yaml

    from fmprobe.diagnostics.align_cli import align_command
    from fmprobe.diagnostics.shapes import write_shapes_dataset

    manifest = write_shapes_dataset(tmp_path / "data", 24, size=32, seed=2)

    def config(name: str, model: dict) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "data": {"manifest": str(manifest)},
                                        "task": {"type": "multilabel", "targets": ["has_circle", "has_square"]},
                                        "model": model, "features": {"cache_dir": str(tmp_path / "cache"),
                                                                     "store_tokens": True}}))  # fmt: skip
        return path

    vlm = config("vlm", {"name": str(tiny_dinov2_dir), "layers": [0, -1]})
    vae = config("vae", {"name": str(ltx), "image_size": 32})
    out = align_command(str(vlm), f"{vae}:-1:channels", ["linear_cka", "linear_r2"], out=tmp_path / "out", bootstrap=30)
    cka = out["matrices"]["linear_cka"]
    assert cka["rows"] == ["0", "-1"] and cka["cols"] == [f"-1/c{k}" for k in range(8)]
    assert np.asarray(cka["values"]).shape == (2, 8) and all(ci[0] <= ci[1] for row in cka["ci"] for ci in row)
    assert out["b"]["dims"]["-1/c0"] == 16  # 4 x 4 latent tokens per channel
    flat = align_command(str(vlm), f"{vae}:-1:flat", ["linear_r2"], out=tmp_path / "flat")
    assert flat["b"]["dims"] == {"-1": 128} and set(flat["matrices"]["linear_r2"]["rows"]) == {"0", "-1"}
