"""The extraction loop over real PNG files with a tiny ViT-like encoder (no hub, no download)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from fmprobe.backbones.base import Encoder, EncoderOutput, InputSpec
from fmprobe.data.manifest import load_manifest
from fmprobe.config import parse_config
from fmprobe.errors import ConfigError, ReaderError
from fmprobe.features.extract import check_compatible, encode_batch, extract_features, run_extraction

D = 16


class TinyViT(Encoder):
    """Conv patch embedding + CLS + 2 transformer layers; counts the samples it encodes."""

    def __init__(self, seed: int = 0, kind: str = "image", cls_token: bool = True, mean: float = 0.5):
        super().__init__()
        torch.manual_seed(seed)
        self.name = f"tiny-{kind}"
        self.input_spec = InputSpec(kind=kind, image_size=(16, 16), mean=(mean,) * 3, std=(0.25,) * 3, patch_size=4)
        self.embed = nn.Conv2d(3, D, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, D)) if cls_token else None
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(D, 2, 32, dropout=0.1, batch_first=True) for _ in range(2)
        )
        self.calls = 0
        self.seen = 0

    def encode(self, pixels, layers, attentions=False):
        self.check_input(pixels)
        self.calls += 1
        self.seen += pixels.shape[0]
        video = pixels.dim() == 5
        b, t = pixels.shape[0], pixels.shape[1] if video else 1
        x = self.embed(pixels.reshape(-1, *pixels.shape[-3:]))  # [b*t, D, 4, 4]
        x = x.flatten(2).transpose(1, 2).reshape(b, t * 16, D)
        p = 0
        if self.cls is not None:
            x, p = torch.cat([self.cls.expand(b, -1, -1), x], 1), 1
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        out = EncoderOutput(tokens={}, prefix={}, grid={})
        for ref in layers:
            h = hidden[int(ref)]
            out.tokens[str(ref)], out.prefix[str(ref)], out.grid[str(ref)] = h[:, p:], h[:, :p], (t, 4, 4)
        return out

    def fingerprint(self):
        digest = hashlib.sha256(repr(self.input_spec).encode())
        for key, value in self.state_dict().items():
            digest.update(key.encode() + value.numpy().tobytes())
        return digest.hexdigest()


def write_images(folder: Path, n: int, seed: int = 0) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
        rows.append({"sample_id": f"s{i:03d}", "path": str(path), "y": i % 2, "group": f"s{i:03d}", "split": None})
    return pd.DataFrame(rows)


def make_exp(cache: Path, layers=(-1,), **features):
    feats = {"cache_dir": str(cache), "batch_size": 2, "shard_size": 4, **features}
    return parse_config({
        "name": "t",
        "data": {"manifest": "unused.csv", "on_error": features.pop("on_error", "raise")},
        "task": {"type": "binary", "targets": ["y"]},
        "model": {"layers": list(layers)},
        "features": {k: v for k, v in feats.items() if k != "on_error"},
        "heads": [{"layer": layers[0]}],
    })


def manifest(df):
    return types.SimpleNamespace(df=df)


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "img", 10)


def _arrays(fs, layer=-1):
    return fs.pooled(layer, "mean"), fs.pooled(layer, "cls"), fs.tokens(layer)


def test_cache_hit_serves_identical_arrays_without_the_encoder(tmp_path, images):
    exp = make_exp(tmp_path / "cache")
    first_encoder = TinyViT()
    first = extract_features(exp, manifest(images), first_encoder, progress=False)
    assert first_encoder.seen == 10 and first.sample_ids == images.sample_id.tolist()
    again = TinyViT()
    second = extract_features(exp, manifest(images), again, progress=False)
    assert again.calls == 0
    for a, b in zip(_arrays(first), _arrays(second)):
        np.testing.assert_array_equal(a, b)


def test_fully_cached_run_does_not_load_the_model(tmp_path, images, monkeypatch):
    try:
        registry = importlib.import_module("fmprobe.backbones.registry")
    except ImportError:
        registry = types.ModuleType("fmprobe.backbones.registry")
        monkeypatch.setitem(sys.modules, "fmprobe.backbones.registry", registry)
    loads = []
    monkeypatch.setattr(registry, "load_encoder", lambda cfg: loads.append(cfg) or TinyViT(), raising=False)
    exp = make_exp(tmp_path / "cache")
    first = extract_features(exp, manifest(images), progress=False)
    assert len(loads) == 1
    second = run_extraction(exp, manifest(images), progress=False)
    assert len(loads) == 1 and second.cached == 10 and second.extracted == 0
    np.testing.assert_array_equal(first.tokens(-1), second.features.tokens(-1))


@pytest.mark.parametrize("change", ["content", "layer", "preprocessing", "weights", "token_grid"])
def test_a_change_makes_a_new_entry(tmp_path, images, change):
    exp = make_exp(tmp_path / "cache", layers=(-1, 0))
    base = extract_features(exp, manifest(images), TinyViT(), progress=False)
    encoder, want_seen = TinyViT(), 10
    if change == "content":
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(images.path[3])
        want_seen = 1
    elif change == "layer":
        exp = make_exp(tmp_path / "cache", layers=(-1, 1))
    elif change == "preprocessing":
        encoder = TinyViT(mean=0.4)
    elif change == "weights":
        with torch.no_grad():
            encoder.blocks[1].linear1.weight.mul_(1.5)
    else:
        exp = make_exp(tmp_path / "cache", layers=(-1, 0), token_grid=[2, 2])
    new = extract_features(exp, manifest(images), encoder, progress=False)
    assert encoder.seen == want_seen
    differs = ~np.isclose(base.pooled(-1), new.pooled(-1)).all(axis=1)
    if change == "content":
        assert new.store_dir == base.store_dir and differs.tolist() == [i == 3 for i in range(10)]
    else:
        assert new.store_dir != base.store_dir
        assert differs.all() == (change in ("preprocessing", "weights"))


def test_shapes_cls_mean_and_token_grid(tmp_path, images):
    exp = make_exp(tmp_path / "cache", layers=(-1, 0))
    fs = extract_features(exp, manifest(images), TinyViT(), progress=False)
    assert fs.tokens(-1).shape == (10, 16, D) and fs.tokens(-1).dtype == np.float16
    assert fs.grid(0) == (1, 4, 4)
    mean, cls = fs.pooled(-1, "mean"), fs.pooled(-1, "cls")
    assert mean.shape == cls.shape == (10, D) and mean.dtype == np.float32
    np.testing.assert_array_equal(fs.pooled(-1, "cls+mean"), np.concatenate([cls, mean], 1))
    np.testing.assert_allclose(mean, fs.tokens(-1).astype(np.float32).mean(1), atol=2e-3)

    pooled = extract_features(make_exp(tmp_path / "c2", token_grid=[2, 2]), manifest(images), TinyViT(), progress=False)
    assert pooled.tokens(-1).shape == (10, 4, D) and pooled.grid(-1) == (1, 2, 2)
    np.testing.assert_array_equal(pooled.pooled(-1), mean)  # pooled features come from the full grid
    full = fs.tokens(-1).astype(np.float32).reshape(10, 2, 2, 2, 2, D)  # (h2, dh, w2, dw)
    np.testing.assert_allclose(pooled.tokens(-1), full.mean((2, 4)).reshape(10, 4, D), atol=2e-3)

    no_cls = extract_features(make_exp(tmp_path / "c3"), manifest(images), TinyViT(cls_token=False), progress=False)
    with pytest.raises(ConfigError, match="CLS"):
        no_cls.pooled(-1, "cls+mean")
    with pytest.raises(ConfigError, match="larger"):
        extract_features(make_exp(tmp_path / "c4", token_grid=[8, 8]), manifest(images), TinyViT(), progress=False)


def test_image_encoder_on_clips_stacks_frames_and_averages_clips():
    encoder = TinyViT().eval()
    cfg = make_exp(Path("unused")).features
    clip = torch.randn(2, 1, 3, 3, 16, 16)  # B=2, K=1, T=3
    with torch.inference_mode():
        arrays, grids = encode_batch(encoder, clip, [-1], cfg)
        twice, _ = encode_batch(encoder, clip.expand(2, 2, 3, 3, 16, 16), [-1], cfg)
        frames = encoder.encode(clip[:, 0].reshape(6, 3, 16, 16), [-1])
    assert grids["-1"] == (3, 4, 4) and arrays["L0.tokens"].shape == (2, 48, D)
    np.testing.assert_allclose(arrays["L0.tokens"][1, 16:32], frames.tokens["-1"][4].numpy(), atol=2e-3)
    np.testing.assert_allclose(arrays["L0.cls"][0], frames.prefix["-1"][:3, 0].mean(0).numpy(), atol=1e-5)
    for name in arrays:
        np.testing.assert_allclose(twice[name], arrays[name], atol=1e-5)

    video = TinyViT(kind="video").eval()
    with torch.inference_mode():
        arrays, grids = encode_batch(video, clip, [-1], make_exp(Path("unused"), temporal_pool=True).features)
    assert grids["-1"] == (1, 4, 4) and arrays["L0.tokens"].shape == (2, 16, D)


def test_volume_mode_must_match_the_encoder():
    task = {"type": "binary", "targets": ["y"]}
    data = parse_config({"name": "v", "data": {"manifest": "m", "kind": "volume"}, "task": task}).data
    image, video = TinyViT().input_spec, TinyViT(kind="video").input_spec
    with pytest.raises(ConfigError, match="volume_mode: slices"):
        check_compatible(data, image, "tiny")
    check_compatible(data, video, "tiny")
    data.volume_mode = "slices"
    with pytest.raises(ConfigError, match="volume_mode: stack"):
        check_compatible(data, video, "tiny")


def test_random_clips_are_refused(tmp_path, images):
    exp = make_exp(tmp_path / "cache")
    exp.data.clip_position = "random"
    with pytest.raises(ConfigError, match="random clips cannot be cached"):
        extract_features(exp, manifest(images), TinyViT(), progress=False)


def test_on_error_raise_names_the_sample_and_keeps_finished_shards(tmp_path, images):
    Path(images.path[5]).write_bytes(b"not a png")
    exp = make_exp(tmp_path / "cache")
    encoder = TinyViT()
    with pytest.raises(ReaderError) as err:
        extract_features(exp, manifest(images), encoder, progress=False)
    assert "s005" in str(err.value) and "img005.png" in str(err.value)
    assert encoder.seen == 4  # batches [0,1], [2,3]; the batch [4,5] holds the bad file
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(images.path[5])
    again = TinyViT()
    fs = extract_features(exp, manifest(images), again, progress=False)
    assert again.seen == 6 and len(fs.sample_ids) == 10


def test_on_error_skip_records_reasons(tmp_path, images):
    Path(images.path[2]).write_bytes(b"not a png")
    missing = images.copy()
    missing.loc[7, "path"] = str(Path(images.path[7]).with_name("gone.png"))
    exp = make_exp(tmp_path / "cache", on_error="skip")
    fs = extract_features(exp, manifest(missing), TinyViT(), progress=False)
    assert [sid for sid, _ in fs.skipped] == ["s002", "s007"]
    assert "not found" in fs.skipped[1][1] and fs.skipped[0][1]
    assert "s002" not in fs.sample_ids and len(fs.sample_ids) == 8 and fs.pooled(-1).shape == (8, D)
    again = TinyViT()
    assert extract_features(exp, manifest(missing), again, progress=False).skipped == fs.skipped
    assert again.calls == 0  # the skip is remembered with the file's fingerprint
    exp.data.on_error = "raise"
    with pytest.raises(ReaderError, match="s002"):
        extract_features(exp, manifest(images), TinyViT(), progress=False)


class SlowViT(TinyViT):
    """A TinyViT whose forward pass takes at least ``seconds`` (a sleep: it leaves the CPU to the other stages)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def encode(self, pixels, layers, attentions=False):
        time.sleep(self.seconds)
        return super().encode(pixels, layers, attentions)


