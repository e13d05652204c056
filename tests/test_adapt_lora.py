"""LoRA: presets per architecture, only adapter and head weights move, adapters saved and reloaded on their own."""

from __future__ import annotations

import copy

import pytest
import torch
from adapt_factories import blip2, dinov2, vjepa2

from fmprobe.adapt.lora import apply_lora, load_adapter, lora_targets, save_adapter
from fmprobe.adapt.model import AdaptModel
from fmprobe.adapt.setup import prepare
from fmprobe.config import HeadConfig, LoraAdaptConfig, parse_config
from fmprobe.errors import ConfigError
from fmprobe.heads import build_head


def experiment(train=None, **adapt):
    return parse_config({"name": "t", "data": {"manifest": "m.csv"}, "task": {"type": "binary", "targets": ["y"]},
                         "train": {"lr": 0.01, **(train or {})}, "adapt": adapt})  # fmt: skip


def test_presets_resolve_to_block_projections_per_family():
    enc = dinov2(blocks=2)
    assert lora_targets(enc, "qv") == [f"encoder.layer.{i}.attention.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert len(lora_targets(enc, "qkv")) == 6
    assert set(lora_targets(enc, "all-linear")) == {
        f"encoder.layer.{i}.{p}" for i in (0, 1)
        for p in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    }  # fmt: skip
    assert lora_targets(enc, r"encoder\.layer\.1\.mlp\.fc\d") == ["encoder.layer.1.mlp.fc1", "encoder.layer.1.mlp.fc2"]


def test_vjepa2_presets_stay_in_the_encoder_although_the_predictor_shares_the_names():
    enc = vjepa2()
    names = {n for n, _ in enc.model.named_modules()}
    assert "predictor.layer.0.attention.query" in names
    targets = lora_targets(enc, "qv")
    assert targets == [f"encoder.layer.{i}.attention.{p}" for i in (0, 1) for p in ("query", "value")]


def test_long_target_lists_adapt_exactly_the_encoder_modules():
    """peft shortens >= 20 targets to suffixes; the predictor's identically named modules must stay untouched."""
    enc = vjepa2(blocks=8)
    _, targets = apply_lora(enc, LoraAdaptConfig(rank=2, targets="qkv"))
    assert len(targets) == 24
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in enc.model.named_parameters() if ".lora_A." in n}
    assert adapted == set(targets) and not any(n.startswith("predictor.") for n in adapted)


def test_fused_qkv_takes_qkv_and_refuses_qv():
    enc = blip2()
    assert lora_targets(enc, "qkv") == ["encoder.layers.0.self_attn.qkv", "encoder.layers.1.self_attn.qkv"]
    with pytest.raises(ConfigError, match="fused.*targets: qkv"):
        lora_targets(enc, "qv")


@pytest.mark.parametrize("bad", ["nothing\\.here", "(unclosed"])
def test_a_regex_matching_nothing_or_invalid_is_refused(bad):
    with pytest.raises(ConfigError, match="adapt.lora.targets"):
        lora_targets(dinov2(), bad)


def test_lora_trains_only_adapters_and_head():
    enc = dinov2(blocks=2)
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    exp = experiment(strategy="lora", lora={"rank": 2, "targets": "qkv"}, adapters={"lr": 0.05})
    head_cfg = HeadConfig(pooling="cls+mean")
    head = build_head(head_cfg, 32, 1)
    prepared = prepare(exp, enc, head, head_cfg, steps_per_epoch=1)
    model = AdaptModel(enc, head, layer=-1, pooling="cls+mean", features=exp.features, standardise=None)
    optimizer = torch.optim.AdamW(prepared.groups, lr=0.0)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"]
    head_before = copy.deepcopy(head.state_dict())
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 1, 1, 3, 16, 16)).pow(2).mean().backward()
        optimizer.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n or n.startswith("head.") for n in with_grad)
    assert any(".lora_B." in n for n in with_grad) and any(n.startswith("head.") for n in with_grad)
    after = enc.model.state_dict()
    base_keys = [k for k in after if ".lora_" not in k]
    for key in base_keys:  # every backbone weight is untouched (peft keeps them under base_layer)
        assert torch.equal(after[key], before[key.replace(".base_layer", "")]), key
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if ".lora_B." in k)
    assert not torch.equal(head.state_dict()["fc.weight"], head_before["fc.weight"])
    lora_params = sum(p.numel() for n, p in enc.model.named_parameters() if ".lora_" in n)
    assert prepared.trainable == lora_params + sum(p.numel() for p in head.parameters())
    assert lora_params == 2 * 3 * (16 * 2 + 2 * 16)  # blocks x q,k,v x (A: 16->2, B: 2->16)


def test_adapter_saved_alone_reloads_to_the_same_outputs_and_merges(tmp_path):
    enc = dinov2(blocks=2)
    peft_model, _ = apply_lora(enc, LoraAdaptConfig(rank=2))
    with torch.no_grad():
        for n, p in enc.model.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    x = torch.randn(3, 3, 16, 16)
    want = enc.encode(x, [-1]).tokens["-1"]
    folder = save_adapter(peft_model, tmp_path / "adapter")
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    fresh = dinov2(blocks=2)
    assert not torch.allclose(fresh.encode(x, [-1]).tokens["-1"], want)
    load_adapter(fresh, folder)
    torch.testing.assert_close(fresh.encode(x, [-1]).tokens["-1"], want)
    merged = dinov2(blocks=2)
    load_adapter(merged, folder, merge=True)
    assert not any(".lora_" in n for n, _ in merged.model.named_parameters())
    torch.testing.assert_close(merged.encode(x, [-1]).tokens["-1"], want, atol=1e-5, rtol=1e-5)
