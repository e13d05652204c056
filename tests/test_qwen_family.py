"""Qwen2-VL and Qwen3-VL through the Qwen encoder (no attention windows; Qwen3-VL: patch 16, learned positions,
deepstack mergers): raster order of patch tokens, merged tokens equal to the models' own mergers, LM tokens at the
image positions, LoRA presets on the fused qkv."""

from __future__ import annotations

import pytest
import torch

from fmprobe.adapt.lora import lora_targets
from fmprobe.backbones.registry import load_encoder
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError
from fmprobe.standin import models

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAMILIES = {"qwen2_vl": (models.qwen2_vl, 14), "qwen3_vl": (models.qwen3_vl, 16)}  # builder, patch size


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    write, patch = FAMILIES[request.param]
    return request.param, write(tmp_path_factory.mktemp(request.param)), patch


def _encoder(path, patch, layers):
    return load_encoder(ModelConfig(name=str(path), layers=list(layers), image_size=8 * patch))


def _group_2x2(tokens, side):
    """Raster tokens [B, side*side, D] -> the 2x2 merge units in raster order of units, rows of 4 [B*(side/2)^2*4, D]."""
    b, _, d = tokens.shape
    return tokens.reshape(b, side // 2, 2, side // 2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, d)


def test_patches_come_back_in_raster_order_and_merge_like_the_model(family):
    kind, path, patch = family
    enc = _encoder(path, patch, [-1, "visual.merger", "visual.patch_embed"])
    size = 8 * patch
    for row, col in [(0, 0), (3, 6), (7, 1)]:
        image = torch.randn(1, 3, size, size)
        changed = image.clone()
        changed[..., row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] += 1.0
        out = enc.encode(torch.cat([image, changed]), ["visual.patch_embed"])
        diff = (out.tokens["visual.patch_embed"][0] - out.tokens["visual.patch_embed"][1]).abs().amax(-1)
        assert diff.reshape(8, 8).nonzero().tolist() == [[row, col]], kind
    pixels = torch.randn(2, 3, size, size)
    out = enc.encode(pixels, [-1, "visual.merger"])
    assert out.grid["visual.merger"] == (1, 4, 4) and out.grid["-1"] == (1, 8, 8)
    with torch.no_grad():
        own = enc.visual(enc.patchify(pixels), grid_thw=torch.tensor([[1, 8, 8]] * 2)).pooler_output
        regrouped = enc.visual.merger(_group_2x2(out.tokens["-1"], 8))  # the merger on our raster tokens, by position
    torch.testing.assert_close(out.tokens["visual.merger"], own.reshape(2, 16, -1))
    torch.testing.assert_close(regrouped.reshape(2, 16, -1), out.tokens["visual.merger"], atol=1e-5, rtol=1e-4)
    with pytest.raises(EncoderError, match="attention maps are recomputed for Qwen2.5-VL's tower only"):
        enc.encode(pixels, [-1], attentions=True)
    assert lora_targets(enc, "qkv") == [f"blocks.{i}.attn.qkv" for i in range(3)]


def test_language_model_tokens_are_the_image_positions(family):
    kind, path, patch = family
    layer = "model.language_model.layers.0"
    enc = _encoder(path, patch, [layer])
    pixels = torch.randn(2, 3, 8 * patch, 8 * patch)
    out = enc.encode(pixels, [layer])
    ids = torch.tensor([[902] + [900] * 16 + [903]] * 2)
    with torch.no_grad():
        hf = enc.vlm(input_ids=ids, mm_token_type_ids=(ids == 900).int(), pixel_values=enc.patchify(pixels),
                     image_grid_thw=torch.tensor([[1, 8, 8]] * 2), output_hidden_states=True, use_cache=False)  # fmt: skip
    torch.testing.assert_close(out.tokens[layer], hf.hidden_states[1][:, 1:-1])
    assert out.grid[layer] == (1, 4, 4)


def test_qwen3_deepstack_mergers_are_points_on_the_merged_grid(tmp_path):
    path = models.qwen3_vl(tmp_path)
    enc = _encoder(path, 16, [1, "visual.deepstack_merger_list.0"])
    out = enc.encode(torch.randn(1, 3, 128, 128), [1, "visual.deepstack_merger_list.0"])
    with torch.no_grad():  # deepstack_visual_indexes [1]: the merger reads block 1's output
        expected = enc.visual.deepstack_merger_list[0](_group_2x2(out.tokens["1"], 8))
    torch.testing.assert_close(out.tokens["visual.deepstack_merger_list.0"], expected.reshape(1, 16, -1),
                               atol=1e-5, rtol=1e-4)  # fmt: skip