def test_reading_and_writing_overlap_the_forward_pass(tmp_path, images, monkeypatch):
    """Reading (0.1 s a sample: 0.2 s a batch) and shard writes (0.2 s each) take as long as the forward pass
    (0.2 s a batch), yet the encoder waits only for the first batch and never for a write."""
    import fmprobe.data.dataset as dataset
    from fmprobe.features.store import FeatureStore

    real_read, real_write = dataset.read_media, FeatureStore.write_shard
    threads = {"read": set(), "write": set()}

    def slow(stage, seconds, real):
        def run(*args, **kwargs):
            threads[stage].add(threading.current_thread())
            time.sleep(seconds)
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(dataset, "read_media", slow("read", 0.1, real_read))
    monkeypatch.setattr(FeatureStore, "write_shard", slow("write", 0.2, real_write))
    result = run_extraction(make_exp(tmp_path / "cache"), manifest(images), SlowViT(0.2), progress=False)
    assert threading.main_thread() not in threads["read"] | threads["write"]  # both run beside the encoder
    stages = result.stages
    assert result.extracted == 10 and stages.read >= 1.0 and stages.write >= 0.6 and stages.forward >= 1.0
    assert stages.input_wait < 0.5 * stages.read, stages  # sequential reading would make it wait ~1.0 s
    assert stages.write_wait < 0.5 * stages.write, stages
    assert min(stages.preprocess, stages.pooling, stages.buffer) > 0


