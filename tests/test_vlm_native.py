"""The VLM encoder on native transformers VLMs: tiles as the processors cut them, tokens where the models put them.

Every layout is checked against the family's own processor (pixel tiles, input ids) and its own forward (the
packed image features, the hidden states at the image positions) on tiny random models saved to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, InternVLProcessor, InternVLVideoProcessor, LlavaNextProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from fmprobe.backbones.registry import load_encoder
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError
from fmprobe.standin import models

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "USER: <image> where is the circle ? ASSISTANT:"
UINT8_STEP = 2.5 / 255 / 0.22  # two-and-a-half uint8 steps in normalised units: PIL resizes uint8, we resize floats


@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory):
    return models.llava_next(tmp_path_factory.mktemp("llava_next"))


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    return models.internvl(tmp_path_factory.mktemp("internvl"))


def _encoder(path, layers, **kw):
    return load_encoder(ModelConfig(name=str(path), layers=list(layers), **kw))


def _image(size, seed=0):
    """A smooth random RGB image (noise at 1/8 resolution, upsampled): on such images PIL's uint8 bicubic and ours on
    floats agree to about one grey level, while on pixel noise they differ by up to ten at non-integer scales."""
    noise = np.random.default_rng(seed).integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).resize((size, size), Image.BILINEAR))


def _pixels(enc, *images):
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(enc.input_spec.mean).view(3, 1, 1)) / torch.tensor(enc.input_spec.std).view(3, 1, 1)


def _tiles(enc, pixels):
    black = torch.tensor([-m / s for m, s in zip(enc.family.mean, enc.family.std)])
    return enc.family.tiling.cut(pixels, black)


def _llava_next_processor(path, pinpoints):
    images = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints, size={"shortest_edge": 64},
                                        crop_size={"height": 64, "width": 64})  # fmt: skip
    return LlavaNextProcessor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(path), patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)  # CLIP's CLS


def _hidden(enc, pixels, input_ids, layer):
    """The model's own hidden states after LM layer ``layer`` for our pixels and the given ids."""
    with torch.no_grad():
        out = enc.model.model(input_ids=input_ids, **enc.family.pixel_inputs(_tiles(enc, pixels)),
                              output_hidden_states=True, use_cache=False)  # fmt: skip
    return out.hidden_states[layer + 1]


# ------------------------------------------------------------------------------------------------ LLaVA-NeXT


@pytest.mark.parametrize("pinpoints,size", [([[64, 128], [128, 64], [128, 128]], 128), ([[64, 128], [128, 64]], 96)])
def test_anyres_tiles_match_the_llava_next_processor(tmp_path, pinpoints, size):
    """2x2 tiles of a 128-px image are exact crops; with only 1x2 pinpoints a 96-px image is shrunk to 64 px and padded
    black to 64 x 128 (the processor's padding), the base view resized to the tower's 64 px."""
    path = models.llava_next(tmp_path, pinpoints=pinpoints)
    enc = _encoder(path, ["0@base"], image_size=size)
    image = _image(size)
    expected = _llava_next_processor(path, pinpoints)(images=Image.fromarray(image), text="<image>",
                                                      return_tensors="pt")["pixel_values"][0]  # fmt: skip
    tiles = _tiles(enc, _pixels(enc, image))[0]
    assert tiles.shape == expected.shape == ((5, 3, 64, 64) if size == 128 else (3, 3, 64, 64))
    err = (tiles - expected).abs().amax(dim=(1, 2, 3))
    assert err[0] < UINT8_STEP  # the base view: the same bicubic resize on floats instead of uint8
    if size == 128:
        assert err[1:].max() < 1e-5  # plain crops
    else:
        assert err[1:].max() < UINT8_STEP
        black = torch.tensor([-m / s for m, s in zip(enc.family.mean, enc.family.std)]).view(3, 1, 1)
        assert torch.allclose(tiles[1, :, :, :32], black.expand(3, 64, 32))  # the left half of the first tile is pad


