"""The reconstruction probe: its image scores on known cases, LPIPS without a download, and `fmprobe reconstruct`
training an adapter through the core, rendering with the VAE decoder and scoring with CIs and paired controls.

LPIPS here runs on an AlexNet with random weights written by the test (a user's machine reads torchvision's
ImageNet file): the scores' plumbing is tested, not the published metric's values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
import yaml

from fmprobe.diagnostics.reconstruct_run import reconstruct_command
from fmprobe.diagnostics.reconstruction import (
    ALEXNET_URL,
    component_detections,
    edge_f1,
    load_lpips,
    reconstruction_scores,
    spatial_iou,
)
from fmprobe.diagnostics.shapes import make_shapes
from fmprobe.diagnostics.spatial import coco_average_precision
from fmprobe.errors import ConfigError
from fmprobe.standin import models
from fmprobe.train.seeding import seeded

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.pth"
    with seeded(0):
        torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def test_scores_of_the_originals_themselves_are_perfect(alexnet_file):
    data = make_shapes(12, size=64, seed=1)
    images = data.images.astype(np.float32) / 255
    np.testing.assert_array_equal(spatial_iou(images, data.objects), 1.0)  # the foreground rule segments them exactly
    assert coco_average_precision(component_detections(images), [o.boxes[0] for o in data.objects]) == 1.0
    np.testing.assert_array_equal(edge_f1(images, images), 1.0)
    scores = reconstruction_scores(torch.from_numpy(images), torch.from_numpy(images), data.objects,
                                   load_lpips(alexnet_file))  # fmt: skip
    np.testing.assert_allclose(scores["lpips"], 0.0, atol=1e-6)
    np.testing.assert_allclose(scores["ssim"], 1.0, atol=1e-3)
    # shifted by 8 px: the objects move off their masks, the edges off their places
    shifted = np.roll(images, 8, axis=3)
    assert spatial_iou(shifted, data.objects).mean() < 0.7 and edge_f1(shifted, images).mean() < 0.5
    dark = np.zeros_like(images)
    np.testing.assert_array_equal(spatial_iou(dark, data.objects), 0.0)


def test_lpips_refuses_to_run_without_its_backbone_weights(tmp_path, alexnet_file):
    with pytest.raises(ConfigError, match=f"fetch {ALEXNET_URL} to {tmp_path / 'none.pth'}"):
        load_lpips(tmp_path / "none.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a state dict")
    with pytest.raises(ConfigError, match="not a torchvision AlexNet state dict"):
        load_lpips(tmp_path / "bad.pth")
    metric = load_lpips(alexnet_file)
    reference = torchvision.models.alexnet()
    reference.load_state_dict(torch.load(alexnet_file))
    torch.testing.assert_close(metric.net.slice3.get_submodule("6").weight, reference.features[6].weight)  # the file


def test_reconstruct_trains_renders_and_scores_every_point_with_paired_controls(tmp_path, alexnet_file,
                                                                               tiny_dinov2_dir):  # fmt: skip
    vae = models.ltx_video_vae(tmp_path / "vae")
    config = tmp_path / "vae.yaml"
    config.write_text(yaml.safe_dump({"name": "vae", "data": {"manifest": "unused.csv"},
                                      "task": {"type": "binary", "targets": ["y"]},
                                      "model": {"name": str(vae), "image_size": 32}}))  # fmt: skip
    out = reconstruct_command(str(tiny_dinov2_dir), str(config), layers=[0, -1], n_train=6, n_val=2, n_test=4,
                              epochs=2, hidden=16, batch_size=4, lr=1e-3, bootstrap=30, controls=["pixel"],
                              lpips_backbone=alexnet_file, gallery=3, out=tmp_path / "out")  # fmt: skip
    assert out["latent_grid"] == [1, 4, 4] and out["latent_channels"] == 8 and out["image_size"] == 32
    assert [r["layer"] for r in out["results"]] == ["0", "-1"] and out["controls"][0]["control"] == "pixel"
    for row in out["results"]:
        assert 1 <= row["best_epoch"] <= 2
        for m in ("lpips", "ssim", "edge_f1", "spatial_iou", "map50"):
            lo, hi = row["ci"][m]
            assert lo - 1e-9 <= row[m] <= hi + 1e-9, m
            assert row["vs"]["pixel"][m]["diff"] == pytest.approx(row[m] - out["controls"][0][m], abs=1e-9)
        assert (tmp_path / "out" / row["gallery"]).is_file()
    assert json.loads((tmp_path / "out" / "reconstruct.json").read_text())["loss"] == "pixels"
    with pytest.raises(ConfigError, match="not a diffusers VAE"):
        dinov2 = tmp_path / "dino.yaml"
        dinov2.write_text(config.read_text().replace(str(vae), str(tiny_dinov2_dir)))
        reconstruct_command(str(tiny_dinov2_dir), str(dinov2), lpips_backbone=alexnet_file, out=tmp_path / "x")