def test_on_the_cpu_the_extraction_reads_and_preprocesses_on_one_torch_thread(tmp_path, images, monkeypatch):
    """The encoder's OpenMP team has the cores; the prefetch thread's decoding and preprocessing take one thread's
    share of them, not a team of their own (Prefetch's ``one_torch_thread``)."""
    import fmprobe.data.dataset as dataset

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread here: nothing to tell apart")
    real_read, counts = dataset.read_media, set()

    def read(*args, **kwargs):
        counts.add(torch.get_num_threads())
        return real_read(*args, **kwargs)

    monkeypatch.setattr(dataset, "read_media", read)
    threads = torch.get_num_threads()
    run_extraction(make_exp(tmp_path / "cache"), manifest(images), TinyViT(), progress=False)
    assert counts == {1} and torch.get_num_threads() == threads


def test_extraction_measures_its_throughput_after_the_first_batches(tmp_path, images):
    rates = []
    result = run_extraction(make_exp(tmp_path / "cache"), manifest(images), SlowViT(0.05), progress=False,
                            on_batch=rates.append)
    assert [(r.done, r.total) for r in rates] == [(2, 10), (4, 10), (6, 10), (8, 10), (10, 10)]
    assert [r.samples_per_second is None for r in rates] == [True, True, False, False, False]  # warm-up: 2 batches
    assert result.samples_per_second == rates[-1].samples_per_second
    assert 0 < result.samples_per_second <= 2 / 0.05  # a batch of 2 takes at least the 0.05 s forward pass
    cached = run_extraction(make_exp(tmp_path / "cache"), manifest(images), TinyViT(), progress=False)
    assert cached.samples_per_second is None and cached.extracted == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_the_overlapped_pipeline_stores_the_bits_of_a_plain_sequential_loop(tmp_path, images, workers):
    """Prefetching, worker processes, pinned buffers and background shard writes change when things happen, not
    what is computed: every stored array equals, bit for bit, encode_batch run batch after batch on the samples
    read and preprocessed in manifest order, and a second extraction into a fresh cache stores the same bits."""
    from fmprobe.data.readers import read_media
    from fmprobe.data.transforms import Preprocess

    exp = make_exp(tmp_path / "a")
    exp.data.num_workers = workers
    encoder = TinyViT().eval()
    preprocess = Preprocess(encoder.input_spec, exp.data, train=False)
    pixels = torch.stack([preprocess(read_media(p, exp.data, sample_id=s)) for s, p in zip(images.sample_id,
                                                                                           images.path)])
    with torch.inference_mode():
        batches = [encode_batch(encoder, x, [-1], exp.features)[0] for x in pixels.split(2)]
    expected = {name: np.concatenate([b[name] for b in batches]) for name in ("L0.mean", "L0.cls", "L0.tokens")}
    first = extract_features(exp, manifest(images), TinyViT(), progress=False)
    second = extract_features(exp.model_copy(update={"features": exp.features.model_copy(
        update={"cache_dir": str(tmp_path / "b")})}), manifest(images), TinyViT(), progress=False)
    for fs in (first, second):
        for name, array in zip(("L0.mean", "L0.cls", "L0.tokens"), _arrays(fs)):
            assert array.dtype == expected[name].dtype and array.tobytes() == expected[name].tobytes(), name


