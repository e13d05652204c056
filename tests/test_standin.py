"""Stand-in models load through the real loaders; stand-in YAML copies replace ids and set keys."""

from __future__ import annotations

import torch
import yaml

from fmprobe.backbones.registry import load_encoder
from fmprobe.config import ModelConfig
from fmprobe.standin import models
from fmprobe.standin.configs import standin_yaml


def test_each_family_loads_through_the_registry(tmp_path):
    dirs = {
        "dinov2": models.dinov2(tmp_path / "dinov2"),
        "vjepa2": models.vjepa2(tmp_path / "vjepa2"),
        "videomae": models.videomae(tmp_path / "videomae"),
        "clip": models.clip(tmp_path / "clip"),
        "blip2": models.blip2(tmp_path / "blip2"),
    }
    for family, folder in dirs.items():
        enc = load_encoder(ModelConfig(name=str(folder)))
        size = enc.input_spec.image_size
        shape = (1, 3, *size) if enc.input_spec.kind == "image" else (1, enc.input_spec.num_frames, 3, *size)
        out = enc.encode(torch.randn(shape), layers=[-1])
        assert next(iter(out.tokens.values())).shape[-1] == 32, family


def test_native_checkpoint_equals_the_hf_model_it_came_from(tmp_path):
    path = models.native_vjepa2(tmp_path / "ckpt" / "vitl.pt", seed=3)
    enc = load_encoder(ModelConfig(kind="vjepa2-native", checkpoint=str(path), native_frames=4,
                                   native_num_heads=2, image_size=32))  # fmt: skip
    reference = models.vjepa2_model(seed=3).eval()
    video = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        want = reference(pixel_values_videos=video, skip_predictor=True).last_hidden_state
    got = enc.encode(video, layers=[-1])
    assert torch.allclose(next(iter(got.tokens.values())).reshape(want.shape), want, atol=1e-5)


def test_standin_yaml_replaces_ids_everywhere_and_sets_keys(tmp_path):
    src = tmp_path / "sweep.yaml"
    src.write_text(yaml.safe_dump({"base": "config.yaml", "grid": {"model.name": ["org/big-a", "org/big-b"],
                                                                    "train.lr": [0.1]}}))  # fmt: skip
    dst = standin_yaml(src, tmp_path / "out" / "sweep.yaml", replace={"org/big-a": "/tiny/a"},
                       set={("grid", "train.lr"): [0.01, 0.02], "workers": 1})  # fmt: skip
    data = yaml.safe_load(dst.read_text())
    assert data["grid"]["model.name"] == ["/tiny/a", "org/big-b"]
    assert data["grid"]["train.lr"] == [0.01, 0.02] and data["workers"] == 1
