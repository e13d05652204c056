"""kind: python: a factory's module read through its declared contract (tokens + grid + prefix, pooled, feature
map), weights loaded with the report, and clear errors when the module returns something else."""

from __future__ import annotations

import pytest
import torch
from custom_models import PatchTokens

from fmprobe.backbones.registry import load_encoder
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

IMAGE = {"input": "image", "size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
TOKENS = {**IMAGE, "output": "tokens", "patch_size": [8, 8], "prefix_tokens": 1, "blocks": "blocks"}


def python_model(factory: str, contract: dict, **more) -> ModelConfig:
    return ModelConfig(kind="python", factory=f"custom_models:{factory}", contract=contract, **more)


def test_tokens_contract_splits_the_prefix_and_reads_blocks_and_weights(tmp_path):
    torch.manual_seed(5)
    trained = PatchTokens(16)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "ours.pt")
    enc = load_encoder(python_model("tokens", TOKENS, weights=str(tmp_path / "ours.pt"), weights_key="state_dict"))
    assert enc.name == "custom_models:tokens" and enc.input_spec.mean == (0.5, 0.5, 0.5) and enc.num_points == 2
    assert enc.load_report.loaded == len(trained.state_dict()) and not enc.load_report.missing
    x = torch.randn(2, 3, 32, 32)
    out = enc.encode(x, [-1, 0, "embed"])
    with torch.no_grad():
        want = trained(x)
        embedded = torch.cat([trained.cls.expand(2, -1, -1), trained.embed(x).flatten(2).transpose(1, 2)], 1)
        first = trained.blocks[0](embedded)  # what module blocks.0 outputs
    torch.testing.assert_close(out.tokens["-1"], want[:, 1:])
    torch.testing.assert_close(out.prefix["-1"], want[:, :1])
    torch.testing.assert_close(out.tokens["0"], first[:, 1:])
    assert out.grid == {"-1": (1, 4, 4), "0": (1, 4, 4), "embed": (1, 4, 4)}  # the conv's map, flattened
    assert out.tokens["embed"].shape == (2, 16, 16) and out.prefix["embed"].shape == (2, 0, 16)


def test_pooled_and_feature_map_contracts():
    pooled = load_encoder(python_model("pooled", {**IMAGE, "output": "pooled"}))
    out = pooled.encode(torch.randn(3, 3, 32, 32), [-1])
    assert out.tokens["-1"].shape == (3, 1, 16) and out.grid["-1"] == (1, 1, 1)
    with pytest.raises(EncoderError, match="no numbered extraction points .*declare model.contract.blocks"):
        pooled.encode(torch.randn(1, 3, 32, 32), [0])
    volume = {"input": "volume", "size": [32, 32, 32], "output": "feature_map"}
    swin = load_encoder(python_model("swin_encoder", volume))
    assert swin.input_spec.kind == "volume" and swin.input_spec.volume_size == (32, 32, 32)
    out = swin.encode(torch.randn(1, 1, 32, 32, 32), [-1])
    assert out.tokens["-1"].shape == (1, 8, 96) and out.grid["-1"] == (2, 2, 2)


@pytest.mark.parametrize("factory, contract, match", [
    ("two_outputs", TOKENS, r"contract says output: tokens \[B, N, D\], but the module returned a tuple of 2 "
                            r"\(\(2, 17, 16\), list\)"),
    ("tokens", {**TOKENS, "output": "pooled", "patch_size": None, "prefix_tokens": 0, "blocks": None},
     r"output: pooled \[B, D\], but the module returned a tensor shaped \(2, 17, 16\)"),
    ("tokens", {**TOKENS, "prefix_tokens": 2}, r"outputs shape \(2, 17, 16\), not tokens \[B, 2 prefix \+ 16 patch"),
])  # fmt: skip
def test_a_module_returning_something_else_than_declared_is_refused(factory, contract, match):
    enc = load_encoder(python_model(factory, contract))
    with pytest.raises(EncoderError, match=match):
        enc.encode(torch.randn(2, 3, 32, 32), [-1])


def test_factory_errors_name_what_to_fix():
    with pytest.raises(EncoderError, match="cannot import 'no_such_package.models'.*PYTHONPATH"):
        load_encoder(ModelConfig(kind="python", factory="no_such_package.models:build", contract=TOKENS))
    with pytest.raises(EncoderError, match="'custom_models' has no function 'nope'"):
        load_encoder(python_model("nope", TOKENS))
    with pytest.raises(EncoderError, match="returned a str, not a torch nn.Module"):
        load_encoder(python_model("not_a_module", TOKENS))
    with pytest.raises(ValueError, match="kind: python takes factory"):
        ModelConfig(kind="python", factory="custom_models:tokens")
    with pytest.raises(ValueError, match="output: tokens needs patch_size"):
        ModelConfig(kind="python", factory="custom_models:tokens", contract={**IMAGE, "output": "tokens"})
    with pytest.raises(ValueError, match="an image input needs mean and std"):
        ModelConfig(kind="python", factory="custom_models:pooled", contract={"size": [32, 32], "output": "pooled"})


def test_the_factory_source_is_part_of_the_fingerprint(monkeypatch):
    import custom_models

    from fmprobe.backbones import python_encoder

    cfg = python_model("tokens", TOKENS)
    before = load_encoder(cfg).fingerprint()
    assert load_encoder(cfg).fingerprint() == before
    monkeypatch.setattr(python_encoder.inspect, "getsource", lambda m: "edited " + open(custom_models.__file__).read())
    assert load_encoder(cfg).fingerprint() != before