# --- killed and concurrent runs, in real subprocesses ------------------------------------------------

CHILD = """
import sys, json, os
sys.path.insert(0, {tests!r})
import pandas as pd, test_extract as t
args = json.loads(sys.argv[1])
encoder = t.TinyViT()
if args.get("kill_after"):
    real = encoder.encode
    def encode(*a, **k):
        if encoder.calls == args["kill_after"]:
            os._exit(9)
        return real(*a, **k)
    encoder.encode = encode
if args.get("slow"):
    real_slow = encoder.encode
    def encode(*a, **k):
        import time; time.sleep(args["slow"]); return real_slow(*a, **k)
    encoder.encode = encode
exp = t.make_exp(t.Path(args["cache"]))
fs = t.extract_features(exp, t.manifest(pd.DataFrame(args["df"])), encoder, progress=False)
print(json.dumps({{"ids": fs.sample_ids, "seen": encoder.seen}}))
"""


def _child(df: pd.DataFrame, cache: Path, **args) -> subprocess.Popen:
    code = CHILD.format(tests=str(Path(__file__).parent))
    payload = json.dumps({"cache": str(cache), "df": df.to_dict("list"), **args})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, payload], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )


def test_resume_after_a_kill_extracts_only_the_missing_samples(tmp_path):
    images = write_images(tmp_path / "img", 12)
    killed = _child(images, tmp_path / "cache", kill_after=4)  # dies while encoding batch 5
    killed.communicate(timeout=120)
    assert killed.returncode == 9
    store = next((tmp_path / "cache").glob("*/config.json")).parent
    # shards are written in the background: the two units encoded before the kill may not both be committed
    done = sum(len(json.loads((s / "meta.json").read_text())["sample_ids"]) for s in store.glob("shard-*"))
    assert done in (0, 4, 8)
    partial = store / "tmp-0123"
    partial.mkdir()
    (partial / "L0.tokens.npy").write_bytes(b"\x93NUMPY half a shard")

    exp = make_exp(tmp_path / "cache")
    encoder = TinyViT()
    resumed = extract_features(exp, manifest(images), encoder, progress=False)
    assert encoder.seen == 12 - done and not partial.exists()
    clean = extract_features(make_exp(tmp_path / "clean"), manifest(images), TinyViT(), progress=False)
    assert resumed.sample_ids == clean.sample_ids
    for a, b in zip(_arrays(resumed), _arrays(clean)):
        np.testing.assert_array_equal(a, b)


