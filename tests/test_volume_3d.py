"""Native 3D encoders: MONAI's ViT takes whole volumes [B, 1, x, y, z] (RAS+), its tokens lie on a 3D grid,
probes (linear and attentive) and the attention report work over them, and resampling makes two scans of one
object give nearly the same features."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from backbone_factories import MONAI_VIT, save_monai_vit
from data_factories import write_nifti
from test_volume_pipeline import blob

from fmprobe.backbones.registry import load_encoder
from fmprobe.config import ModelConfig, parse_config
from fmprobe.data.manifest import load_manifest
from fmprobe.data.transforms import Preprocess
from fmprobe.errors import ConfigError, EncoderError
from fmprobe.experiments.run import run_experiment
from fmprobe.features.extract import extract_features


def test_monai_vit_tokens_and_attention_equal_monais_own(tmp_path):
    from monai.networks.nets import ViT

    section = save_monai_vit(tmp_path / "vit.pt")
    enc = load_encoder(ModelConfig(**section))
    assert enc.input_spec.kind == "volume" and enc.input_spec.volume_size == (16, 16, 8) and enc.num_prefix == 0
    net = ViT(**MONAI_VIT, save_attn=True).eval()
    net.load_state_dict(torch.load(tmp_path / "vit.pt", weights_only=True))
    x = torch.randn(2, 1, 16, 16, 8)
    out = enc.encode(x, [0, -1], attentions=True)
    with torch.no_grad():
        final, hidden = net(x)
    torch.testing.assert_close(out.tokens["-1"], final)
    torch.testing.assert_close(out.tokens["0"], hidden[0])
    assert out.grid["-1"] == (2, 2, 2)  # 16/8, 16/8, 8/4
    torch.testing.assert_close(out.attentions["1"], net.blocks[1].attn.att_mat)
    with pytest.raises(EncoderError, match=r"takes volumes of 1 x \(16, 16, 8\) voxels"):
        enc.encode(torch.randn(1, 1, 16, 16, 9), [-1])
    with pytest.raises(EncoderError, match="in_channels: 1"):
        load_encoder(ModelConfig(**{**section, "args": {**MONAI_VIT, "in_channels": 3}}))
    with pytest.raises(EncoderError, match="kind: monai wraps ViT.*SwinUNETR.*kind: python"):
        load_encoder(ModelConfig(**{**section, "name": "SwinUNETR"}))


def test_slabs_are_padded_or_cropped_in_plane_and_fed_in_ras_order(tmp_path):
    from fmprobe.config import DataConfig

    spec = load_encoder(ModelConfig(**save_monai_vit(tmp_path / "vit.pt"))).input_spec
    data = DataConfig(manifest="m.csv", kind="volume", slice_axis=2, frames_per_clip=8)
    slab = np.random.default_rng(0).random((1, 8, 1, 12, 20)).astype(np.float32)  # [K, z, 1, x, y]
    out = Preprocess(spec, data)(slab)
    assert out.shape == (1, 1, 16, 16, 8)  # [K, 1, x, y, z]
    unit = Preprocess(spec, data).to_unit(slab)[0, :, 0]  # [z, x, y] in [0, 1]
    np.testing.assert_allclose(out[0, 0, 2:14, :, :].numpy(), unit[:, :, 2:18].permute(1, 2, 0).numpy())
    assert torch.all(out[0, 0, :2] == 0)  # 12 -> 16 voxels: two zero planes each side
    with pytest.raises(ConfigError, match="set data.frames_per_clip: 8"):
        Preprocess(spec, DataConfig(manifest="m.csv", kind="volume", frames_per_clip=6))(slab[:, :6])
    with pytest.raises(ConfigError, match="volume_mode: stack"):
        Preprocess(spec, DataConfig(manifest="m.csv", kind="volume", volume_mode="slices"))


def write_volumes(folder, n: int = 24) -> str:
    """NIfTI volumes of one blob at two voxel sizes; the label moves the blob along x."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = i % 2
        spacing = 1.6 if (i // 2) % 2 else 2.0
        vol, affine = blob(int(round(32 / spacing)), spacing, centre=(6.0 * label - 3, 0.0, 0.0))
        vol += np.random.default_rng(i).normal(0, 30, vol.shape).astype(np.float32)
        rows.append({"sample_id": f"v{i:02d}", "path": write_nifti(folder / f"v{i:02d}.nii.gz", vol, affine),
                     "y": label, "group": f"p{i // 2:02d}"})  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return str(folder / "manifest.csv")


def volume_study(tmp_path, **overrides) -> dict:
    return {
        "name": "ct3d",
        "data": {"manifest": write_volumes(tmp_path), "kind": "volume", "split_column": None, "frames_per_clip": 8,
                 "spacing": [2.0, 2.0, 4.0], "intensity": {"modality": "ct", "range": [-1000, 400]}},
        "task": {"type": "binary", "targets": ["y"]},
        "model": save_monai_vit(tmp_path / "vit.pt"),
        "features": {"cache_dir": str(tmp_path / "cache"), "batch_size": 8},
        "heads": [{"type": "linear"}, {"type": "attentive", "pooling": "attentive", "num_heads": 2}],
        "train": {"epochs": 3, "batch_size": 8, "seeds": [0]},
        "split": {"mode": "generate", "fractions": [0.5, 0.25, 0.25]},
        "eval": {"bootstrap": 20},
        "runs_dir": str(tmp_path / "runs"),
        **overrides,
    }


def test_linear_and_attentive_probes_run_on_3d_tokens(tmp_path):
    exp = parse_config(volume_study(tmp_path))
    result = run_experiment(exp, progress=False)
    heads = result.metrics["heads"]
    assert set(heads) == {"linear", "attentive"}
    assert all(np.isfinite(h["splits"]["test"]["mean"]["auroc"]) for h in heads.values())
    features = extract_features(exp, load_manifest(exp.data, exp.task), progress=False)
    assert features.grid("-1") == (2, 2, 2) and np.asarray(features.tokens("-1")).shape[1:] == (8, 32)
    with pytest.raises(ConfigError, match="tokens lie on an \\(x, y, z\\) grid"):
        run_experiment(parse_config(volume_study(tmp_path / "pool", features={"temporal_pool": True})), progress=False)


def test_attention_report_over_the_volume(tmp_path):
    from fmprobe.diagnostics.attention_report import backbone_attention

    result = backbone_attention(parse_config(volume_study(tmp_path)), samples=2, out=tmp_path / "att")
    assert result["blocks"] == ["0", "1"] and result["heads"] == 2
    assert len(result["figures"]) == 3 and all((tmp_path / "att" / f).exists() for f in result["figures"])
    saved = json.loads((tmp_path / "att" / "attention.json").read_text())
    assert 0 < saved["entropy"]["per_block"][0] <= 1


def test_resampled_scans_of_one_object_give_nearly_the_same_features(tmp_path):
    (tmp_path / "v").mkdir()
    rows = []
    for name, spacing, centre in (("fine", 0.8, 0.0), ("coarse", 1.6, 0.0), ("moved", 0.8, 6.0)):
        vol, affine = blob(int(round(32 / spacing)), spacing, centre=(centre, 0.0, 0.0))
        rows.append({"sample_id": name, "path": write_nifti(tmp_path / "v" / f"{name}.nii.gz", vol, affine), "y": 0})
    pd.DataFrame(rows).to_csv(tmp_path / "v" / "m.csv", index=False)
    section = save_monai_vit(tmp_path / "vit.pt", img_size=[32, 32, 32], patch_size=[8, 8, 8])

    def features(spacing: list[float] | None, cache: str) -> np.ndarray:
        data = {"manifest": str(tmp_path / "v" / "m.csv"), "kind": "volume", "group_column": None,
                "split_column": None, "frames_per_clip": 32, "spacing": spacing,
                "intensity": {"modality": "ct", "range": [-1000, 400]}}  # fmt: skip
        exp = parse_config({"name": "s", "data": data, "task": {"type": "binary", "targets": ["y"]}, "model": section,
                            "features": {"cache_dir": str(tmp_path / cache)}})  # fmt: skip
        return np.asarray(extract_features(exp, load_manifest(exp.data, exp.task), progress=False).tokens("-1"))

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(a))

    same = features([1.0, 1.0, 1.0], "c1")
    close = distance(same[0], same[1])  # 0.8 mm vs 1.6 mm scan of one object (measured: ~0.01)
    assert close < 0.03 and distance(same[0], same[2]) > 5 * close  # the object moved by 6 mm (~0.14)
    raw = features(None, "c2")  # 40 vs 20 voxels across 32 mm: different anatomy per token
    assert distance(raw[0], raw[1]) > 5 * close  # (~0.34)


def test_a_unetr_checkpoint_gives_its_encoder_through_drop_keys_and_rename(tmp_path):
    """The README's MONAI line: keep the ``vit.*`` keys of a UNETR checkpoint, strip the prefix."""
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    unetr = UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 16), feature_size=8, hidden_size=32, mlp_dim=64,
                  num_heads=2).eval()  # fmt: skip
    torch.save(unetr.state_dict(), tmp_path / "unetr.pt")
    enc = load_encoder(ModelConfig(kind="monai", name="ViT", weights=str(tmp_path / "unetr.pt"),
                                   drop_keys=[r"^(?!vit\.)"], rename={"vit.": ""},
                                   args={"in_channels": 1, "img_size": [32, 32, 16], "patch_size": 16,
                                         "hidden_size": 32, "mlp_dim": 64, "num_heads": 2}))  # fmt: skip
    assert enc.load_report.dropped and all(not k.startswith("vit.") for k in enc.load_report.dropped)
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(x, [-1]).tokens["-1"], unetr.vit(x)[0])
