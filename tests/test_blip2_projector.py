"""BLIP-2's projector (query tokens, Q-Former, language projection) as extraction points and as trainable modules:
its tokens equal transformers' own, it is read from full (also sharded) checkpoints only, its query tokens carry
no spatial grid (pooled yes, spatial no), its weights are in the fingerprint, and adaptation trains it alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Model,
    Blip2VisionModel,
    Blip2VisionModelWithProjection,
)

from fmprobe.adapt.model import AdaptModel, encoder_inputs
from fmprobe.adapt.setup import prepare
from fmprobe.backbones.registry import load_encoder
from fmprobe.config import FeatureConfig, HeadConfig, ModelConfig, parse_config
from fmprobe.diagnostics.spatial_run import encode_all
from fmprobe.errors import EncoderError
from fmprobe.features.extract import encode_batch
from fmprobe.features.store import FeatureStore
from fmprobe.heads import build_head
from fmprobe.train.optim import GroupAdamW

POINTS = ["qformer", "language_projection"]
LM_HIDDEN = 24  # unlike the Q-Former's 32, so the two points are told apart by their width


def _config() -> Blip2Config:
    return Blip2Config(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8, initializer_range=0.02),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            vocab_size=100, encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=LM_HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                         ffn_dim=48, vocab_size=100, word_embed_proj_dim=LM_HIDDEN),
        num_query_tokens=4,
    )  # fmt: skip


def _saved(cls, folder: Path, **save) -> Path:
    torch.manual_seed(0)
    model = cls(_config()).eval()
    with torch.no_grad():  # transformers starts query tokens at zero: every query would be the same token
        model.query_tokens.normal_(std=0.5)
    model.save_pretrained(folder, **save)
    return folder


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved(Blip2Model, tmp_path_factory.mktemp("blip2"))


def _encoder(source: Path, layers=(-1, *POINTS)):
    return load_encoder(ModelConfig(name=str(source), layers=list(layers)))


def test_projector_tokens_equal_transformers_own(full: Path) -> None:
    reference = Blip2Model.from_pretrained(full).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = _encoder(full).encode(pixels, [-1, *POINTS])
        queries = reference.get_qformer_features(pixel_values=pixels)
        tower = reference.vision_model(pixel_values=pixels).last_hidden_state
        # Blip2Model.forward's step 3: the Q-Former output in the tower's dtype, through the language projection
        projected = reference.language_projection(queries.to(tower.dtype))
    torch.testing.assert_close(out.tokens["qformer"], queries)
    torch.testing.assert_close(out.tokens["language_projection"], projected)
    assert out.tokens["qformer"].shape == (3, 4, 32) and out.tokens["language_projection"].shape == (3, 4, LM_HIDDEN)
    assert out.grid["qformer"] is None and out.prefix["qformer"].shape == (3, 0, 32)
    torch.testing.assert_close(torch.cat([out.prefix["-1"], out.tokens["-1"]], 1), tower)
    assert out.grid["-1"] == (1, 4, 4)
    # asked alone, the points need no tower layer in the output
    alone = _encoder(full).encode(pixels, ["language_projection"])
    assert set(alone.tokens) == {"language_projection"}


def test_sharded_conditional_generation_checkpoint_loads_the_projector_without_the_language_model(tmp_path) -> None:
    source = _saved(Blip2ForConditionalGeneration, tmp_path / "sharded", max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").exists()
    reference = Blip2ForConditionalGeneration.from_pretrained(source).eval()
    enc = _encoder(source, POINTS)
    assert not any("language_model" in name for name, _ in enc.named_parameters())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        projected = reference.get_image_features(pixel_values=pixels).pooler_output  # the LM's image tokens
        torch.testing.assert_close(enc.encode(pixels, ["language_projection"]).tokens["language_projection"],
                                   projected)  # fmt: skip


def test_checkpoints_without_a_projector_are_refused_with_what_to_do(tmp_path, full: Path) -> None:
    tower = tmp_path / "tower"
    Blip2VisionModel(_config().vision_config).save_pretrained(tower)
    with pytest.raises(EncoderError, match="vision tower alone.*full BLIP-2 checkpoint"):
        _encoder(tower, ["qformer"])
    retrieval = _saved(Blip2VisionModelWithProjection, tmp_path / "itm")  # Q-Former, but no language projection
    with pytest.raises(EncoderError, match="holds no language_projection.weight.*remove the qformer"):
        _encoder(retrieval, ["qformer"])
    # a tower-only encoder never loads the projector, so it cannot be read later either
    with pytest.raises(EncoderError, match="projector, which was not loaded"):
        _encoder(full, [-1]).encode(torch.randn(1, 3, 32, 32), ["qformer"])


def test_fingerprint_covers_the_projector(full: Path) -> None:
    enc = _encoder(full)
    before = enc.fingerprint()
    assert before != _encoder(full, [-1]).fingerprint()  # the tower alone is another model
    for param in (enc.projector.qformer.encoder.layer[0].crossattention.attention.query.weight,
                  enc.projector.language_projection.bias, enc.projector.query_tokens):  # fmt: skip
        with torch.no_grad():
            param.add_(0.01)
        after = enc.fingerprint()
        assert after != before
        before = after


def test_query_tokens_pool_but_refuse_spatial_use(full: Path, tmp_path) -> None:
    enc = _encoder(full)
    pixels = torch.randn(2, 1, 3, 3, 32, 32)  # 2 samples x 1 clip x 3 slices
    arrays, grids = encode_batch(enc, pixels, ["qformer", -1], FeatureConfig())
    assert grids == {"qformer": None, "-1": (3, 4, 4)}
    assert arrays["L0.tokens"].shape == (2, 3 * 4, 32) and "L0.cls" not in arrays  # each slice's query set
    np.testing.assert_allclose(arrays["L0.mean"], arrays["L0.tokens"].astype(np.float32).mean(1), atol=1e-2)
    # an attentive head in adaptation gets the same token set; mean pooling its mean
    feats = FeatureConfig()
    assert encoder_inputs(enc, pixels, "qformer", "attentive", feats).shape == (2, 12, 32)
    with pytest.raises(EncoderError, match="point 'qformer' yields a set of tokens with no spatial grid"):
        encode_batch(enc, pixels, ["qformer"], FeatureConfig(token_grid=[2, 2]))
    with pytest.raises(EncoderError, match="no spatial grid.*temporal_pool"):
        encoder_inputs(enc, pixels, "qformer", "attentive", FeatureConfig(temporal_pool=True))
    with pytest.raises(EncoderError, match="no spatial grid.*spatial probes"):
        encode_all(enc, np.zeros((2, 3, 32, 32), dtype=np.uint8), ["qformer"])
    # the store keeps the missing grid as such: readers get None, not a made-up 1 x N image
    store = FeatureStore(tmp_path / "store", {"layers": ["qformer", "-1"], "features": {"store_tokens": True}})
    with store.writer(shard_size=8) as writer:
        writer.add(["a", "b"], ["fa", "fb"], arrays, grids)
    features = store.feature_set([("a", "fa"), ("b", "fb")])
    assert features.grid("qformer") is None and features.grid("-1") == (3, 4, 4)
    assert features.tokens("qformer").shape == (2, 12, 32)


def _projector_arm(modules: dict) -> tuple:
    exp = parse_config({"name": "x", "data": {"manifest": "m.csv"}, "task": {"type": "regression", "targets": ["age"]},
                        "train": {"lr": 0.01, "weight_decay": 0},
                        "adapt": {"strategy": "partial", "partial_blocks": 0, "modules": modules}})  # fmt: skip
    return exp, HeadConfig(layer="language_projection")


def test_projector_arm_trains_the_projector_and_ln_vision_only(full: Path) -> None:
    enc = _encoder(full, ["language_projection"])
    exp, head_cfg = _projector_arm({"projector": {"lr": 1e-3}, "post_layernorm": {"lr": 1e-4}})
    head = build_head(head_cfg, LM_HIDDEN, 1)
    prepared = prepare(exp, enc, head, head_cfg, steps_per_epoch=1)
    lrs = {g["kind"]: g["base_lr"] for g in prepared.groups}
    assert lrs == {"head": 0.01, "module:projector": 1e-3, "module:post_layernorm": 1e-4}
    grouped = {g["kind"]: {id(p) for p in g["params"]} for g in prepared.groups}
    assert grouped["module:projector"] == {id(p) for p in enc.projector.parameters()}
    assert id(enc.projector.query_tokens) in grouped["module:projector"]

    before = {name: p.detach().clone() for name, p in enc.model.named_parameters()}
    model = AdaptModel(enc, head, layer="language_projection", pooling="mean", features=exp.features,
                       standardise=None).train()  # fmt: skip
    optimizer = GroupAdamW(prepared.groups)
    optimizer.set_lrs(0, 10, np.ones(1, dtype=bool))
    model(torch.randn(2, 1, 1, 3, 32, 32)).pow(2).sum().backward()
    optimizer.step()
    changed = {name for name, p in enc.model.named_parameters() if not torch.equal(p, before[name])}
    assert {"projector.query_tokens", "projector.language_projection.weight", "post_layernorm.weight"} <= changed
    assert any(name.startswith("projector.qformer.encoder.layer.") for name in changed)
    assert all(name.startswith(("projector.", "post_layernorm.")) for name in changed)  # no ViT block moved
    assert not any(name.startswith(("encoder.layers.", "embeddings.")) for name in changed)


def test_projector_module_paths_resolve_and_unknown_ones_are_refused(full: Path) -> None:
    enc = _encoder(full, ["language_projection"])
    exp, head_cfg = _projector_arm({"projector.qformer": {"lr": 1e-5}, "projector.language_projection": {"lr": 1e-6}})
    prepared = prepare(exp, enc, build_head(head_cfg, LM_HIDDEN, 1), head_cfg, steps_per_epoch=1)
    assert {g["kind"]: g["base_lr"] for g in prepared.groups if g["kind"].startswith("module:")} == {
        "module:projector.qformer": 1e-5, "module:projector.language_projection": 1e-6}
    exp, head_cfg = _projector_arm({"q_former": {"lr": 1e-4}})
    with pytest.raises(EncoderError, match="has no module 'q_former'"):
        prepare(exp, _encoder(full, ["language_projection"]), build_head(head_cfg, LM_HIDDEN, 1), head_cfg,
                steps_per_epoch=1)  # fmt: skip