def _check_consistent(tmp_path: Path, images: pd.DataFrame) -> None:
    store = next((tmp_path / "cache").glob("*/config.json")).parent
    assert not list(store.glob("tmp-*"))
    metas = [json.loads((s / "meta.json").read_text()) for s in sorted(store.glob("shard-*"))]
    assert sorted(sid for m in metas for sid in m["sample_ids"]) == images.sample_id.tolist()  # each stored once
    encoder = TinyViT()
    served = extract_features(make_exp(tmp_path / "cache"), manifest(images), encoder, progress=False)
    clean = extract_features(make_exp(tmp_path / "clean"), manifest(images), TinyViT(), progress=False)
    assert encoder.calls == 0
    for a, b in zip(_arrays(served), _arrays(clean)):
        np.testing.assert_array_equal(a, b)


def test_concurrent_threads_into_one_cache_stay_consistent(tmp_path):
    images = write_images(tmp_path / "img", 12)
    results, errors = [], []
    # Built before the threads start: TinyViT seeds torch's global generator, which threads would race on.
    encoders = [TinyViT(), TinyViT()]

    def work(encoder: TinyViT) -> None:
        try:
            results.append(extract_features(make_exp(tmp_path / "cache"), manifest(images), encoder, progress=False))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(encoder,)) for encoder in encoders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and [fs.sample_ids for fs in results] == [images.sample_id.tolist()] * 2
    _check_consistent(tmp_path, images)


@pytest.mark.slow
def test_concurrent_processes_into_one_cache_stay_consistent(tmp_path):
    images = write_images(tmp_path / "img", 12)
    procs = [_child(images, tmp_path / "cache", slow=0.05) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    for out, _ in outs:
        assert json.loads(out.strip().splitlines()[-1])["ids"] == images.sample_id.tolist()
    _check_consistent(tmp_path, images)


def test_extract_command_with_a_saved_model_and_its_weights_changing(tmp_path, monkeypatch):
    from transformers import Dinov2Config, Dinov2Model

    from fmprobe.features.extract import extract_command

    images = write_images(tmp_path / "img", 6)
    images[["sample_id", "path", "y"]].to_csv(tmp_path / "manifest.csv", index=False)

    def save_model(seed: int) -> None:
        torch.manual_seed(seed)
        config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                              patch_size=8, image_size=16)
        Dinov2Model(config).save_pretrained(tmp_path / "model")

    save_model(0)
    (tmp_path / "exp.yaml").write_text(
        "name: cli\n"
        "data: {manifest: manifest.csv, group_column: null, split_column: null}\n"
        "task: {type: binary, targets: [y]}\n"
        f"model: {{name: {tmp_path / 'model'}}}\n"
        f"features: {{cache_dir: {tmp_path / 'cache'}, batch_size: 4}}\n"
    )
    first = extract_command(tmp_path / "exp.yaml")
    assert (first["samples"], first["extracted"], first["cached"], first["skipped"]) == (6, 6, 0, 0)

    import fmprobe.backbones.registry as registry

    real_load = registry.load_encoder
    loads = []
    monkeypatch.setattr(registry, "load_encoder", lambda cfg: loads.append(cfg) or real_load(cfg))
    second = extract_command(tmp_path / "exp.yaml")
    assert (second["extracted"], second["cached"], second["key"]) == (0, 6, first["key"]) and not loads

    save_model(1)  # new weights at the same path: never served the old features
    third = extract_command(tmp_path / "exp.yaml")
    assert third["extracted"] == 6 and third["key"] != first["key"] and len(loads) == 1


