"""Qwen2.5-VL vision encoder: input layout, raster order of window-permuted tokens, merger, LM layers, attentions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, ViTConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

from fmprobe.backbones.qwen2_5_vl import QwenVisionEncoder
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

WINDOW = 4  # window_size 56 / patch 14: attention windows of 4 x 4 patches (2 x 2 merge units)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, window_size=56,
            fullatt_block_indexes=[2], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        text_config=dict(
            vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 4, 4], "rope_theta": 10000.0},
        ),
        image_token_id=900, video_token_id=901, vision_start_token_id=902, vision_end_token_id=903,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("qwen")
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    return path


def _encoder(path, layers=(-1,), image_size=140) -> QwenVisionEncoder:
    cfg = ModelConfig(name="tiny-qwen", kind="qwen2_5_vl", layers=list(layers), image_size=image_size)
    return QwenVisionEncoder(str(path), cfg)


@pytest.fixture(scope="module")
def encoder(qwen_dir):
    return _encoder(qwen_dir, layers=[0, -1, "visual.merger", "visual.patch_embed"])


def test_spec_and_vision_only_loading(encoder):
    spec = encoder.input_spec
    assert spec.kind == "image" and spec.image_size == (140, 140) and spec.patch_size == 14
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # Qwen's processor defaults
    assert encoder.vlm is None  # the language model is not read when no LM layer is asked for
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in encoder.visual.parameters())


def test_patchify_matches_qwen_image_processor(encoder):
    image = torch.randn(2, 3, 140, 140)
    processor = Qwen2VLImageProcessorPil()
    expected = np.concatenate([processor.patchify(img.numpy(), 14, 2, 2)[0] for img in image])
    np.testing.assert_allclose(encoder.patchify(image).numpy(), expected, rtol=0, atol=0)


def test_window_permuted_tokens_come_back_in_raster_order(encoder):
    """Change one patch: after a window-attention block exactly its 4x4-patch window changes, at raster positions."""
    grid = 10  # 140 / 14: windows of 4, 4 and 2 patches per side (the last ones padded in Qwen's window index)
    for row, col in [(0, 0), (5, 2), (9, 9), (3, 8)]:
        image = torch.randn(1, 3, 140, 140)
        changed = image.clone()
        changed[..., row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14] += 1.0
        out = encoder.encode(torch.cat([image, changed]), [0, "visual.patch_embed"])
        assert out.grid["0"] == (1, grid, grid) and out.tokens["0"].shape == (2, grid * grid, 32)
        assert out.prefix["0"].shape == (2, 0, 32)

        diff = (out.tokens["visual.patch_embed"][0] - out.tokens["visual.patch_embed"][1]).abs().amax(-1)
        expected = torch.zeros(grid, grid, dtype=torch.bool)
        expected[row, col] = True
        assert torch.equal(diff.reshape(grid, grid) > 1e-6, expected)

        diff = (out.tokens["0"][0] - out.tokens["0"][1]).abs().amax(-1).reshape(grid, grid)
        expected = torch.zeros(grid, grid, dtype=torch.bool)
        r0, c0 = row // WINDOW * WINDOW, col // WINDOW * WINDOW
        expected[r0 : r0 + WINDOW, c0 : c0 + WINDOW] = True
        assert torch.equal(diff > 1e-6, expected), (row, col)


def test_merger_tokens_match_hf_and_the_raster_block_output(encoder):
    image = torch.randn(2, 3, 140, 140)
    out = encoder.encode(image, [-1, "visual.merger"])
    merged = out.tokens["visual.merger"]
    assert merged.shape == (2, 25, 48) and out.grid["visual.merger"] == (1, 5, 5)

    grid_thw = torch.tensor([[1, 10, 10]] * 2)
    with torch.no_grad():
        pooled = encoder.visual(encoder.patchify(image), grid_thw=grid_thw).pooler_output  # HF un-permutes this itself
    torch.testing.assert_close(merged, pooled.reshape(2, 25, 48))

    # the merger applied to our raster tokens, grouped into 2x2 units by position, gives the same result
    last = out.tokens["-1"].reshape(2, 5, 2, 5, 2, 32).permute(0, 1, 3, 2, 4, 5).reshape(-1, 32)
    with torch.no_grad():
        recomputed = encoder.visual.merger(last)
    torch.testing.assert_close(recomputed.reshape(2, 25, 48), merged, atol=1e-5, rtol=1e-5)


def test_attention_probabilities(encoder):
    image = torch.randn(2, 3, 140, 140)
    seen = {}
    hook = encoder.visual.blocks[0].attn.register_forward_hook(
        lambda module, args, output: seen.update(x=args[0], y=output)
    )
    try:
        out = encoder.encode(image, [0, -1], attentions=True)
    finally:
        hook.remove()
    window, full = out.attentions["0"], out.attentions["-1"]
    assert window.shape == full.shape == (2, 2, 100, 100)
    torch.testing.assert_close(window.sum(-1), torch.ones(2, 2, 100))
    assert bool((full > 0).all())  # block 2 attends globally

    rows, cols = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    window_id = (rows // WINDOW * 10 + cols // WINDOW).flatten()
    same_window = window_id[:, None] == window_id[None, :]
    assert bool((window[..., ~same_window] == 0).all()) and bool((window[..., same_window] > 0).all())

    # the probabilities reproduce the attention module's output: proj(P @ V)
    attn = encoder.visual.blocks[0].attn
    unwindow = torch.argsort(_window_index(2))
    x = encoder._to_raster(seen["x"], unwindow, (2, 10, 10), windowed=True)
    y = encoder._to_raster(seen["y"], unwindow, (2, 10, 10), windowed=True)
    with torch.no_grad():
        v = attn.qkv(x).reshape(2, 100, 3, 2, 16)[:, :, 2].transpose(1, 2)  # [B, heads, N, head_dim]
        rebuilt = attn.proj((window @ v).transpose(1, 2).reshape(2, 100, 32))
    torch.testing.assert_close(rebuilt, y, atol=1e-5, rtol=1e-4)


def _window_index(batch):
    grid_thw = torch.tensor([[1, 10, 10]] * batch)
    return get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=56, patch_size=14)[0]


def test_language_model_layers(qwen_dir):
    layer = "model.language_model.layers.0"
    enc = _encoder(qwen_dir, layers=[layer, "visual.merger"], image_size=112)
    image = torch.randn(2, 3, 112, 112)
    out = enc.encode(image, [layer, "visual.merger"])
    assert out.tokens[layer].shape == (2, 16, 48) and out.grid[layer] == (1, 4, 4)

    ids = torch.tensor([[902] + [900] * 16 + [903]] * 2)
    with torch.no_grad():
        hf = enc.vlm(
            input_ids=ids, mm_token_type_ids=(ids == 900).int(), pixel_values=enc.patchify(image),
            image_grid_thw=torch.tensor([[1, 8, 8]] * 2), output_hidden_states=True, use_cache=False,
        )  # fmt: skip
    torch.testing.assert_close(out.tokens[layer], hf.hidden_states[1][:, 1:-1])
    # the vision tokens of the full model agree with a vision-only load
    alone = _encoder(qwen_dir, layers=["visual.merger"], image_size=112).encode(image, ["visual.merger"])
    torch.testing.assert_close(alone.tokens["visual.merger"], out.tokens["visual.merger"])


def test_preprocessor_config_sets_normalisation(tmp_path, qwen_dir):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(qwen_dir / name)
    norm = {"image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(norm))
    enc = _encoder(tmp_path, image_size=112)
    assert enc.input_spec.mean == (0.5, 0.5, 0.5) and enc.input_spec.std == (0.25, 0.25, 0.25)
    assert enc.fingerprint() != _encoder(qwen_dir, image_size=112).fingerprint()
    assert _encoder(qwen_dir, image_size=112).fingerprint() == _encoder(qwen_dir, image_size=112).fingerprint()


def test_errors(tmp_path, qwen_dir, encoder):
    with pytest.raises(EncoderError, match="multiple of patch x merge = 28; set model.image_size to 140 or 168"):
        _encoder(qwen_dir, image_size=150)
    with pytest.raises(EncoderError, match="block index 3 is out of range; the vision tower has 3 blocks"):
        _encoder(qwen_dir, layers=[3])
    with pytest.raises(EncoderError, match="no module 'visual.mergr'"):
        _encoder(qwen_dir, layers=["visual.mergr"])
    with pytest.raises(EncoderError, match="not a block index"):
        encoder.encode(torch.randn(1, 3, 140, 140), ["encoder.layer.1"])
    with pytest.raises(EncoderError, match="list it in model.layers"):
        encoder.encode(torch.randn(1, 3, 140, 140), ["model.language_model.layers.0"])
    with pytest.raises(EncoderError, match="configured for 140x140"):
        encoder.encode(torch.randn(1, 3, 112, 112), [-1])
    with pytest.raises(EncoderError, match="not a readable Qwen2.5-VL checkpoint"):
        QwenVisionEncoder(str(qwen_dir / "nowhere"), ModelConfig(name="x"))
    other = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(other)
    with pytest.raises(EncoderError, match="is a 'vit' model, not Qwen2.5-VL"):
        QwenVisionEncoder(str(other), ModelConfig(name="x"))
