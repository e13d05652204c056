"""Preprocess (intensity, channels, resize/crop, normalisation) and MediaDataset / collate_samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_factories import CT_SMALL, write_image
from torch.utils.data import DataLoader

from fmprobe.backbones.base import InputSpec
from fmprobe.config import DataConfig, WindowConfig
from fmprobe.data.dataset import MediaDataset, collate_samples
from fmprobe.data.readers import read_media
from fmprobe.data.transforms import Preprocess
from fmprobe.errors import ReaderError

SPEC = InputSpec(kind="image", image_size=(16, 16), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
UNIT = InputSpec(kind="image", image_size=(16, 16), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def data(**kw) -> DataConfig:
    return DataConfig(manifest="m.csv", **kw)


def test_uint8_scaled_and_normalised_per_channel():
    x = np.full((2, 3, 3, 20, 20), 255, dtype=np.uint8)
    out = Preprocess(SPEC, data(), train=False)(x)
    assert out.shape == (2, 3, 3, 16, 16) and out.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(out[:, :, c], torch.tensor((1 - SPEC.mean[c]) / SPEC.std[c]))


def test_grayscale_becomes_three_equal_channels():
    x = np.random.default_rng(0).integers(0, 256, (1, 1, 1, 32, 32), dtype=np.uint8)
    out = Preprocess(UNIT, data(), train=False)(x)
    assert out.shape == (1, 1, 3, 16, 16)
    assert torch.equal(out[:, :, 0], out[:, :, 1]) and torch.equal(out[:, :, 0], out[:, :, 2])


def test_window_clips_and_scales_ct():
    ct = read_media(CT_SMALL, data(), sample_id="ct")  # float32 HU
    window = WindowConfig(center=40, width=400)
    out = Preprocess(UNIT, data(window=window), train=False)(ct)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    x = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], dtype=np.float32).reshape(1, 1, 1, 1, 5)
    unit = Preprocess(UNIT, data(window=window)).to_unit(x).flatten().tolist()
    assert unit == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_robust_min_max_ignores_outliers():
    x = np.linspace(0, 100, 10_000, dtype=np.float32)
    x[0], x[-1] = -1e6, 1e6
    unit = Preprocess(UNIT, data()).to_unit(x.reshape(1, 1, 1, 100, 100))
    lo, hi = np.percentile(x, [0.5, 99.5])
    assert float(unit.flatten()[5000]) == pytest.approx((x[5000] - lo) / (hi - lo), abs=1e-5)
    assert float(unit.min()) == 0.0 and float(unit.max()) == 1.0
    assert torch.count_nonzero(Preprocess(UNIT, data()).to_unit(np.full((1, 1, 1, 4, 4), 7.0, np.float32))) == 0


def test_non_finite_float_input_refused():
    x = np.zeros((1, 1, 1, 4, 4), np.float32)
    x[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(Exception, match="NaN or infinite"):
        Preprocess(UNIT, data())(x)


def test_shorter_side_resized_then_center_crop():
    # 32 x 64 image, middle half of the columns white: after resizing to 16 x 32 the center crop
    # (columns 8..24) is exactly the white band
    x = np.zeros((1, 1, 1, 32, 64), dtype=np.uint8)
    x[..., 16:48] = 255
    out = Preprocess(UNIT, data(), train=False)(x)[0, 0, 0]
    assert out.shape == (16, 16)
    assert torch.all(out[:, 2:-2] > 0.99)
    assert float(out.mean()) > 0.9


def test_eval_deterministic_and_mirror_equivariant():
    x = np.random.default_rng(1).integers(0, 256, (2, 4, 3, 30, 45), dtype=np.uint8)
    pre = Preprocess(SPEC, data(), train=False)
    a, b = pre(x), pre(x, torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    flipped = pre(np.ascontiguousarray(x[..., ::-1]))
    assert torch.allclose(flipped, a.flip(-1), atol=1e-5)


def test_train_random_crop_seeded_same_for_all_frames():
    x = np.random.default_rng(2).integers(0, 256, (1, 3, 1, 40, 40), dtype=np.uint8)
    x[:, 1:] = x[:, :1]  # identical frames must stay identical after the crop and flip
    pre = Preprocess(UNIT, data(), train=True)
    a = pre(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, pre(x, torch.Generator().manual_seed(7)))
    assert torch.equal(a[0, 0], a[0, 1]) and torch.equal(a[0, 0], a[0, 2])
    outs = [pre(x, torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert a.shape == (1, 3, 3, 16, 16)


def test_bad_channel_count_refused():
    with pytest.raises(Exception, match="C = 1 or 3"):
        Preprocess(UNIT, data())(np.zeros((1, 1, 4, 8, 8), np.uint8))


# --- dataset ------------------------------------------------------------------------------------


@pytest.fixture
def samples(tmp_path):
    import pandas as pd

    good = [write_image(tmp_path / f"g{i}.png", np.full((20, 24, 3), 40 * i, dtype=np.uint8)) for i in range(3)]
    (tmp_path / "bad.png").write_bytes(b"")
    paths = [good[0], str(tmp_path / "bad.png"), good[1], good[2]]
    return pd.DataFrame({"sample_id": ["a", "broken", "b", "c"], "path": paths})


def test_dataset_reports_bad_sample_instead_of_raising(samples):
    ds = MediaDataset(samples, data(), Preprocess(SPEC, data()))
    assert len(ds) == 4
    bad = ds[1]
    assert bad["pixels"].numel() == 0 and bad["index"] == 1 and bad["sample_id"] == "broken"
    assert "sample 'broken'" in bad["error"] and "bad.png" in bad["error"] and "empty" in bad["error"]
    good = ds[2]
    assert good["error"] is None and good["pixels"].shape == (1, 1, 3, 16, 16)
    batch = collate_samples([ds[i] for i in range(4)])
    assert batch["index"].tolist() == [0, 2, 3] and batch["sample_id"] == ["a", "b", "c"]
    assert batch["pixels"].shape == (3, 1, 1, 3, 16, 16)
    assert [(i, s) for i, s, _ in batch["errors"]] == [(1, "broken")]
    only_bad = collate_samples([ds[1]])
    assert only_bad["pixels"] is None and len(only_bad["errors"]) == 1


def test_transform_error_names_the_sample(tmp_path):
    import pandas as pd

    np.save(tmp_path / "v.npy", np.full((4, 4, 4), np.inf, dtype=np.float32))
    cfg = data(kind="volume", frames_per_clip=2)
    ds = MediaDataset(pd.DataFrame({"sample_id": ["v"], "path": [str(tmp_path / "v.npy")]}), cfg, Preprocess(UNIT, cfg))
    assert ds[0]["error"].startswith("sample 'v', file '") and "NaN or infinite" in ds[0]["error"]


def test_dataset_with_workers_matches_in_process(samples):
    cfg = data()
    ds = MediaDataset(samples, cfg, Preprocess(SPEC, cfg, train=True), seed=3)
    loaded = list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_samples))
    direct = collate_samples([ds[i] for i in range(4)])
    assert torch.equal(torch.cat([b["pixels"] for b in loaded]), direct["pixels"])
    assert [e for b in loaded for e in b["errors"]] == direct["errors"]
    other_seed = MediaDataset(samples, cfg, Preprocess(SPEC, cfg, train=True), seed=4)
    assert any(not torch.equal(ds[i]["pixels"], other_seed[i]["pixels"]) for i in (0, 2, 3))


def test_window_on_8bit_images_is_refused_not_ignored():
    window = WindowConfig(center=40, width=400)
    with pytest.raises(ReaderError, match="data.window applies to raw intensities"):
        Preprocess(UNIT, data(window=window)).to_unit(np.zeros((1, 1, 1, 4, 4), dtype=np.uint8))
