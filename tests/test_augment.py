"""Training augmentation that respects anatomy: explicit in the config, resolved per data kind and recorded in the
resolved config; no flips for volumes or declared laterality, at training or test time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from fmprobe.backbones.base import InputSpec
from fmprobe.config import DataConfig, dump_config, parse_config
from fmprobe.data.transforms import Preprocess
from fmprobe.errors import ConfigError

IMAGE = InputSpec(kind="image", image_size=(16, 16), mean=(0.0,) * 3, std=(1.0,) * 3)


def config(data: dict | None = None, adapt: dict | None = None) -> dict:
    return {"name": "t", "data": {"manifest": "m.csv", **(data or {})}, "task": {"type": "binary", "targets": ["y"]},
            "adapt": adapt or {"strategy": "lora"}}  # fmt: skip


def test_defaults_resolve_per_data_kind_and_laterality():
    assert DataConfig(manifest="m").augment.model_dump() == {"crop_scale": 1.14, "hflip": True}
    assert DataConfig(manifest="m", kind="volume").augment.model_dump() == {"crop_scale": 1.0, "hflip": False}
    assert DataConfig(manifest="m", laterality=True).augment.hflip is False
    assert DataConfig(manifest="m", kind="volume", augment={"hflip": True}).augment.hflip is True  # explicit
    with pytest.raises(ValueError, match="laterality: true says they carry meaning"):
        DataConfig(manifest="m", laterality=True, augment={"hflip": True})


def test_resolved_augmentation_is_recorded_and_reloads():
    exp = parse_config(config({"kind": "volume", "laterality": True}))
    dumped = yaml.safe_load(dump_config(exp))
    assert dumped["data"]["augment"] == {"crop_scale": 1.0, "hflip": False} and dumped["data"]["laterality"] is True
    assert parse_config(dumped).data.augment == exp.data.augment


def test_options_that_cannot_be_honoured_are_refused():
    with pytest.raises(ConfigError, match="data.augment .* applies to end-to-end training"):
        parse_config(config({"augment": {"hflip": False}}, adapt={"strategy": "frozen"}))
    parse_config(config(adapt={"strategy": "frozen"}))  # the resolved defaults alone are fine
    with pytest.raises(ConfigError, match="tta.hflip averages over mirrored inputs"):
        parse_config(config({"laterality": True}, adapt={"strategy": "lora", "tta": {"hflip": True}}))


def flips(data: DataConfig, draws: int = 40) -> int:
    """How many of ``draws`` training draws mirror a left-right asymmetric image."""
    x = np.zeros((1, 1, 1, 16, 16), np.uint8)
    x[..., :4] = 255  # a bright left edge
    pre = Preprocess(IMAGE, data, train=True)
    outs = [pre(x, torch.Generator().manual_seed(i))[0, 0, 0] for i in range(draws)]
    return sum(bool(o[:, -1].mean() > o[:, 0].mean()) for o in outs)


def test_training_draws_follow_the_config():
    assert 5 < flips(DataConfig(manifest="m")) < 35  # about half
    assert flips(DataConfig(manifest="m", laterality=True)) == 0
    assert flips(DataConfig(manifest="m", augment={"hflip": False})) == 0
    square = np.random.default_rng(0).integers(0, 256, (1, 1, 3, 16, 16), dtype=np.uint8)
    plain = DataConfig(manifest="m", augment={"crop_scale": 1.0, "hflip": False})
    train = Preprocess(IMAGE, plain, train=True)(square, torch.Generator().manual_seed(0))
    assert torch.equal(train, Preprocess(IMAGE, plain)(square))  # no scale jitter: nothing left to draw


def test_preprocessing_refuses_intensities_or_scales_the_encoder_cannot_take():
    mr = DataConfig(manifest="m", kind="volume", volume_mode="slices", intensity={"modality": "mr"})
    with pytest.raises(ConfigError, match="scale: zscore .* set data.intensity.scale: unit"):
        Preprocess(IMAGE, mr)
    volume = InputSpec.volume((8, 8, 8))
    with pytest.raises(ConfigError, match="crop_scale: 1"):
        Preprocess(volume, DataConfig(manifest="m", kind="volume", augment={"crop_scale": 1.2}))
