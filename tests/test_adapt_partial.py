"""Partial unfreezing, parameter groups (named modules, layer-wise decay, unfreeze_at_epoch), drop-path,
gradient checkpointing, and the runtime refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapt_factories import clip, dinov2
from test_adapt_lora import experiment

from fmprobe.adapt.finetune import runtime
from fmprobe.adapt.model import AdaptModel
from fmprobe.train.optim import GroupAdamW
from fmprobe.adapt.setup import prepare
from fmprobe.config import HeadConfig
from fmprobe.errors import ConfigError
from fmprobe.heads import build_head


def trained(exp, enc, layer=-1):
    """Backward once through encoder + head; the encoder parameter names that received a gradient."""
    head_cfg = HeadConfig(layer=layer)
    head = build_head(head_cfg, 16, 1)
    prepared = prepare(exp, enc, head, head_cfg, steps_per_epoch=2)
    model = AdaptModel(enc, head, layer=layer, pooling="mean", features=exp.features, standardise=None)
    model(torch.randn(2, 1, 1, 3, 16, 16)).sum().backward()
    return {n for n, p in enc.model.named_parameters() if p.grad is not None}, prepared


def test_partial_trains_exactly_the_last_blocks_and_the_final_norm():
    enc = dinov2(blocks=3)
    got, prepared = trained(experiment(strategy="partial", partial_blocks=2), enc)
    want = {n for n, _ in enc.model.named_parameters() if n.startswith(("encoder.layer.1.", "encoder.layer.2.",
                                                                           "layernorm."))}  # fmt: skip
    assert got == want
    assert prepared.partial_modules == ["encoder.layer.1", "encoder.layer.2", "layernorm"]
    assert prepared.trainable == sum(p.numel() for n, p in enc.model.named_parameters() if n in want) + 17


def test_partial_counts_back_from_the_layer_the_head_reads():
    enc = dinov2(blocks=3)
    got, _ = trained(experiment(strategy="partial", partial_blocks=1), enc, layer=1)
    assert got == {n for n, _ in enc.model.named_parameters() if n.startswith("encoder.layer.1.")}
    with pytest.raises(ConfigError, match="at most 2"):
        trained(experiment(strategy="partial", partial_blocks=3), dinov2(blocks=3), layer=1)


def test_named_module_gets_its_own_group_and_trains():
    enc = dinov2(blocks=3)
    exp = experiment(strategy="partial", partial_blocks=1, modules={"embeddings.patch_embeddings": {"lr": 0.5}})
    got, prepared = trained(exp, enc)
    assert {"embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias"} <= got
    group = [g for g in prepared.groups if g["kind"] == "module:embeddings.patch_embeddings"]
    assert group and all(g["base_lr"] == 0.5 for g in group)


def test_layer_wise_decay_scales_each_block_from_the_top():
    exp = experiment(strategy="partial", partial_blocks=3, layer_decay=0.5, backbone={"lr": 1.0, "weight_decay": 0})
    enc = dinov2(blocks=3)
    _, prepared = trained(exp, enc)
    lr = {g["name"]: g["base_lr"] for g in prepared.groups}
    # 3 blocks: final norm depth 0, block 2 depth 1, block 1 depth 2, block 0 depth 3
    assert lr == {"head/depth0": 0.01, "head/depth0/no_decay": 0.01, "backbone/depth0/no_decay": 1.0,
                  "backbone/depth1/no_decay": 0.5, "backbone/depth2/no_decay": 0.25, "backbone/depth3/no_decay": 0.125}
    groups = {g["name"]: {id(p) for p in g["params"]} for g in prepared.groups}
    assert groups["backbone/depth0/no_decay"] == {id(p) for p in enc.model.layernorm.parameters()}
    assert groups["backbone/depth3/no_decay"] == {id(p) for p in enc.model.encoder.layer[0].parameters()}


def test_unfreeze_at_epoch_keeps_the_backbone_still_until_then():
    exp = experiment(strategy="partial", partial_blocks=1, unfreeze_at_epoch=2, backbone={"warmup_epochs": 1},
                     train={"epochs": 3})  # fmt: skip
    enc = dinov2(blocks=2)
    _, prepared = trained(exp, enc)
    optimizer = GroupAdamW(prepared.groups)
    everyone = np.ones(1, dtype=bool)
    optimizer.set_lrs(1, 6, everyone)  # epoch 1 (2 steps per epoch)
    assert all((g["lr"] == 0) == (g["kind"] == "backbone") for g in optimizer.torch.param_groups)
    prepared.gate(1)
    assert not any(p.requires_grad for n, p in enc.model.named_parameters())
    optimizer.set_lrs(2, 6, everyone)  # first step of epoch 2: backbone warmup starts at 1/2
    backbone = [g for g in optimizer.torch.param_groups if g["kind"] == "backbone"]
    assert all(g["lr"] == pytest.approx(g["base_lr"] / 2) for g in backbone)
    prepared.gate(2)
    assert all(p.requires_grad for n, p in enc.model.named_parameters() if n.startswith("encoder.layer.1."))


def test_drop_path_uses_the_family_module_and_is_refused_without_one():
    enc = dinov2(blocks=3)
    trained(experiment(strategy="partial", drop_path=0.2), enc)
    rates = [b.drop_path.drop_prob for b in enc.model.encoder.layer]
    assert rates == pytest.approx([0.0, 0.1, 0.2]) and type(enc.model.encoder.layer[0].drop_path).__name__ == (
        "Dinov2DropPath")
    with pytest.raises(ConfigError, match="no drop-path"):
        trained(experiment(strategy="partial", drop_path=0.2), clip())


def test_gradient_checkpointing_turns_on_and_keeps_gradients():
    enc = dinov2(blocks=2)
    got, _ = trained(experiment(strategy="partial", partial_blocks=2, gradient_checkpointing=True), enc)
    assert enc.model.is_activation_checkpointing and "encoder.layer.0.mlp.fc1.weight" in got


@pytest.mark.parametrize("adapt, match", [
    ({"strategy": "lora", "precision": "bf16", "device": "cpu"}, "precision bf16.*fp32 on CPU"),
    ({"strategy": "lora", "device": "nonsense"}, "not a torch device"),
])  # fmt: skip
def test_runtime_refuses_what_no_machine_can_honour(adapt, match):
    with pytest.raises(ConfigError, match=match):
        runtime(experiment(**adapt))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: adapt.device cuda can be honoured")
def test_runtime_refuses_cuda_without_a_gpu():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        runtime(experiment(strategy="lora", device="cuda"))


def test_frozen_refuses_adapt_keys_and_strategies_refuse_foreign_ones():
    with pytest.raises(ConfigError, match="need an end-to-end strategy"):
        experiment(lora={"rank": 4})
    with pytest.raises(ConfigError, match="partial_blocks do not apply to strategy lora"):
        experiment(strategy="lora", partial_blocks=3)
    with pytest.raises(ConfigError, match="unfreeze_at_epoch do not apply to strategy staged"):
        experiment(strategy="staged", unfreeze_at_epoch=3)
