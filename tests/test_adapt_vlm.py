"""The VLM towers adapt like the other families: LoRA presets on CLIP's q_proj/v_proj (LLaVA-NeXT), InternVL's
q/k/v and the fused qkv of InternViT / EVA2-CLIP in remote code; partial blocks counted back from a tower point;
gradients reach the adapters through the tiled forward; language-model points are refused for adaptation."""

from __future__ import annotations

import pytest
import torch

from fmprobe.adapt.anatomy import hf_model, num_blocks
from fmprobe.adapt.lora import apply_lora, lora_targets
from fmprobe.adapt.partial import partial_modules
from fmprobe.backbones.registry import load_encoder
from fmprobe.config import LoraAdaptConfig, ModelConfig
from fmprobe.errors import ConfigError
from fmprobe.standin import models, remote

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {"llava_next": models.llava_next(root / "llava_next"), "internvl": models.internvl(root / "internvl"),
            "internvl2": remote.internvl2(root / "internvl2"), "cogvlm2": remote.cogvlm2(root / "cogvlm2")}  # fmt: skip


def _encoder(path, layers, remote_code=False):
    return load_encoder(ModelConfig(name=str(path), layers=layers, trust_remote_code=remote_code))


def test_presets_name_each_towers_attention_projections(dirs):
    llava = _encoder(dirs["llava_next"], ["-2@tiles"])
    assert sorted(lora_targets(llava, "qv")) == [f"encoder.layers.{i}.self_attn.{p}" for i in range(3)
                                                 for p in ("q_proj", "v_proj")]  # fmt: skip
    internvl = _encoder(dirs["internvl"], ["-1@tiles"])
    assert sorted(lora_targets(internvl, "qkv")) == [f"encoder.layer.{i}.attention.{p}" for i in range(3)
                                                     for p in ("k_proj", "q_proj", "v_proj")]  # fmt: skip
    internvit = _encoder(dirs["internvl2"], ["-1@tiles"], remote_code=True)
    assert lora_targets(internvit, "qkv") == [f"encoder.layers.{i}.attn.qkv" for i in range(3)]
    with pytest.raises(ConfigError, match="fused.*targets: qkv"):
        lora_targets(internvit, "qv")
    eva = _encoder(dirs["cogvlm2"], [-1], remote_code=True)
    assert lora_targets(eva, "qkv") == [f"transformer.layers.{i}.attention.query_key_value" for i in range(3)]
    assert num_blocks(eva) == 3 and hf_model(eva) is eva.model.model.vision


@pytest.mark.parametrize("family,point", [("llava_next", "-2@tiles"), ("internvl2", "mlp1@tiles"),
                                          ("cogvlm2", "model.vision.linear_proj")])  # fmt: skip
def test_lora_gradients_flow_through_the_tiled_forward_to_the_tower_adapters_only(dirs, family, point):
    enc = _encoder(dirs[family], [point], remote_code=family != "llava_next")
    _, targets = apply_lora(enc, LoraAdaptConfig(rank=2, targets="qv" if family == "llava_next" else "qkv"))
    out = enc.encode(torch.randn(2, 3, 128, 128), [point])
    out.tokens[point].pow(2).mean().backward()
    grads = {n for n, p in enc.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".lora_B." in n for n in grads)  # B starts at zero: A gets no gradient yet
    n_blocks = num_blocks(enc)
    reached = {int(n.split(".layers.")[1].split(".")[0]) for n in grads}
    # -2 reads block 1: the last block does not feed it; the projectors read the last block
    assert reached == (set(range(n_blocks - 1)) if point.startswith("-2") else set(range(n_blocks)))


def test_partial_blocks_count_back_from_a_tower_point_and_lm_points_are_refused(dirs):
    enc = _encoder(dirs["llava_next"], ["-2@tiles"])
    assert partial_modules(enc, 2, "-2@tiles") == ["encoder.layers.0", "encoder.layers.1"]
    assert partial_modules(enc, 1, "model.vision_tower.encoder.layers.2.mlp@base") == ["encoder.layers.2"]
    with pytest.raises(ConfigError, match="must be a vision-tower block of .* not 'model.multi_modal_projector@base'"):
        partial_modules(enc, 1, "model.multi_modal_projector@base")
    with pytest.raises(ConfigError, match="only 2 blocks feed it"):
        partial_modules(enc, 3, "-2@base")
    lm = _encoder(dirs["llava_next"], ["model.language_model.layers.0@tiles"])
    with pytest.raises(ConfigError, match="model.layers reads language-model points"):
        hf_model(lm)


@pytest.mark.slow
def test_lora_run_on_the_llava_next_tower_completes_and_counts_parameters(toy_study, dirs):
    import json

    from fmprobe.config import parse_config
    from fmprobe.experiments.run import run_experiment

    cfg = toy_study("binary", n=48, model={"name": str(dirs["llava_next"]), "layers": ["-2@tiles"]},
                    heads=[{"type": "linear", "layer": "-2@tiles"}],
                    train={"epochs": 2, "batch_size": 16, "lr": 0.01, "seeds": [0]},
                    adapt={"strategy": "lora", "lora": {"rank": 2, "targets": "qv"}})  # fmt: skip
    result = run_experiment(parse_config(cfg), progress=False)
    info = json.loads((result.run_dir / "adaptation.json").read_text())["heads"]["linear"]["0"]
    lora_params = 3 * 2 * (32 * 2 + 2 * 32)  # blocks x (q, v) x (A: 32->2 + B: 2->32)
    assert info["trainable_params"] == lora_params + 32 + 1
    head = result.metrics["heads"]["linear"]
    low, high = head["test_ci"]["auroc"]
    assert low <= head["splits"]["test"]["mean"]["auroc"] <= high
