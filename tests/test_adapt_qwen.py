"""Qwen2.5-VL's vision tower adapts end to end like the other families: LoRA on its fused qkv, partial blocks,
gradients through the window-permuted forward; language-model extraction points are refused for adaptation."""

from __future__ import annotations

import json

import pytest
import torch

from fmprobe.adapt.anatomy import hf_model
from fmprobe.adapt.lora import apply_lora, lora_targets
from fmprobe.backbones.registry import load_encoder
from fmprobe.config import LoraAdaptConfig, ModelConfig, parse_config
from fmprobe.errors import ConfigError
from fmprobe.experiments.run import run_experiment
from fmprobe.standin import models


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return models.qwen2_5_vl(tmp_path_factory.mktemp("qwen"))


def test_presets_name_the_fused_qkv_of_every_vision_block(qwen_dir):
    enc = load_encoder(ModelConfig(name=str(qwen_dir), image_size=56))
    assert lora_targets(enc, "qkv") == [f"blocks.{i}.attn.qkv" for i in range(3)]
    with pytest.raises(ConfigError, match="fused"):
        lora_targets(enc, "qv")


def test_lora_gradients_flow_through_the_windowed_tower_to_the_adapters_only(qwen_dir):
    enc = load_encoder(ModelConfig(name=str(qwen_dir), image_size=56, layers=[-1, "visual.merger"]))
    apply_lora(enc, LoraAdaptConfig(rank=2, targets="qkv"))
    out = enc.encode(torch.randn(2, 3, 56, 56), layers=[-1, "visual.merger"])
    (out.tokens["-1"].pow(2).mean() + out.tokens["visual.merger"].pow(2).mean()).backward()
    grads = {n for n, p in hf_model(enc).named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".lora_B." in n for n in grads)  # B starts at zero, so A gets no gradient yet
    assert {n.split(".attn")[0] for n in grads if ".lora_B." in n} == {"blocks.0", "blocks.1", "blocks.2"}


def test_language_model_points_are_refused_for_adaptation(qwen_dir):
    enc = load_encoder(ModelConfig(name=str(qwen_dir), image_size=56, layers=["model.language_model.layers.0"]))
    with pytest.raises(ConfigError, match="language-model"):
        hf_model(enc)


@pytest.mark.slow
def test_lora_run_on_the_vision_tower_completes_and_counts_parameters(toy_study, qwen_dir):
    cfg = toy_study("binary", n=48, model={"name": str(qwen_dir), "image_size": 56, "layers": [-1]},
                    train={"epochs": 2, "batch_size": 16, "lr": 0.01, "seeds": [0]},
                    adapt={"strategy": "lora", "lora": {"rank": 2, "targets": "qkv"}})  # fmt: skip
    result = run_experiment(parse_config(cfg), progress=False)
    info = json.loads((result.run_dir / "adaptation.json").read_text())["heads"]["linear"]["0"]
    lora_params = 3 * (32 * 2 + 2 * 96)  # blocks x (A: 32->2 + B: 2->3*32)
    assert info["trainable_params"] == lora_params + 32 + 1
    assert info["lora_targets"] == [f"blocks.{i}.attn.qkv" for i in range(3)]
    head = result.metrics["heads"]["linear"]
    low, high = head["test_ci"]["auroc"]
    assert low <= head["splits"]["test"]["mean"]["auroc"] <= high
