"""kind: open_clip: a random ViT-B-16 saved to disk, loaded strictly by open_clip through the config; the image
tower's tokens and image embedding equal its own forward, and a probe run reads both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fmprobe.backbones.registry import load_encoder
from fmprobe.config import ModelConfig, parse_config
from fmprobe.errors import EncoderError
from fmprobe.experiments.run import run_experiment


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """open_clip ViT-B-16 at random initialisation (no download: pretrained=None), its weights saved to disk."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    path = tmp_path_factory.mktemp("open-clip") / "ViT-B-16.pt"
    torch.save(clip.state_dict(), path)
    return path, clip.visual


def test_image_tower_tokens_and_embedding_equal_open_clips_forward(vit_b16):
    path, visual = vit_b16
    enc = load_encoder(ModelConfig(kind="open_clip", name="ViT-B-16", weights=str(path)))
    spec = enc.input_spec
    assert spec.image_size == (224, 224) and spec.patch_size == 16
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # OpenAI CLIP preprocessing
    assert enc.num_points == 12 and enc.load_report.loaded == len(torch.load(path, weights_only=True))
    x = torch.randn(1, 3, 224, 224)
    out = enc.encode(x, [3, -1, "pooled"])
    visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = visual(x)
        embedded = visual.ln_pre(visual.patch_dropout(_embed(visual, x)))
        for block in visual.transformer.resblocks[:4]:
            embedded = block(embedded)
    torch.testing.assert_close(out.tokens["-1"], tokens)
    torch.testing.assert_close(out.tokens["pooled"][:, 0], pooled)
    torch.testing.assert_close(out.tokens["3"], embedded[:, 1:])
    torch.testing.assert_close(out.prefix["3"], embedded[:, :1])
    assert out.grid == {"3": (1, 14, 14), "-1": (1, 14, 14), "pooled": (1, 1, 1)}
    assert out.tokens["pooled"].shape == (1, 1, 512) and out.prefix["-1"].shape == (1, 1, 768)
    with pytest.raises(EncoderError, match="does not expose attention maps"):
        enc.encode(x, [-1], attentions=True)


def _embed(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's patch embedding + class token + positions, written out as its VisionTransformer does."""
    patches = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    return torch.cat([cls, patches], dim=1) + visual.positional_embedding


def test_config_refuses_a_random_tower_and_key_adjustments_open_clip_would_not_honour():
    with pytest.raises(ValueError, match="open_clip 'ViT-B-16' needs weights"):
        ModelConfig(kind="open_clip", name="ViT-B-16")
    with pytest.raises(ValueError, match="open_clip loads its checkpoints itself, strictly"):
        ModelConfig(kind="open_clip", name="ViT-B-16", weights="w.pt", drop_keys=["^text"])


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_is_refused_by_open_clip(vit_b16):
    path, _ = vit_b16
    with pytest.raises(EncoderError, match="open_clip cannot build and load 'ViT-B-32'"):
        load_encoder(ModelConfig(kind="open_clip", name="ViT-B-32", weights=str(path)))


@pytest.mark.slow
def test_probe_run_on_open_clip_tokens_and_embedding(vit_b16, toy_study):
    path, _ = vit_b16
    exp = parse_config(toy_study(
        "binary", n=40, model={"kind": "open_clip", "name": "ViT-B-16", "weights": str(path), "layers": [-1, "pooled"]},
        heads=[{"type": "linear", "pooling": "cls+mean"}, {"type": "linear", "name": "embedding", "layer": "pooled"}],
        train={"epochs": 2, "seeds": [0]}, eval={"bootstrap": 20}))  # fmt: skip
    heads = run_experiment(exp, progress=False).metrics["heads"]
    assert set(heads) == {"linear", "embedding"}
    assert all(np.isfinite(h["splits"]["test"]["mean"]["auroc"]) for h in heads.values())
