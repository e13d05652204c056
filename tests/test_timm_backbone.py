"""kind: timm: checkpoints loaded with every key accounted for, tokens equal to timm's own forward, prefix tokens
(CLS, registers) apart, the pretrained_cfg's preprocessing, attention maps, adaptation and a whole run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from backbone_factories import TINY_VIT, save_timm, timm_model
from test_adapt_lora import experiment

from fmprobe.adapt.lora import load_adapter, lora_targets, save_adapter
from fmprobe.adapt.model import AdaptModel
from fmprobe.adapt.partial import partial_modules, set_drop_path
from fmprobe.adapt.setup import prepare
from fmprobe.backbones.registry import load_encoder
from fmprobe.config import HeadConfig, ModelConfig, parse_config
from fmprobe.errors import ConfigError, EncoderError
from fmprobe.experiments.run import run_experiment
from fmprobe.heads import build_head


def load(section: dict, **more) -> torch.nn.Module:
    return load_encoder(ModelConfig(**{**section, **more}))


def test_tokens_prefix_and_pooled_equal_timms_own_forward_for_a_vit_with_registers(tmp_path):
    section = save_timm(tmp_path / "reg.pth", reg_tokens=4)
    ref = timm_model(reg_tokens=4)
    enc = load(section)
    assert enc.num_prefix == 5 and enc.num_points == 2  # CLS + 4 registers, 2 blocks
    x = torch.randn(2, 3, 32, 32)
    out = enc.encode(x, [0, 1, -2, -1, "pooled", "blocks.1.mlp"])
    with torch.no_grad():
        final = ref.forward_features(x)
        hidden = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
        blocks = [hidden := block(hidden) for block in ref.blocks]
        pooled = ref.forward_head(final, pre_logits=True)
    torch.testing.assert_close(out.tokens["-1"], final[:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(out.prefix["-1"], final[:, :5], rtol=0, atol=0)
    for key, block in (("0", blocks[0]), ("1", blocks[1]), ("-2", blocks[0])):
        torch.testing.assert_close(out.tokens[key], block[:, 5:])
        torch.testing.assert_close(out.prefix[key], block[:, :5])
    assert not torch.allclose(out.tokens["1"], out.tokens["-1"])  # -1 is after the final norm, block 1 before it
    torch.testing.assert_close(out.tokens["pooled"][:, 0], pooled)
    assert out.grid == {"0": (1, 4, 4), "1": (1, 4, 4), "-2": (1, 4, 4), "-1": (1, 4, 4), "pooled": (1, 1, 1),
                        "blocks.1.mlp": (1, 4, 4)}  # fmt: skip
    assert out.prefix["pooled"].shape == (2, 0, 32) and out.tokens["blocks.1.mlp"].shape == (2, 16, 32)
    with pytest.raises(EncoderError, match="out of range; the model has 2 extraction points"):
        enc.encode(x, [2])


def test_a_cnn_gives_its_stage_maps_as_tokens(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    torch.save(net.state_dict(), tmp_path / "r.pth")
    enc = load({"kind": "timm", "name": "resnet18", "weights": str(tmp_path / "r.pth"), "image_size": 64})
    x = torch.randn(1, 3, 64, 64)
    out = enc.encode(x, [2, -1])
    with torch.no_grad():
        final = net.forward_features(x)
    assert enc.num_prefix == 0 and out.grid == {"2": (1, 8, 8), "-1": (1, 2, 2)}
    torch.testing.assert_close(out.tokens["-1"], final.flatten(2).transpose(1, 2))


def test_retfound_style_checkpoint_needs_explicit_key_choices_and_reports_them(tmp_path, caplog):
    """RETFound: {'model': state} with an MAE decoder; DDP: 'module.' prefixes. Nothing is guessed."""
    extra = {"module.decoder_embed.weight": torch.zeros(4, 4), "module.mask_token": torch.zeros(1, 1, 32)}
    section = save_timm(tmp_path / "ret.pth", wrap="model", prefix="module.", extra=extra)
    with pytest.raises(EncoderError, match=r"not a flat state dict.*set model.weights_key to one of \['model'\]"):
        load(section)
    mismatch = r"0 tensors matched.*30 missing.*32 unexpected \(module\.blocks.*model.rename"
    with pytest.raises(EncoderError, match=mismatch):
        load(section, weights_key="model")
    enc = load(section, weights_key="model", drop_keys=[r"^module\.decoder", r"\.mask_token$"], rename={"module.": ""})
    report = enc.load_report
    assert report.dropped == ["module.decoder_embed.weight", "module.mask_token"]  # as stored in the file
    assert not report.missing and not report.unexpected
    assert report.renamed == report.loaded == len(timm_model().state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(x, [-1]).tokens["-1"], timm_model().forward_features(x)[:, 1:])
    # strict: false accepts the mismatch, but says so
    with caplog.at_level(logging.WARNING, logger="fmprobe"):
        lax = load(section, weights_key="model", rename={"module.": ""}, strict=False)
    assert lax.load_report.unexpected == ["decoder_embed.weight", "mask_token"]
    assert "model.strict is false" in caplog.text and "2 unexpected (decoder_embed.weight, mask_token)" in caplog.text


def test_a_checkpoints_classifier_is_dropped_and_listed_shapes_must_match(tmp_path):
    head = {"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
    enc = load(save_timm(tmp_path / "ft.pth", extra=head))
    assert enc.load_report.dropped == ["head.bias", "head.weight"]
    wide = save_timm(tmp_path / "wide.pth", embed_dim=48)
    with pytest.raises(EncoderError, match=r"other shapes than the model: cls_token \(1, 1, 48\) \(model \(1, 1, 32"):
        load(wide, args=TINY_VIT)


def test_hub_format_folder_loads_through_the_same_report_and_must_build_the_named_architecture(tmp_path):
    from timm.models import save_for_hf

    save_for_hf(timm_model(seed=3), str(tmp_path / "hub"), model_args=TINY_VIT)
    enc = load({"kind": "timm", "name": "vit_small_patch16_224", "weights": f"local-dir:{tmp_path / 'hub'}"})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(x, [-1]).tokens["-1"], timm_model(seed=3).forward_features(x)[:, 1:])
    assert not enc.load_report.missing and not enc.load_report.unexpected
    with pytest.raises(EncoderError, match="builds 'vit_small_patch16_224'; set model.name: vit_small_patch16_224"):
        load({"kind": "timm", "name": "vit_base_patch16_224", "weights": f"local-dir:{tmp_path / 'hub'}"})


def test_preprocessing_comes_from_the_pretrained_cfg_and_layer_args_are_imported(tmp_path):
    section = save_timm(tmp_path / "m.pth")
    spec = load(section).input_spec
    assert spec.mean == (0.5, 0.5, 0.5) and spec.image_size == (32, 32) and spec.patch_size == 8  # augreg default
    dino = load(section, name="vit_small_patch16_224.dino").input_spec  # the tag picks the DINO preprocessing
    assert dino.mean == pytest.approx((0.485, 0.456, 0.406)) and dino.std == pytest.approx((0.229, 0.224, 0.225))
    with pytest.raises(EncoderError, match="fixed 32x32 position table.*dynamic_img_size: true"):
        load(section, image_size=64)
    dynamic = save_timm(tmp_path / "d.pth", dynamic_img_size=True)
    assert load(dynamic, image_size=64).encode(torch.randn(1, 3, 64, 64), [-1]).grid["-1"] == (1, 8, 8)
    import timm

    swiglu = save_timm(tmp_path / "s.pth", mlp_layer=timm.layers.SwiGLUPacked, act_layer="silu")  # Virchow2, UNI2
    swiglu["args"]["mlp_layer"] = "timm.layers.SwiGLUPacked"  # as a config file writes it
    assert isinstance(load(swiglu).model.blocks[0].mlp, timm.layers.GluMlp)
    with pytest.raises(EncoderError, match="cannot import 'timm.layers.Nope'"):
        load(swiglu, args={**swiglu["args"], "mlp_layer": "timm.layers.Nope"})


def test_config_refuses_random_networks_and_loading_keys_without_weights():
    with pytest.raises(ValueError, match="kind: timm needs weights.*never probes a randomly initialised network"):
        ModelConfig(kind="timm", name="vit_small_patch16_224")
    with pytest.raises(ValueError, match="rename adjust loading model.weights, which is not set"):
        ModelConfig(kind="open_clip", name="hf-hub:org/repo", rename={"a": "b"})
    with pytest.raises(ValueError, match="args apply to kind timm, open_clip, python, monai"):
        ModelConfig(name="x", args={"depth": 2})


def test_attention_maps_are_timms_softmax_and_leave_the_tokens_unchanged(tmp_path):
    enc = load(save_timm(tmp_path / "m.pth", reg_tokens=1))
    x = torch.randn(2, 3, 32, 32)
    plain = enc.encode(x, [-1]).tokens["-1"]
    out = enc.encode(x, [-1], attentions=True)
    assert sorted(out.attentions) == ["0", "1"] and out.attentions["0"].shape == (2, 2, 18, 18)
    torch.testing.assert_close(out.attentions["1"].sum(-1), torch.ones(2, 2, 18))
    torch.testing.assert_close(out.tokens["-1"], plain, atol=1e-5, rtol=1e-5)
    attn = enc.model.blocks[0].attn  # recompute block 0's map from its own projections
    with torch.no_grad():
        h = enc.model.blocks[0].norm1(enc.model.norm_pre(enc.model._pos_embed(enc.model.patch_embed(x))))
        q, k, _ = attn.qkv(h).reshape(2, 18, 3, 2, 16).permute(2, 0, 3, 1, 4)
        want = (attn.q_norm(q) * attn.scale @ attn.k_norm(k).transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(out.attentions["0"], want)
    assert all(m.fused_attn for m in enc.model.modules() if hasattr(m, "fused_attn"))  # switched back on


@pytest.mark.slow
def test_retfound_architecture_vit_large_loads_and_matches_timm(tmp_path):
    """vit_large_patch16_224 (RETFound's encoder, 303M parameters), random, saved as RETFound ships it."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0).eval()
    torch.save({"model": net.state_dict() | {"decoder_pred.weight": torch.zeros(2, 2)}}, tmp_path / "RETFound.pth")
    enc = load_encoder(ModelConfig(kind="timm", name="vit_large_patch16_224.mae", weights_key="model",
                                   weights=str(tmp_path / "RETFound.pth"), drop_keys=["^decoder"]))
    assert enc.num_points == 24 and enc.input_spec.image_size == (224, 224)
    assert enc.input_spec.mean == pytest.approx((0.485, 0.456, 0.406))  # MAE / RETFound preprocessing
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        out = enc.encode(x, [-1, 23])
        final = net.forward_features(x)
    torch.testing.assert_close(out.tokens["-1"], final[:, 1:])
    torch.testing.assert_close(out.prefix["-1"], final[:, :1])
    assert out.tokens["23"].shape == (1, 196, 1024)


def test_lora_presets_partial_blocks_and_drop_path_on_a_timm_vit(tmp_path):
    section = save_timm(tmp_path / "m.pth")
    enc = load(section)
    assert lora_targets(enc, "qkv") == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    with pytest.raises(ConfigError, match="fused.*targets: qkv"):
        lora_targets(enc, "qv")
    assert partial_modules(enc, 1, -1) == ["blocks.1", "norm"] and partial_modules(enc, 1, 0) == ["blocks.0"]
    set_drop_path(enc, 0.2)
    assert [b.drop_path2.drop_prob for b in enc.model.blocks] == pytest.approx([0.0, 0.2])

    enc = load(section)
    exp = experiment(strategy="lora", lora={"rank": 2, "targets": "qkv"}, adapters={"lr": 0.05})
    head_cfg = HeadConfig(pooling="cls+mean")
    head = build_head(head_cfg, 64, 1)  # [CLS, patch mean] of 32 dims each
    prepared = prepare(exp, enc, head, head_cfg, steps_per_epoch=1)
    model = AdaptModel(enc, head, layer=-1, pooling="cls+mean", features=exp.features, standardise=None)
    optimizer = torch.optim.AdamW(prepared.groups, lr=0.0)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"]
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 1, 1, 3, 32, 32)).pow(2).mean().backward()
        optimizer.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n or n.startswith("head.") for n in with_grad)
    lora_params = sum(p.numel() for n, p in enc.model.named_parameters() if ".lora_" in n)
    assert lora_params == 2 * (32 * 2 + 2 * 96) and prepared.trainable == lora_params + 65  # qkv: 32 -> 96
    x = torch.randn(2, 3, 32, 32)
    want = enc.encode(x, [-1]).tokens["-1"].detach()
    folder = save_adapter(prepared.peft_model, tmp_path / "adapter")
    fresh = load(section)
    assert not torch.allclose(fresh.encode(x, [-1]).tokens["-1"], want)
    load_adapter(fresh, folder)
    torch.testing.assert_close(fresh.encode(x, [-1]).tokens["-1"], want)


