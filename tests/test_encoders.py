"""HF encoders behind one Encoder interface: tiny random-init models saved to disk and reloaded via load_encoder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    Blip2Config,
    Blip2Model,
    Blip2VisionModel,
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipModel,
    VideoMAEConfig,
    VideoMAEModel,
    VJEPA2Config,
    VJEPA2Model,
)

from fmprobe.backbones.hf_vision import CLIP_MEAN, HALF, IMAGENET_MEAN, IMAGENET_STD, load_pretrained
from fmprobe.backbones.registry import load_encoder
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

transformers.logging.set_verbosity_error()

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
TEXT = dict(**TINY, intermediate_size=64, vocab_size=100, max_position_embeddings=16)


@dataclass(frozen=True)
class Family:
    """A tiny model of one family and what its encoder must report."""

    kind: str  # "image" | "video"
    size: int
    frames: int | None
    patch: int
    tubelet: int
    prefix: int
    grid: tuple[int, int, int]
    mean: tuple[float, float, float]
    module: str  # a valid module path inside the wrapped model
    final_norm: bool  # -1 (last_hidden_state) is post-norm, so it differs from the last block's raw output


FAMILIES: dict[str, Family] = {
    "dinov2": Family("image", 32, None, 8, 1, 1, (1, 4, 4), IMAGENET_MEAN, "encoder.layer.0.mlp", True),
    "dinov2_registers": Family("image", 32, None, 8, 1, 5, (1, 4, 4), IMAGENET_MEAN, "encoder.layer.1.mlp", True),
    "clip": Family("image", 32, None, 8, 1, 1, (1, 4, 4), CLIP_MEAN, "encoder.layers.0.mlp", False),
    "siglip": Family("image", 32, None, 8, 1, 0, (1, 4, 4), HALF, "encoder.layers.0.self_attn", True),
    "blip2": Family("image", 32, None, 8, 1, 1, (1, 4, 4), CLIP_MEAN, "encoder.layers.1.mlp", True),
    "blip2_vision": Family("image", 32, None, 8, 1, 1, (1, 4, 4), CLIP_MEAN, "encoder.layers.0", True),
    "videomae": Family("video", 32, 4, 16, 2, 0, (2, 2, 2), IMAGENET_MEAN, "encoder.layer.0.attention", True),
    "vjepa2": Family("video", 32, 4, 16, 2, 0, (2, 2, 2), IMAGENET_MEAN, "encoder.layer.1.mlp", True),
}


def _build(family: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if family == "dinov2":
        return Dinov2Model(Dinov2Config(**TINY, mlp_ratio=2, image_size=32, patch_size=8))
    if family == "dinov2_registers":
        return Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(**TINY, mlp_ratio=2, image_size=32, patch_size=8, num_register_tokens=4)
        )
    vision = dict(**TINY, intermediate_size=64, image_size=32, patch_size=8)
    if family == "clip":
        return CLIPModel(CLIPConfig(vision_config=vision, text_config=TEXT, projection_dim=16))
    if family == "siglip":
        return SiglipModel(SiglipConfig(vision_config=vision, text_config=TEXT))
    if family in ("blip2", "blip2_vision"):
        config = Blip2Config(
            vision_config=vision,
            qformer_config=dict(TEXT, encoder_hidden_size=32),
            text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             ffn_dim=64, vocab_size=100, word_embed_proj_dim=32),  # fmt: skip
            num_query_tokens=4,
        )
        return Blip2Model(config) if family == "blip2" else Blip2VisionModel(config.vision_config)
    if family == "videomae":
        return VideoMAEModel(
            VideoMAEConfig(**TINY, intermediate_size=64, image_size=32, patch_size=16, num_frames=4, tubelet_size=2,
                           use_mean_pooling=False)  # fmt: skip
        )
    if family == "vjepa2":
        return VJEPA2Model(
            VJEPA2Config(**TINY, mlp_ratio=2, crop_size=32, patch_size=16, frames_per_clip=4, tubelet_size=2,
                         pred_hidden_size=32, pred_num_attention_heads=2, pred_num_hidden_layers=1,
                         num_pooler_layers=1)  # fmt: skip
        )
    raise KeyError(family)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model saved once with save_pretrained (full two-tower checkpoints for CLIP/SigLIP/BLIP-2)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family in FAMILIES:
        dirs[family] = root / family
        _build(family).save_pretrained(dirs[family])
    return dirs


def _pixels(fam: Family, batch: int = 2, size: int | None = None, frames: int | None = None) -> torch.Tensor:
    size = size or fam.size
    gen = torch.Generator().manual_seed(1)
    if fam.kind == "image":
        return torch.randn(batch, 3, size, size, generator=gen)
    return torch.randn(batch, frames or fam.frames, 3, size, size, generator=gen)


def _reference(enc, pixels: torch.Tensor):
    """The wrapped model's own outputs (transformers' hidden_states capture, independent of our hooks)."""
    with torch.no_grad():
        return enc.model(**{enc.input_name: pixels}, output_hidden_states=True, **enc.forward_kwargs())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokens_prefix_grid_per_layer(family: str, saved: dict[str, Path]) -> None:
    fam = FAMILIES[family]
    enc = load_encoder(ModelConfig(name=str(saved[family])))
    spec = enc.input_spec
    assert (spec.kind, spec.image_size, spec.num_frames) == (fam.kind, (fam.size, fam.size), fam.frames)
    assert (spec.patch_size, spec.tubelet_size, spec.mean) == (fam.patch, fam.tubelet, fam.mean)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())

    pixels = _pixels(fam)
    layers = [0, -1, fam.module, "1"]
    with torch.no_grad():
        out = enc.encode(pixels, layers)
    n_patch = fam.grid[0] * fam.grid[1] * fam.grid[2]
    for ref in layers:
        key = str(ref)
        assert out.grid[key] == fam.grid
        assert out.tokens[key].shape[:2] == (2, n_patch)
        assert out.prefix[key].shape[:2] == (2, fam.prefix)
    assert out.attentions == {}

    ref = _reference(enc, pixels)
    # block i = hidden_states[i + 1] (hidden_states[0] is the embedding output)
    for i in (0, 1):
        full = torch.cat([out.prefix[str(i)], out.tokens[str(i)]], dim=1)
        torch.testing.assert_close(full, ref.hidden_states[i + 1])
    last = torch.cat([out.prefix["-1"], out.tokens["-1"]], dim=1)
    torch.testing.assert_close(last, ref.last_hidden_state)
    assert fam.final_norm == (not torch.allclose(out.tokens["-1"], out.tokens["1"]))


@pytest.mark.parametrize("family", ["dinov2", "siglip", "videomae", "vjepa2"])
def test_attentions_per_block(family: str, saved: dict[str, Path]) -> None:
    fam = FAMILIES[family]
    enc = load_encoder(ModelConfig(name=str(saved[family])))
    before = enc.model.config._attn_implementation
    with torch.no_grad():
        out = enc.encode(_pixels(fam), [-1], attentions=True)
    n_tok = fam.prefix + fam.grid[0] * fam.grid[1] * fam.grid[2]
    assert sorted(out.attentions) == ["0", "1"]
    for att in out.attentions.values():
        assert att.shape == (2, 2, n_tok, n_tok)
        torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, n_tok))
    assert enc.model.config._attn_implementation == before  # switched to eager for the call only


def test_attentions_refused_when_the_model_returns_none(saved: dict[str, Path], monkeypatch) -> None:
    enc = load_encoder(ModelConfig(name=str(saved["vjepa2"])))
    assert enc.model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(enc.model, "set_attn_implementation", lambda impl: None)  # a model that cannot switch
    with pytest.raises(EncoderError, match=r"attention maps for 0 of 2 blocks.*sdpa"):
        enc.encode(_pixels(FAMILIES["vjepa2"]), [-1], attentions=True)


def test_vjepa2_refuses_wrong_crop_and_frames(saved: dict[str, Path]) -> None:
    fam = FAMILIES["vjepa2"]
    enc = load_encoder(ModelConfig(name=str(saved["vjepa2"])))
    with pytest.raises(EncoderError, match="crop_size"):
        enc.encode(_pixels(fam, size=48), [-1])
    with pytest.raises(EncoderError, match="frames_per_clip"):
        enc.encode(_pixels(fam, frames=8), [-1])
    with pytest.raises(EncoderError, match=r"model.image_size 48.*crop_size 32x32"):
        load_encoder(ModelConfig(name=str(saved["vjepa2"]), image_size=48))


def test_image_size_override_only_where_position_embeddings_interpolate(saved: dict[str, Path]) -> None:
    for family in ("dinov2", "clip"):
        enc = load_encoder(ModelConfig(name=str(saved[family]), image_size=48))
        assert enc.input_spec.image_size == (48, 48)
        out = enc.encode(_pixels(FAMILIES[family], size=48), [-1, 0])
        assert out.grid["0"] == (1, 6, 6) and out.tokens["-1"].shape[1] == 36
    with pytest.raises(EncoderError, match="multiple of the patch size"):
        load_encoder(ModelConfig(name=str(saved["dinov2"]), image_size=50))
    with pytest.raises(EncoderError, match="VideoMAE cannot take model.image_size"):
        load_encoder(ModelConfig(name=str(saved["videomae"]), image_size=48))
    enc = load_encoder(ModelConfig(name=str(saved["clip"])))
    with pytest.raises(EncoderError, match="model.image_size"):
        enc.encode(_pixels(FAMILIES["clip"], size=48), [-1])


def test_layer_reference_errors(saved: dict[str, Path]) -> None:
    enc = load_encoder(ModelConfig(name=str(saved["dinov2"])))
    pixels = _pixels(FAMILIES["dinov2"])
    with pytest.raises(EncoderError, match=r"no module 'encoder\.layers\.0'.*close matches: encoder\.layer\.0"):
        enc.encode(pixels, ["encoder.layers.0"])
    with pytest.raises(EncoderError, match=r"layer 2 is out of range.*2 blocks"):
        enc.encode(pixels, [2])
    with pytest.raises(EncoderError, match="not tokens"):
        enc.encode(pixels, ["embeddings.patch_embeddings.projection"])  # a conv map [B, D, h, w]
    out = enc.encode(pixels, [-2, "embeddings.patch_embeddings"])
    torch.testing.assert_close(out.tokens["-2"], enc.encode(pixels, [0]).tokens["0"])
    assert out.prefix["embeddings.patch_embeddings"].shape[1] == 0  # patch embeddings carry no CLS


def test_fingerprint_stable_across_reloads_and_tracks_weights(saved: dict[str, Path], tmp_path: Path) -> None:
    cfg = ModelConfig(name=str(saved["dinov2"]))
    enc = load_encoder(cfg)
    first = enc.fingerprint()
    assert first == load_encoder(cfg).fingerprint()
    other = ModelConfig(name=str(saved["dinov2_registers"]))
    assert load_encoder(other).fingerprint() != first

    model = Dinov2Model.from_pretrained(saved["dinov2"])
    with torch.no_grad():
        model.encoder.layer[1].mlp.fc2.bias[0] += 1e-3
    model.save_pretrained(tmp_path / "changed")
    assert load_encoder(ModelConfig(name=str(tmp_path / "changed"))).fingerprint() != first

    with torch.no_grad():  # an in-place update of the live model (as training does) is noticed too
        enc.model.layernorm.weight.mul_(2)
    assert enc.fingerprint() != first


def test_vjepa2_fingerprint_ignores_the_unused_predictor(saved: dict[str, Path]) -> None:
    enc = load_encoder(ModelConfig(name=str(saved["vjepa2"])))
    first = enc.fingerprint()
    with torch.no_grad():
        next(enc.model.predictor.parameters()).add_(1.0)
    assert enc.fingerprint() == first


def test_normalisation_and_size_read_from_preprocessor_config(saved: dict[str, Path], tmp_path: Path) -> None:
    model = Dinov2Model.from_pretrained(saved["dinov2"])
    model.save_pretrained(tmp_path)
    proc = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5], "crop_size": {"height": 24, "width": 24}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(proc))
    enc = load_encoder(ModelConfig(name=str(tmp_path)))
    assert enc.input_spec.mean == (0.1, 0.2, 0.3) and enc.input_spec.std == (0.5, 0.5, 0.5)
    assert enc.input_spec.image_size == (24, 24)  # the published crop, not config.json's image_size (32)
    assert enc.encode(_pixels(FAMILIES["dinov2"], size=24), [-1]).grid["-1"] == (1, 3, 3)
    assert load_encoder(ModelConfig(name=str(tmp_path), image_size=40)).input_spec.image_size == (40, 40)
    default = load_encoder(ModelConfig(name=str(saved["dinov2"]))).input_spec
    assert default.std == IMAGENET_STD and default.image_size == (32, 32)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"crop_size": 30}))
    with pytest.raises(EncoderError, match=r"crop size in .*preprocessor_config.json \(30\) must be a multiple"):
        load_encoder(ModelConfig(name=str(tmp_path)))


def test_vision_towers_load_their_weights_from_full_checkpoints(saved: dict[str, Path]) -> None:
    full = Blip2Model.from_pretrained(saved["blip2"])
    enc = load_encoder(ModelConfig(name=str(saved["blip2"])))
    torch.testing.assert_close(enc.model.state_dict(), full.vision_model.state_dict())
    clip = CLIPModel.from_pretrained(saved["clip"])
    enc = load_encoder(ModelConfig(name=str(saved["clip"])))
    torch.testing.assert_close(enc.model.state_dict(), clip.vision_model.state_dict())
    # without the key mapping every vision weight would stay random: refused, not silently used
    with pytest.raises(EncoderError, match="does not hold the weights of a Blip2VisionModel"):
        load_pretrained(Blip2VisionModel, str(saved["blip2"]), ModelConfig(), config=full.config.vision_config)


def test_a_tower_from_a_full_checkpoint_reports_the_unused_weights_in_one_line(saved: dict[str, Path], caplog) -> None:
    """transformers logs a line per unused weight (hundreds for a real BLIP-2); fmprobe says how many and whose."""
    import logging

    from safetensors import safe_open
    from transformers.utils import logging as hf_logging

    with safe_open(saved["blip2"] / "model.safetensors", "pt") as stored:
        unused = [k for k in stored.keys() if not k.startswith("vision_model.")]
    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())  # transformers' logger does not propagate
    hf_logging.get_logger("transformers").addHandler(handler)
    before = hf_logging.get_verbosity()
    try:
        caplog.clear()
        load_encoder(ModelConfig(name=str(saved["blip2"])))
        assert not [r for r in reports if "UNEXPECTED" in r or "not sharded" in r], reports
        (record,) = [r for r in caplog.records if r.name.startswith("fmprobe")]
        line = record.getMessage()
        assert f"{len(unused)} weights of the checkpoint belong to other parts and were not loaded" in line
        counts = {p: sum(k.split(".")[0] == p for k in unused) for p in ("qformer", "language_model", "query_tokens")}
        assert all(f"{part} ({n})" in line for part, n in counts.items())
        hf_logging.set_verbosity_info()  # asked for: transformers' own report, weight by weight
        load_encoder(ModelConfig(name=str(saved["blip2"])))
        assert sum(r.count("UNEXPECTED") for r in reports) >= len(unused) // 2
    finally:
        hf_logging.set_verbosity(before)
        hf_logging.get_logger("transformers").removeHandler(handler)


def test_registry_checks_kind_type_and_checkpoint(saved: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="model.kind is 'clip'.*'dinov2' model"):
        load_encoder(ModelConfig(name=str(saved["dinov2"]), kind="clip"))
    assert load_encoder(ModelConfig(name=str(saved["siglip"]), kind="siglip")).input_spec.mean == HALF
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(EncoderError, match=r"'resnet' model.*supported model types: .*dinov2.*vjepa2"):
        load_encoder(ModelConfig(name=str(tmp_path)))
    with pytest.raises(EncoderError, match="neither an existing local folder"):
        load_encoder(ModelConfig(name=str(tmp_path / "missing" / "dir")))
    with pytest.raises(ValueError, match="needs checkpoint"):
        ModelConfig(kind="vjepa2-native")
    with pytest.raises(ValueError, match="only apply to kind: vjepa2-native"):
        ModelConfig(name=str(saved["dinov2"]), checkpoint="x.pt")


def test_a_model_name_that_names_nothing_says_what_to_fix_in_plain_words(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in (str(tmp_path / "models" / "dinov2-base"), "./models/dinov2-base", "~/no/such/model"):
        with pytest.raises(EncoderError) as excinfo:
            load_encoder(ModelConfig(name=name))
        message = str(excinfo.value)
        assert message.startswith(f"model.name '{name}' is neither an existing local folder nor a known model name")
        assert "dinov2-small-offline" in message and "'namespace/name'" in message
        assert "Repo id" not in message and "repo_type" not in message  # the hub library's wording
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match=r"model.name '.*empty' is a folder without config.json"):
        load_encoder(ModelConfig(name=str(tmp_path / "empty")))


def test_dtype_is_applied(saved: dict[str, Path]) -> None:
    enc = load_encoder(ModelConfig(name=str(saved["dinov2"]), dtype="bfloat16"))
    assert next(enc.parameters()).dtype == torch.bfloat16
    out = enc.encode(_pixels(FAMILIES["dinov2"]), [-1])
    assert out.tokens["-1"].dtype == torch.bfloat16
    assert enc.fingerprint() != load_encoder(ModelConfig(name=str(saved["dinov2"]))).fingerprint()


def test_registry_dispatches_offline_qwen_and_native(saved: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    import fmprobe.backbones.offline as offline
    import fmprobe.backbones.qwen2_5_vl as qwen
    import fmprobe.backbones.vjepa2_native as native

    monkeypatch.setattr(offline, "offline_dinov2_dir", lambda: saved["dinov2"])
    enc = load_encoder(ModelConfig())  # the default name, "dinov2-small-offline"
    assert enc.name == "dinov2-small-offline" and enc.input_spec.patch_size == 8

    calls = []
    monkeypatch.setattr(qwen, "QwenVisionEncoder", lambda path, model: calls.append((path, model.name)) or "qwen")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert load_encoder(ModelConfig(name=str(tmp_path))) == "qwen" and calls == [(str(tmp_path), str(tmp_path))]

    vjepa = VJEPA2Model.from_pretrained(saved["vjepa2"])
    monkeypatch.setattr(native, "load_native_vjepa2", lambda path, **kw: vjepa if path.endswith("enc.pt") else None)
    enc = load_encoder(ModelConfig(kind="vjepa2-native", checkpoint=str(tmp_path / "enc.pt"), dtype="bfloat16"))
    assert enc.name == "vjepa2-native:enc.pt" and enc.input_spec.num_frames == 4
    assert next(enc.parameters()).dtype == torch.bfloat16
    assert enc.encode(_pixels(FAMILIES["vjepa2"]), [0]).grid["0"] == (2, 2, 2)



def test_loading_a_tower_prints_no_tensor_parallel_noise(tmp_path: Path) -> None:
    """Silencing transformers' per-weight report must not switch on its tensor-parallel check, which warned on every
    DINOv2 load that dozens of layers were "not sharded" (on a single CPU, where nothing is)."""
    import logging

    from transformers.utils import logging as hf_logging

    _build("dinov2").save_pretrained(tmp_path)
    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    hf_logging.get_logger("transformers").addHandler(handler)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # transformers' default (another module of the suite may have lowered it)
    try:
        load_encoder(ModelConfig(name=str(tmp_path)))
    finally:
        hf_logging.set_verbosity(before)
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert not [r for r in reports if "not sharded" in r or "TP rules" in r], reports