@pytest.mark.parametrize("pinpoints,size,tiles_grid", [([[64, 128], [128, 64], [128, 128]], 128, (16, 16)),
                                                       ([[64, 128], [128, 64]], 96, (8, 8))])  # fmt: skip
def test_anyres_token_layout_matches_the_model(tmp_path, pinpoints, size, tiles_grid):
    """Projector tokens of both views, re-packed with image_newline, are the model's packed features; LM tokens are the
    hidden states at the processor's image positions (base first, then the unpadded tile rows, newline dropped)."""
    path = models.llava_next(tmp_path, pinpoints=pinpoints)
    layers = [f"{p}@{v}" for p in ("model.multi_modal_projector", "model.language_model.layers.0") for v in ("base", "tiles")]
    enc = _encoder(path, layers, image_size=size, prompt=PROMPT)
    images = [_image(size, seed) for seed in (0, 1)]
    pixels = _pixels(enc, *images)
    out = enc.encode(pixels, layers)
    assert out.grid["model.multi_modal_projector@base"] == (1, 8, 8)
    assert out.grid["model.multi_modal_projector@tiles"] == out.grid["model.language_model.layers.0@tiles"] == (1, *tiles_grid)

    with torch.no_grad():
        packed = enc.model.model.get_image_features(**enc.family.pixel_inputs(_tiles(enc, pixels))).pooler_output
    newline = enc.model.model.image_newline
    for i in range(2):
        rows = out.tokens["model.multi_modal_projector@tiles"][i].reshape(*tiles_grid, -1)
        with_newline = torch.cat([rows, newline.expand(tiles_grid[0], 1, -1)], dim=1).reshape(-1, rows.shape[-1])
        torch.testing.assert_close(torch.cat([out.tokens["model.multi_modal_projector@base"][i], with_newline]), packed[i])

    processed = _llava_next_processor(path, pinpoints)(images=[Image.fromarray(im) for im in images],
                                                       text=[PROMPT] * 2, return_tensors="pt")  # fmt: skip
    ids = processed["input_ids"]
    text, _ = enc.family.text_inputs(enc.tokenizer, PROMPT, 2)
    assert torch.equal(text["input_ids"], ids)  # the same ids as the model's processor
    hidden = _hidden(enc, pixels, ids, 0)
    where = (ids[0] == models.IMAGE_TOKEN_ID).nonzero()[:, 0]
    base, rest = where[:64], where[64:].reshape(tiles_grid[0], tiles_grid[1] + 1)[:, :-1].flatten()
    torch.testing.assert_close(out.tokens["model.language_model.layers.0@base"], hidden[:, base])
    torch.testing.assert_close(out.tokens["model.language_model.layers.0@tiles"], hidden[:, rest])