def test_an_encoder_handed_in_is_remembered_so_that_a_fully_cached_run_does_not_load_it(tmp_path, monkeypatch,
                                                                                        tiny_dinov2_dir):
    """A run that had to count its backbone's parameters hands the encoder it loaded to the extraction. Its identity
    must be remembered then too: the demo's second task, fully cached, loaded DINOv2 again to learn it."""
    import fmprobe.backbones.registry as registry

    images = write_images(tmp_path / "img", 6)
    images[["sample_id", "path", "y"]].to_csv(tmp_path / "manifest.csv", index=False)
    exp = parse_config({"name": "handed", "data": {"manifest": str(tmp_path / "manifest.csv"), "group_column": None,
                                                   "split_column": None},
                        "task": {"type": "binary", "targets": ["y"]}, "model": {"name": str(tiny_dinov2_dir)},
                        "features": {"cache_dir": str(tmp_path / "cache"), "batch_size": 4}})  # fmt: skip
    manifest = load_manifest(exp.data, exp.task)
    first = run_extraction(exp, manifest, registry.load_encoder(exp.model))
    loads = []
    real_load = registry.load_encoder
    monkeypatch.setattr(registry, "load_encoder", lambda cfg: loads.append(cfg) or real_load(cfg))
    second = run_extraction(exp, manifest)
    assert (first.extracted, second.extracted, second.cached, second.key) == (6, 0, 6, first.key)
    assert not loads


def test_an_absent_gpu_for_extraction_is_an_error_not_a_cpu_run(toy_study, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exp = parse_config(toy_study("binary", n=12, features={"device": "cuda"}))
    with pytest.raises(ConfigError, match="features.device is 'cuda' but no CUDA GPU"):
        extract_features(exp, load_manifest(exp.data, exp.task), progress=False)


def _default_torch_threads() -> int:
    """torch's thread count in a fresh process (the prefetch tests compare theirs with it)."""
    return int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                              capture_output=True, text=True, check=True).stdout)


def test_prefetch_leaves_the_process_torch_threads_alone():
    """The prefetch thread must not change torch's thread count: set from a thread, it becomes the count of a thread
    that has not asked for its own yet, such as the encoder's at its first extraction (and training's after). It
    was tried once, to keep preprocessing off the forward pass's cores, and dropped the demo's extraction and
    training to one thread. Fresh processes, each asking for the count only at the end (asking fixes it)."""
    prefetch = ("import torch; from fmprobe.features.pipeline import Prefetch; "
                "items = Prefetch(torch.ones(64, 64) @ torch.ones(64, 64) for _ in range(3)); "
                "items.__enter__(); list(items); items.__exit__(); print(torch.get_num_threads())")
    default = _default_torch_threads()
    after = int(subprocess.run([sys.executable, "-c", prefetch], capture_output=True, text=True, check=True).stdout)
    if default < 2:
        pytest.skip("one torch thread by default here: nothing to lose")
    assert after == default


def test_the_prefetch_thread_runs_its_torch_ops_on_one_thread_and_only_itself():
    """Decoding and preprocessing in the prefetch thread would otherwise start an OpenMP team of their own beside the
    encoder's: on 2 cores the forward pass lost 0.6-0.8 s of 7 to it (extract_efficiency 0.89; 0.98 without). The
    count is OpenMP's per-thread one: the main thread and threads started later keep theirs. Fresh processes, as
    above: torch's counts are fixed per thread on first use."""
    code = ("import threading, torch; from fmprobe.features.pipeline import Prefetch; "
            "inside = Prefetch((torch.get_num_threads() for _ in range(2)), one_torch_thread=True); inside.__enter__(); "
            "counts = list(inside); inside.__exit__(); later = []; "
            "t = threading.Thread(target=lambda: later.append(torch.get_num_threads())); t.start(); t.join(); "
            "print(counts, torch.get_num_threads(), later[0])")
    default = _default_torch_threads()
    if default < 2:
        pytest.skip("one torch thread by default here: nothing to tell apart")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[1,", "1]", str(default), str(default)], out

