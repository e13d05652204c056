"""Mixup / CutMix label arithmetic, the class-balanced sampler, and what test-time augmentation averages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmprobe.adapt.mixup import Mix, apply_mix, draw_mix, soft_targets
from fmprobe.train.sampling import balanced_weights, epoch_order
from fmprobe.adapt.tta import tta_scores
from fmprobe.config import MixConfig, TTAConfig
from fmprobe.errors import ConfigError


def constant_batch(b=4, k=2, t=3, size=8):
    """Sample i is filled with the value i everywhere: any pixel tells which samples it came from."""
    return torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1, 1).expand(b, k, t, 3, size, size).clone()


def test_mixup_mixes_pixels_and_multilabel_labels_by_the_same_weight():
    pixels = constant_batch()
    y = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.float32)
    mix = Mix("mixup", 0.3, torch.tensor([1, 2, 3, 0]))
    out, y_mix = apply_mix(mix, pixels, y)
    expected = 0.3 * torch.arange(4.0) + 0.7 * torch.tensor([1.0, 2, 3, 0])
    torch.testing.assert_close(out[:, 0, 0, 0, 0, 0], expected)
    torch.testing.assert_close(y_mix[0], torch.tensor([0.3, 0.0, 1.0]))  # 0.3*[1,0,1] + 0.7*[0,0,1]
    torch.testing.assert_close(y_mix[2], torch.tensor([0.3, 1.0, 0.0]))  # 0.3*[1,1,0] + 0.7*[0,1,0]


def test_multiclass_labels_mix_as_one_hot_rows_and_sum_to_one():
    y = soft_targets(torch.tensor([0, 2, 1, 2]), "multiclass", 3)
    _, y_mix = apply_mix(Mix("mixup", 0.25, torch.tensor([1, 0, 3, 2])), constant_batch(), y)
    torch.testing.assert_close(y_mix[0], torch.tensor([0.25, 0.0, 0.75]))
    torch.testing.assert_close(y_mix.sum(1), torch.ones(4))


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_label_weight_is_the_pasted_area_in_every_frame_and_clip(seed):
    pixels = constant_batch(size=16)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mix = draw_mix(MixConfig(cutmix_alpha=1.0), 4, (16, 16), np.random.default_rng(seed))
    assert mix.kind == "cutmix"
    out, y_mix = apply_mix(mix, pixels, y)
    for i in range(4):
        own = (out[i] == i).float().mean(dim=(-1, -2, -3))  # share of sample i's own pixels, per clip and frame
        assert torch.allclose(own, torch.full_like(own, mix.lam)) or int(mix.perm[i]) == i
        partner = int(mix.perm[i])
        assert y_mix[i] == pytest.approx(mix.lam * float(y[i]) + (1 - mix.lam) * float(y[partner]))


def test_mixing_probability_and_switch():
    rng = np.random.default_rng(0)
    kinds = [draw_mix(MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.5), 8, (8, 8), rng).kind for _ in range(400)]
    counts = {k: kinds.count(k) for k in ("none", "mixup", "cutmix")}
    assert 150 < counts["none"] < 250 and 70 < counts["mixup"] < 130 and 70 < counts["cutmix"] < 130
    assert draw_mix(MixConfig(), 8, (8, 8), rng).kind == "none"


def test_balanced_sampler_draws_classes_equally():
    y = np.array([0] * 90 + [1] * 10)
    draws = epoch_order(100, torch.Generator().manual_seed(0), balanced_weights(y, "binary"))
    counts = np.bincount(y[draws.numpy()], minlength=2)
    assert len(draws) == 100 and 35 < counts[1] < 65
    w = balanced_weights(np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 0]]), "multilabel")
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3, 1.0, 1.0])
    with pytest.raises(ConfigError, match="regression"):
        balanced_weights(np.zeros((3, 1)), "regression")


def test_tta_averages_scores_over_flips_and_clips_not_logits():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 4, 3, 8, 8)
    weight = torch.randn(3 * 8 * 8)

    def model(x):  # an asymmetric function of the input, so a flip changes the output
        return (x.mean(dim=(1, 2)).flatten(1) @ weight).unsqueeze(1) * 5

    def probs(z):
        return torch.sigmoid(z[:, 0])

    plain = tta_scores(model, pixels, TTAConfig(), probs)
    torch.testing.assert_close(plain, probs(model(pixels)))
    flips = tta_scores(model, pixels, TTAConfig(hflip=True), probs)
    torch.testing.assert_close(flips, (probs(model(pixels)) + probs(model(pixels.flip(-1)))) / 2)
    assert not torch.allclose(flips, torch.sigmoid((model(pixels) + model(pixels.flip(-1)))[:, 0] / 2))
    clips = tta_scores(model, pixels, TTAConfig(hflip=True, clips=3), probs)
    views = [probs(model(v)) for i in range(3) for v in (pixels[:, i : i + 1], pixels[:, i : i + 1].flip(-1))]
    torch.testing.assert_close(clips, torch.stack(views).mean(0))
