"""Native vjepa2 checkpoints load into transformers' VJEPA2Model with identical encoder outputs."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml
from transformers import VJEPA2Config, VJEPA2Model

from fmprobe.backbones.vjepa2_native import load_native_vjepa2
from fmprobe.errors import EncoderError
from fmprobe.standin.models import native_vjepa2_state


def _tiny_hf(hidden: int = 64, heads: int = 2, crop: int = 32, patch: int = 8, tubelet: int = 2, frames: int = 4,
             layers: int = 2, mlp_ratio: float = 4.0) -> VJEPA2Model:  # fmt: skip
    torch.manual_seed(0)
    config = VJEPA2Config(
        hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, crop_size=crop, patch_size=patch,
        tubelet_size=tubelet, frames_per_clip=frames, mlp_ratio=mlp_ratio, pred_hidden_size=32,
        pred_num_attention_heads=2, pred_num_hidden_layers=1,
    )  # fmt: skip
    model = VJEPA2Model(config).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): perturb them so a mis-mapped norm shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _write(path, model: VJEPA2Model, **extra) -> None:
    target = native_vjepa2_state(model)
    encoder = {k: v + 1.0 for k, v in native_vjepa2_state(model, prefix="module.").items()}  # online encoder differs
    checkpoint = {"encoder": encoder, "target_encoder": target, "predictor": {"module.x": torch.zeros(2)},
                  "opt": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]},
                  "scaler": None, "epoch": 7, "loss": 0.5, "batch_size": 4, "world_size": 1, "lr": 1e-3}  # fmt: skip
    checkpoint.update(extra)
    torch.save(checkpoint, path)


def _encode(model: VJEPA2Model, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values_videos=video, skip_predictor=True).last_hidden_state


def test_native_checkpoint_matches_hf_model(tmp_path):
    hf = _tiny_hf()
    path = tmp_path / "latest.pt"
    _write(path, hf)
    loaded = load_native_vjepa2(str(path), crop_size=32, frames_per_clip=4, num_heads=2)
    cfg = loaded.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 2)
    assert (cfg.patch_size, cfg.tubelet_size, cfg.crop_size, cfg.frames_per_clip) == (8, 2, 32, 4)
    video = torch.randn(2, 4, 3, 32, 32)
    out = _encode(loaded, video)
    assert out.shape == (2, 2 * 4 * 4, 64)
    torch.testing.assert_close(out, _encode(hf, video), atol=1e-5, rtol=0)


def test_target_encoder_preferred_and_encoder_fallback(tmp_path):
    hf = _tiny_hf()
    path = tmp_path / "ckpt.pt"
    torch.save({"encoder": native_vjepa2_state(hf, prefix="module.")}, path)  # only the online encoder saved
    loaded = load_native_vjepa2(str(path), crop_size=32, frames_per_clip=4, num_heads=2)
    video = torch.randn(1, 4, 3, 32, 32)
    torch.testing.assert_close(_encode(loaded, video), _encode(hf, video), atol=1e-5, rtol=0)


def test_custom_architecture_and_params_file(tmp_path):
    # other width/depth/patch/tubelet/mlp ratio; heads and sizes read from vjepa2's params-pretrain.yaml
    hf = _tiny_hf(hidden=96, heads=3, crop=48, patch=12, tubelet=1, frames=3, layers=3, mlp_ratio=2.5)
    path = tmp_path / "e10.pt"
    _write(path, hf)
    params = {"data": {"crop_size": 48, "dataset_fpcs": [2, 3]}, "model": {"model_name": "vit_tiny", "use_rope": True}}
    (tmp_path / "params-pretrain.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(EncoderError, match="contradicts .*vit_tiny: 3 heads"):  # the params file records 3 heads
        load_native_vjepa2(str(path), num_heads=5)
    loaded = load_native_vjepa2(str(path), num_heads=3)
    assert (loaded.config.crop_size, loaded.config.frames_per_clip) == (48, 3)
    video = torch.randn(1, 3, 3, 48, 48)
    torch.testing.assert_close(_encode(loaded, video), _encode(hf, video), atol=1e-5, rtol=0)

    # an image encoder (num_frames=1) stores a 2D patch conv [D, C, p, p]: loaded as a tubelet of 1
    image_state = native_vjepa2_state(hf)
    key = "module.backbone.patch_embed.proj.weight"
    image_state[key] = image_state[key][:, :, 0]
    torch.save({"target_encoder": image_state}, path)
    image_model = load_native_vjepa2(str(path), num_heads=3)
    torch.testing.assert_close(_encode(image_model, video), _encode(hf, video), atol=1e-5, rtol=0)


def test_heads_default_to_head_dim_64_with_warning(tmp_path):
    hf = _tiny_hf(hidden=128, heads=2)
    path = tmp_path / "c.pt"
    _write(path, hf)
    with pytest.warns(UserWarning, match="head_dim 64"):
        loaded = load_native_vjepa2(str(path), crop_size=32, frames_per_clip=4)
    assert loaded.config.num_attention_heads == 2
    video = torch.randn(1, 4, 3, 32, 32)
    torch.testing.assert_close(_encode(loaded, video), _encode(hf, video), atol=1e-5, rtol=0)


def test_num_heads_is_checked_against_the_width_of_vjepa2s_factories(tmp_path):
    """Width 768 is ViT-B (12 heads): 16 heads of 48 divide it and would load, computing another function."""
    hf = _tiny_hf(hidden=768, heads=12, crop=16, patch=8, tubelet=2, frames=2, layers=1)
    path = tmp_path / "vitb.pt"
    _write(path, hf)
    with pytest.raises(EncoderError, match=r"native_num_heads 16 does not fit .*width 768 is vjepa2's 12 heads "
                                           r"\(vit_base\).*set native_num_heads to 12"):
        load_native_vjepa2(str(path), crop_size=16, frames_per_clip=2, num_heads=16)
    video = torch.randn(1, 2, 3, 16, 16)
    for given in (12, None):  # given and right, or read from the width (no head_dim guess, so no warning)
        loaded = load_native_vjepa2(str(path), crop_size=16, frames_per_clip=2, num_heads=given)
        assert loaded.config.num_attention_heads == 12
        torch.testing.assert_close(_encode(loaded, video), _encode(hf, video), atol=1e-4, rtol=0)


def test_missing_sizes_are_an_error(tmp_path):
    path = tmp_path / "c.pt"
    _write(path, _tiny_hf())
    with pytest.raises(EncoderError, match="crop_size and frames_per_clip"):
        load_native_vjepa2(str(path), num_heads=2)


def test_missing_and_unknown_keys_are_listed(tmp_path):
    hf = _tiny_hf()
    state = native_vjepa2_state(hf)
    del state["module.backbone.blocks.1.norm2.weight"]
    path = tmp_path / "missing.pt"
    torch.save({"target_encoder": state}, path)
    with pytest.raises(EncoderError, match=r"missing: encoder\.layer\.1\.norm2\.weight"):
        load_native_vjepa2(str(path), crop_size=32, frames_per_clip=4, num_heads=2)

    state = native_vjepa2_state(hf)
    state["module.backbone.blocks.0.mlp.fc3.weight"] = torch.zeros(64, 64)  # SwiGLU MLP
    torch.save({"target_encoder": state}, path)
    with pytest.raises(EncoderError, match="SwiGLU"):
        load_native_vjepa2(str(path), crop_size=32, frames_per_clip=4, num_heads=2)

    state = native_vjepa2_state(hf)
    state["module.backbone.blocks.0.ls1.gamma"] = torch.zeros(64)
    torch.save({"target_encoder": state}, path)
    with pytest.raises(EncoderError, match=r"no V-JEPA 2 counterpart: blocks\.0\.ls1\.gamma"):
        load_native_vjepa2(str(path), crop_size=32, frames_per_clip=4, num_heads=2)


def test_wrong_files(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        load_native_vjepa2(str(tmp_path / "nope.pt"), crop_size=32, frames_per_clip=4)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(EncoderError, match="not a readable PyTorch checkpoint"):
        load_native_vjepa2(str(text), crop_size=32, frames_per_clip=4)
    other = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "epoch": 1}, other)
    with pytest.raises(EncoderError, match=r"expected one of \['target_encoder', 'encoder'\].*has keys epoch, model"):
        load_native_vjepa2(str(other), crop_size=32, frames_per_clip=4)
    pickled = tmp_path / "pickled.pt"
    torch.save({"target_encoder": {}, "args": argparse.Namespace(lr=1)}, pickled)
    with pytest.raises(EncoderError, match="pickled Python objects"):
        load_native_vjepa2(str(pickled), crop_size=32, frames_per_clip=4)


def test_checkpoint_and_params_stream_from_an_object_store():
    """gs:// / s3:// checkpoints (here fsspec's memory://) load like local ones, params-pretrain.yaml beside them."""
    import uuid

    import fsspec

    hf = _tiny_hf(hidden=96, heads=3, crop=48, patch=12, tubelet=1, frames=3, layers=1)
    bucket = f"memory://ckpt-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    with fs.open(f"{bucket}/run/best.pt", "wb") as f:
        torch.save({"target_encoder": native_vjepa2_state(hf)}, f)
    params = {"data": {"crop_size": 48, "dataset_fpcs": [3]}, "model": {"model_name": "vit_tiny", "use_rope": True}}
    fs.pipe_file(f"{bucket}/run/params-pretrain.yaml", yaml.safe_dump(params).encode())
    try:
        loaded = load_native_vjepa2(f"{bucket}/run/best.pt")  # sizes and heads from the params file in the bucket
        assert (loaded.config.crop_size, loaded.config.num_attention_heads) == (48, 3)
        video = torch.randn(1, 3, 3, 48, 48)
        torch.testing.assert_close(_encode(loaded, video), _encode(hf, video), atol=1e-5, rtol=0)
        with pytest.raises(EncoderError, match="does not exist"):
            load_native_vjepa2(f"{bucket}/run/other.pt")
    finally:
        fs.rm(bucket, recursive=True)