def test_probe_and_lora_runs_on_a_timm_vit(toy_study, tmp_path):
    section = save_timm(tmp_path / "m.pth", reg_tokens=4)
    frozen = run_experiment(parse_config(toy_study(
        "binary", n=48, model={**section, "layers": [-1, "pooled"]},
        heads=[{"type": "linear", "pooling": "cls+mean"}, {"type": "attentive", "pooling": "attentive"},
               {"type": "linear", "name": "pooled", "layer": "pooled"}],
        train={"epochs": 3, "seeds": [0]})), progress=False)  # fmt: skip
    heads = frozen.metrics["heads"]
    assert set(heads) == {"linear", "attentive", "pooled"}
    assert all(np.isfinite(h["splits"]["test"]["mean"]["auroc"]) for h in heads.values())
    adapted = run_experiment(parse_config(toy_study(
        "binary", n=48, name="lora", model=section, train={"epochs": 2, "seeds": [0]},
        adapt={"strategy": "lora", "lora": {"rank": 2, "targets": "qkv"}})), progress=False)  # fmt: skip
    info = json.loads((adapted.run_dir / "adaptation.json").read_text())["heads"]["linear"]["0"]
    assert info["lora_targets"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert (adapted.run_dir / info["adapter_dir"] / "adapter_config.json").exists()