def test_onevision_shrinks_the_language_model_tile_grid(tmp_path):
    """OneVision with anyres_max_1: the 16 x 16 tile grid is shrunk to 8 x 8 before the LM; the projector view keeps 16."""
    path = models.llava_next(tmp_path, onevision=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vision_aspect_ratio": "anyres_max_1"}))
    layers = ["model.multi_modal_projector@tiles", "model.language_model.layers.0@tiles", "model.language_model.layers.0@base"]
    enc = _encoder(path, layers)
    pixels = _pixels(enc, _image(128))
    out = enc.encode(pixels, layers)  # the model itself refuses a wrong number of image tokens
    assert out.grid["model.multi_modal_projector@tiles"] == (1, 16, 16)
    assert out.grid["model.language_model.layers.0@tiles"] == (1, 8, 8)
    text, positions = enc.family.text_inputs(enc.tokenizer, None, 1)
    assert positions.numel() == 64 + 8 * 9
    hidden = _hidden(enc, pixels, text["input_ids"], 0)
    torch.testing.assert_close(out.tokens["model.language_model.layers.0@tiles"],
                               hidden[:, 64:].reshape(1, 8, 9, -1)[:, :, :8].reshape(1, 64, -1))  # fmt: skip


def test_a_bright_square_lands_in_its_grid_cells_of_both_views(llava_next_dir):
    """Patch embedding set by hand (channel 0 = mean brightness, no position embedding): a bright square covering
    pixels [32:64, 64:96] of a 128-px image lights exactly its 8-px cells in the tiles view and 16-px cells in the base."""
    enc = _encoder(llava_next_dir, ["model.vision_tower.embeddings@base", "model.vision_tower.embeddings@tiles"])
    embeddings = enc.model.model.vision_tower.embeddings
    with torch.no_grad():
        embeddings.patch_embedding.weight.zero_()
        embeddings.patch_embedding.weight[0] = 1 / (3 * 8 * 8)
        embeddings.position_embedding.weight.zero_()
        embeddings.class_embedding.zero_()
    image = np.zeros((128, 128, 3), dtype=np.uint8)
    image[32:64, 64:96] = 255
    out = enc.encode(_pixels(enc, image), ["model.vision_tower.embeddings@base", "model.vision_tower.embeddings@tiles"])
    bright = out.tokens["model.vision_tower.embeddings@tiles"][0, :, 0].reshape(16, 16)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(bright > bright.min() + 1, expected)
    base = out.tokens["model.vision_tower.embeddings@base"][0, :, 0].reshape(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(base > base.min() + 1, expected)
    assert out.prefix["model.vision_tower.embeddings@base"].shape == (1, 1, 32)  # the base tile's CLS


# ------------------------------------------------------------------------------------------------ InternVL


def test_internvl_tiles_thumbnail_and_ids_match_the_processor(internvl_dir):
    layers = ["model.multi_modal_projector@base", "model.multi_modal_projector@tiles", "model.language_model.layers.0@base",
              "model.language_model.layers.0@tiles"]  # fmt: skip
    enc = _encoder(internvl_dir, layers, prompt="<image> where is the circle ?")
    image = _image(128)
    mean, std = list(enc.input_spec.mean), list(enc.input_spec.std)
    images = GotOcr2ImageProcessorPil(crop_to_patches=True, max_patches=4, size={"height": 64, "width": 64},
                                      image_mean=mean, image_std=std)  # fmt: skip
    processor = InternVLProcessor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(internvl_dir),
                                  video_processor=InternVLVideoProcessor(), image_seq_length=16)  # fmt: skip
    processed = processor(images=Image.fromarray(image), text="<IMG_CONTEXT> where is the circle ?", return_tensors="pt")
    pixels = _pixels(enc, image)
    tiles = _tiles(enc, pixels)[0]
    err = (tiles - processed["pixel_values"]).abs().amax(dim=(1, 2, 3))
    assert tiles.shape == (5, 3, 64, 64) and err[:4].max() < 1e-5 and err[4] < UINT8_STEP  # 2x2 tiles, thumbnail last
    text, _ = enc.family.text_inputs(enc.tokenizer, enc.prompt, 1)
    assert torch.equal(text["input_ids"], processed["input_ids"])  # <img> 5 x 16 context tokens </img> where ...

    out = enc.encode(pixels, layers)
    assert out.grid["model.multi_modal_projector@tiles"] == (1, 8, 8)  # 2x2 tiles of 4x4 shuffled tokens
    assert out.grid["model.multi_modal_projector@base"] == (1, 4, 4)
    with torch.no_grad():
        features = enc.model.model.get_image_features(pixel_values=tiles).pooler_output  # [5 tiles, 16, D]
    tiles_view = features[:4].reshape(2, 2, 4, 4, -1).permute(0, 2, 1, 3, 4).reshape(1, 64, -1)
    torch.testing.assert_close(out.tokens["model.multi_modal_projector@tiles"], tiles_view)
    torch.testing.assert_close(out.tokens["model.multi_modal_projector@base"], features[4:])
    hidden = _hidden(enc, pixels, processed["input_ids"], 0)
    where = (processed["input_ids"][0] == models.IMG_CONTEXT_ID).nonzero()[:, 0]
    per_tile = hidden[:, where].reshape(5, 16, -1)
    torch.testing.assert_close(out.tokens["model.language_model.layers.0@base"], per_tile[4:])
    torch.testing.assert_close(out.tokens["model.language_model.layers.0@tiles"],
                               per_tile[:4].reshape(2, 2, 4, 4, -1).permute(0, 2, 1, 3, 4).reshape(1, 64, -1))  # fmt: skip


def test_internvl_pixel_shuffle_puts_each_2x2_patch_block_in_one_token(internvl_dir):
    """Identity blocks (layer scale 0) and a hand-set patch embedding: one bright patch at (r, c) of a tile shows up in
    token (r // 2, c // 2) of the pixel-shuffled projector input, in the channel block of its place in the 2x2 block."""
    enc = _encoder(internvl_dir, ["model.multi_modal_projector:input@tiles", "-1@tiles"])
    tower = enc.model.model.vision_tower
    with torch.no_grad():
        for block in tower.encoder.layer:
            block.lambda_1.zero_()
            block.lambda_2.zero_()
        tower.embeddings.patch_embeddings.projection.weight.zero_()
        tower.embeddings.patch_embeddings.projection.weight[0] = 1 / (3 * 8 * 8)
        tower.embeddings.patch_embeddings.projection.bias.zero_()
        tower.embeddings.position_embeddings.zero_()
    for row, col in [(0, 0), (5, 2), (3, 15), (14, 9)]:  # patch cells of the 16 x 16 tiles view
        image = np.zeros((128, 128, 3), dtype=np.uint8)
        image[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 255
        out = enc.encode(_pixels(enc, image), ["model.multi_modal_projector:input@tiles", "-1@tiles"])
        patches = out.tokens["-1@tiles"][0, :, 0].reshape(16, 16)
        assert patches.argmax() == row * 16 + col and out.grid["-1@tiles"] == (1, 16, 16)
        shuffled = out.tokens["model.multi_modal_projector:input@tiles"][0].reshape(8, 8, 4, 32)[..., 0]
        assert out.grid["model.multi_modal_projector:input@tiles"] == (1, 8, 8)
        hot = (shuffled > shuffled.min() + 0.5).nonzero().tolist()
        assert hot == [[row // 2, col // 2, (row % 2) * 2 + col % 2]]


# ------------------------------------------------------------------------------------------------ LLaVA-1.5 and refusals


def test_llava_has_one_view_and_its_lm_tokens_are_the_image_positions(tmp_path):
    path = models.llava(tmp_path)
    layers = [-2, "model.language_model.layers.0"]
    enc = _encoder(path, layers)
    pixels = _pixels(enc, _image(64), _image(64, 1))
    out = enc.encode(pixels, layers)
    assert out.grid["-2"] == out.grid["model.language_model.layers.0"] == (1, 8, 8)
    text, positions = enc.family.text_inputs(enc.tokenizer, None, 2)
    assert torch.equal(positions, torch.arange(64))  # the image alone: 64 image tokens, no BOS
    torch.testing.assert_close(out.tokens["model.language_model.layers.0"], _hidden(enc, pixels, text["input_ids"], 0))
    with pytest.raises(EncoderError, match="names the view 'tiles', but this model has base"):
        enc.encode(pixels, ["-2@tiles"])


def test_unknown_and_unmappable_points_are_refused_with_the_valid_ones(llava_next_dir):
    enc = _encoder(llava_next_dir, ["-2@base"])
    valid = r"valid points: vision-tower blocks 0\.\.2 .*model\.vision_tower\.encoder\.layers\.<i>.*model\.multi_modal_projector"
    pixels = torch.zeros(1, 3, 128, 128)
    cases = {
        "model.vision_towr.encoder@base": r"no module 'model.vision_towr.encoder' \(close matches: model.vision_tower.en"
                                          r"coder.*\); " + valid,
        "model@base": "not inside the vision tower, the projector or the language model's layers.*" + valid,
        "-2": "needs a view: '-2@base'.*'-2@tiles'",
        "-2@thumbnail": "names the view 'thumbnail'.*" + valid,
        "3@base": "block 3 is out of range; " + valid,
        "model.language_model.layers.0@base": "language model was not kept; list it in model.layers",
    }
    for point, message in cases.items():
        with pytest.raises(EncoderError, match=message):
            enc.encode(pixels, [point])
    with pytest.raises(EncoderError, match=r"post_layernorm' outputs \(5, 32\) for 5 tile\(s\), not one row per patch"):
        enc.encode(pixels, ["model.vision_tower.post_layernorm@base"])  # the pooled CLS: no positions
    with pytest.raises(EncoderError, match="block 7 is out of range"):  # refused when the model is loaded
        _encoder(llava_next_dir, ["7@tiles"])
    lm = _encoder(llava_next_dir, ["model.language_model.layers.1@tiles"])
    with pytest.raises(EncoderError, match=r"language-model layers model\.language_model\.layers\.<0\.\.1>"):
        lm.encode(pixels, ["model.language_model.embed_tokens@base"])  # the image positions hold no image there
    assert lm.encode(pixels, ["model.language_model@tiles"]).grid["model.language_model@tiles"] == (1, 16, 16)


def test_vlm_options_are_refused_where_they_cannot_apply(tiny_dinov2_dir, llava_next_dir):
    with pytest.raises(EncoderError, match="only apply to VLMs"):
        load_encoder(ModelConfig(name=str(tiny_dinov2_dir), prompt="<image> where"))
    with pytest.raises(EncoderError, match="native transformers 'llava_next' model: it runs no remote code"):
        _encoder(llava_next_dir, ["-2@base"], trust_remote_code=True)
    for prompt, count in (("where is the circle ?", 0), ("<image> where <image>", 2)):
        enc = _encoder(llava_next_dir, ["model.language_model.layers.0@base"], prompt=prompt)
        with pytest.raises(EncoderError, match=f"with '<image>' exactly once, got {count}"):
            enc.encode(torch.zeros(1, 3, 128, 128), ["model.language_model.layers.0@base"])


def test_a_tokenizer_that_splits_the_image_token_is_refused(tmp_path):
    path = models.llava_next(tmp_path)
    config = json.loads((path / "config.json").read_text())
    word = models.WORDS.index("circle") + 10  # an ordinary word as image token: "circlecircle..." is one <unk>
    (path / "config.json").write_text(json.dumps({**config, "image_token_index": word}))
    enc = _encoder(path, ["model.language_model.layers.0@base"])
    with pytest.raises(EncoderError, match="turned the image placeholders into 0 image tokens instead of 336"):
        enc.encode(torch.zeros(1, 3, 128, 128), ["model.language_model.layers.0@base"])


def test_fingerprint_follows_weights_prompt_and_input_size(llava_next_dir):
    a = _encoder(llava_next_dir, ["-2@base"])
    assert a.fingerprint() == _encoder(llava_next_dir, ["-2@base"]).fingerprint()
    assert a.fingerprint() != _encoder(llava_next_dir, ["-2@base"], image_size=192).fingerprint()
    lm = "model.language_model.layers.0@base"
    assert _encoder(llava_next_dir, [lm]).fingerprint() != _encoder(llava_next_dir, [lm], prompt=PROMPT).fingerprint()
    with torch.no_grad():
        a.model.model.multi_modal_projector.linear_1.bias.add_(1)
    assert a.fingerprint() != _encoder(llava_next_dir, ["-2@base"]).fingerprint()
