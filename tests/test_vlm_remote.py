"""Remote-code VLMs (CogVLM2, InternVL2) through a declared layout: loaded only when trusted, tokens mapped to the
same [B, N, D] + grid as native models. The models are tiny remote-code packages written to disk (modeling_*.py,
configuration_*.py, config.json with auto_map), shaped like the real ones (fmprobe.standin.remote)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmprobe.backbones.registry import load_encoder
from fmprobe.config import ModelConfig, VLMLayoutConfig, parse_config
from fmprobe.errors import ConfigError, EncoderError
from fmprobe.standin import models, remote

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GRID = 8  # 128 px / patch 8 = 16 tower patches per side, 8 after CogVLM's 2x2 conv
COG_POINTS = [-1, "model.vision.linear_proj", "model.layers.0", "model.layers.1.mlp.vision_mlp",
              "model.layers.0.self_attn.vision_expert_query_key_value"]  # fmt: skip


@pytest.fixture(scope="module")
def cog_dir(tmp_path_factory):
    return remote.cogvlm2(tmp_path_factory.mktemp("cogvlm2"))


@pytest.fixture(scope="module")
def internvl2_dir(tmp_path_factory):
    return remote.internvl2(tmp_path_factory.mktemp("internvl2"))


def _encoder(path, layers, **kw):
    return load_encoder(ModelConfig(name=str(path), layers=list(layers), trust_remote_code=True, **kw))


def test_remote_code_is_loaded_only_when_trusted(cog_dir):
    with pytest.raises(EncoderError, match=r"ships its own modeling code \(config.json auto_map.*set "
                                           r"model.trust_remote_code: true"):  # fmt: skip
        load_encoder(ModelConfig(name=str(cog_dir), layers=[-1]))
    layout = {"protocol": "cogvlm", "tower": "model.vision", "projector": "model.vision.linear_proj",
              "language_model": "model", "lm_layers": "model.layers"}  # fmt: skip
    with pytest.raises(ConfigError, match="model.layout describes a remote-code model, which needs "
                                          "model.trust_remote_code: true"):  # fmt: skip
        parse_config({"name": "x", "data": {"manifest": "m.csv"}, "task": {"type": "binary", "targets": ["y"]},
                      "model": {"name": str(cog_dir), "layout": layout}})  # fmt: skip


def test_cogvlm_lm_points_and_vision_experts_sit_on_the_image_rows(cog_dir):
    """LM tokens are the hidden states at the grid positions (after BOS and boi); a vision expert's rows are the image
    rows but eoi, so its tokens equal that expert applied to the grid positions of its input."""
    enc = _encoder(cog_dir, COG_POINTS, prompt="where is the circle ?")
    assert enc.family.tiling.views == ("base",) and enc.input_spec.image_size == (128, 128)
    pixels = torch.randn(2, 3, 128, 128)
    mlp = enc.model.model.layers[1].mlp
    seen = {}
    handles = [mlp.register_forward_pre_hook(lambda _m, args: seen.update(mlp_in=args[0])),
               enc.model.model.register_forward_hook(lambda _m, _a, out: seen.update(last=out.last_hidden_state))]
    try:
        out = enc.encode(pixels, COG_POINTS)
    finally:
        for handle in handles:
            handle.remove()
    grid = slice(2, 2 + GRID * GRID)  # BOS, boi, the 8 x 8 grid, eoi, then the prompt's 5 words
    assert seen["last"].shape == (2, 1 + 1 + GRID * GRID + 1 + 5, 48)
    assert out.grid["-1"] == (1, 16, 16) and out.prefix["-1"].shape == (2, 1, 32)  # CLS kept apart
    for point in COG_POINTS[1:]:
        assert out.grid[str(point)] == (1, GRID, GRID)
    with torch.no_grad():
        torch.testing.assert_close(out.tokens["model.layers.1.mlp.vision_mlp"], mlp.vision_mlp(seen["mlp_in"][:, grid]))
    final = _encoder(cog_dir, ["model"], prompt="where is the circle ?").encode(pixels, ["model"])
    torch.testing.assert_close(final.tokens["model"], seen["last"][:, grid])
    with torch.no_grad():  # the projector point is the tower's output between boi and eoi, before the scaling
        vision = enc.model.model.vision(pixels[:, :, :, :])
    torch.testing.assert_close(out.tokens["model.vision.linear_proj"] / 8.0, vision[:, 1:-1])
    with pytest.raises(EncoderError, match="CogVLM2 always puts the image right after BOS"):
        _encoder(cog_dir, ["model.layers.0"], prompt="<image> where").encode(pixels, ["model.layers.0"])


def test_a_bright_square_lands_in_the_eva_tower_grid(cog_dir):
    enc = _encoder(cog_dir, ["model.vision.patch_embedding"])
    embedding = enc.model.model.vision.patch_embedding
    with torch.no_grad():
        embedding.proj.weight.zero_()
        embedding.proj.weight[0] = 1 / (3 * 8 * 8)
        embedding.proj.bias.zero_()
        embedding.position_embedding.weight.zero_()
    image = torch.full((1, 3, 128, 128), -1.5)
    image[..., 40:72, 96:112] = 2.0
    out = enc.encode(image, ["model.vision.patch_embedding"])
    bright = out.tokens["model.vision.patch_embedding"][0, :, 0].reshape(16, 16)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[5:9, 12:14] = True
    assert torch.equal(bright > 0, expected)


def test_internvl2_remote_tiles_match_extract_feature_and_the_context_positions(internvl2_dir):
    layers = ["mlp1@tiles", "mlp1@base", "language_model.model.layers.0@tiles", "language_model.model.layers.0@base"]
    enc = _encoder(internvl2_dir, layers)
    pixels = torch.randn(1, 3, 128, 128)
    seen = {}
    layer = enc.model.language_model.model.layers[0]
    handle = layer.register_forward_hook(lambda _m, _a, out: seen.update(h=out[0] if isinstance(out, tuple) else out))
    try:
        out = enc.encode(pixels, layers)
    finally:
        handle.remove()
    tiles = enc.family.tiling.cut(pixels, torch.zeros(3))[0]  # 2x2 tiles then the thumbnail
    with torch.no_grad():
        features = enc.model.extract_feature(tiles)  # [5, 16, 48]
    assemble = features[:4].reshape(2, 2, 4, 4, -1).permute(0, 2, 1, 3, 4).reshape(1, 64, -1)
    torch.testing.assert_close(out.tokens["mlp1@tiles"], assemble)
    torch.testing.assert_close(out.tokens["mlp1@base"], features[4:])
    text, _ = enc.family.text_inputs(enc.tokenizer, None, 1)
    ids = text["input_ids"][0].tolist()
    assert ids == [models.SPECIAL["<img>"]] + [models.IMG_CONTEXT_ID] * 80 + [models.SPECIAL["</img>"]]
    hidden = seen["h"][0, 1:-1].reshape(5, 16, -1)  # the context tokens between <img> and </img>, tile by tile
    torch.testing.assert_close(out.tokens["language_model.model.layers.0@base"][0], hidden[4])
    torch.testing.assert_close(out.tokens["language_model.model.layers.0@tiles"][0],
                               hidden[:4].reshape(2, 2, 4, 4, -1).permute(0, 2, 1, 3, 4).reshape(64, -1))  # fmt: skip


def test_a_remote_architecture_without_a_built_in_layout_needs_a_declared_one(tmp_path):
    path = remote.cogvlm2(tmp_path / "mine")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["MyVisualExpertLM"]}))
    with pytest.raises(EncoderError, match="remote-code 'MyVisualExpertLM' model without a built-in layout.*declare "
                                           "one in model.layout"):  # fmt: skip
        _encoder(path, [-1])
    layout = VLMLayoutConfig(protocol="cogvlm", tower="model.vision", projector="model.vision.linear_proj",
                             language_model="model", lm_layers="model.layers", merge=2,
                             experts=["mlp.vision_mlp"])  # fmt: skip
    enc = _encoder(path, ["model.layers.0.mlp.vision_mlp", 1], layout=layout)
    out = enc.encode(torch.randn(1, 3, 128, 128), ["model.layers.0.mlp.vision_mlp", 1])
    assert out.grid["model.layers.0.mlp.vision_mlp"] == (1, GRID, GRID) and out.grid["1"] == (1, 16, 16)
    bad = layout.model_copy(update={"projector": "model.vision.projection"})
    with pytest.raises(EncoderError, match=r"the layout names modules the model does not have: \['model.vision.proj"):
        _encoder(path, [-1], layout=bad)


def test_remote_points_are_refused_with_the_valid_ones(cog_dir):
    enc = _encoder(cog_dir, ["model.layers.0"])
    pixels = torch.zeros(1, 3, 128, 128)
    valid = (r"valid points: vision-tower blocks 0\.\.2 .*model\.vision\.transformer\.layers\.<i>.*'model\.vision\.linear"
             r"_proj'.*model\.layers\.<0\.\.1>.*vision expert model\.layers\.<i>\.mlp\.vision_mlp")  # fmt: skip
    for point in ("model.vision.transformer.layers.7", "model.embed_tokens", "lm_head", "0@tiles"):
        with pytest.raises(EncoderError, match=valid):
            enc.encode(pixels, [point])
    with pytest.raises(EncoderError, match=r"'model.vision' outputs \(1, 66, 48\) for 1 tile\(s\), not one row per "):
        enc.encode(pixels, ["model.vision"])  # boi + grid + eoi: the eoi row has no place on the grid
    assert np.isfinite(enc.encode(pixels, ["model.vision.conv"]).tokens["model.vision.conv"].numpy()).all()
