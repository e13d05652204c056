"""Extraction throughput relative to a bare ``model(x)`` loop: what fmprobe's cache and I/O cost.

Same model, same batches: the bare loop runs on preprocessed tensors already in memory; fmprobe reads PNG files
from disk, fingerprints them, preprocesses, encodes and writes fp16 tokens + pooled features into a fresh cache.
The machine is shared, so each repeat times a bare pass and an fmprobe pass back to back (in alternating order,
benchmarks/timing.py) and the ratio is taken per repeat; per ``data.num_workers`` setting the benchmark prints
min / median / max over the repeats, then where fmprobe's time went at the default setting (what the gap to the bare
loop is made of).
Last line: ``extract_efficiency=<median of bare ÷ fmprobe time at the default num_workers>`` (goal >= 0.95).
``--timm``: the same at the default setting for a random-init timm ViT-S/16 (``model.kind: timm``) against timm's
``forward_features``. ``--repeats N``: repeats at the default setting (11); ``--default-only``: skip the other
settings (on a loaded machine, where each pass takes long).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from timing import interleaved, load_average, median, ratios, spread
from transformers import Dinov2Config, Dinov2Model

from fmprobe.backbones.registry import load_encoder
from fmprobe.backbones.timm_encoder import TimmEncoder
from fmprobe.config import DataConfig, ModelConfig, parse_config
from fmprobe.data.manifest import load_manifest
from fmprobe.data.readers import read_media
from fmprobe.data.transforms import Preprocess
from fmprobe.features.extract import Extraction, run_extraction

N_IMAGES, SIZE, BATCH = 64, 256, 16
DEFAULT_WORKERS = DataConfig.model_fields["num_workers"].default
SETTINGS = {DEFAULT_WORKERS: 11, 1: 3, 2: 3}  # num_workers -> repeats (the default, the headline, gets the most)


def write_images(folder: Path, n: int = N_IMAGES) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        # smooth random images: PNG-compressible like real scans, not pure noise
        small = rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
        path = folder / f"img{i:04d}.png"
        Image.fromarray(small).resize((SIZE, SIZE), Image.BILINEAR).save(path)
        rows.append({"sample_id": f"s{i:04d}", "path": path.name, "y": i % 2})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def vits14(tmp: Path) -> tuple[dict, object]:
    """A random-init ViT-S/14 (DINOv2-small's shape: the speed does not depend on the weights)."""
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                             patch_size=14, image_size=224)).save_pretrained(tmp / "vits14")
    section = {"name": str(tmp / "vits14")}
    return section, load_encoder(ModelConfig(**section))


def timm_vits16(tmp: Path) -> tuple[dict, object]:
    """A random-init timm ViT-S/16 at 224 px saved as a state dict, loaded through ``model.kind: timm``."""
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), tmp / "vits16.pth")
    section = {"kind": "timm", "name": "vit_small_patch16_224", "weights": str(tmp / "vits16.pth")}
    return section, load_encoder(ModelConfig(**section))


def experiment(manifest: Path, model: dict, cache: Path, workers: int | None):
    data = {"manifest": str(manifest), "group_column": None, "split_column": None}
    if workers is not None:
        data["num_workers"] = workers
    return parse_config({
        "name": "bench",
        "data": data,
        "task": {"type": "binary", "targets": ["y"]},
        "model": model,
        "features": {"cache_dir": str(cache), "batch_size": BATCH},
    })


def bare_batches(encoder, manifest_path: Path, model: dict) -> list[torch.Tensor]:
    """The preprocessed images in memory, batched: the bare loop's input."""
    exp = experiment(manifest_path, model, Path("unused"), None)
    manifest = load_manifest(exp.data, exp.task)
    preprocess = Preprocess(encoder.input_spec, exp.data, train=False)
    pixels = torch.stack([preprocess(read_media(p, exp.data, sample_id=s)) for s, p in
                          zip(manifest.df.sample_id, manifest.df.path)])[:, 0, 0]  # [N, 3, H, W]
    return list(pixels.split(BATCH))


def bare_loop(encoder, batches: list[torch.Tensor]) -> None:
    model = encoder.model
    forward = model.forward_features if isinstance(encoder, TimmEncoder) else lambda x: model(pixel_values=x)
    with torch.inference_mode():
        for x in batches:
            forward(x)


def extract(exp, encoder) -> Extraction:
    result = run_extraction(exp, load_manifest(exp.data, exp.task), encoder, progress=False)
    assert result.extracted == len(result.features), result
    return result


def explain(bare: float, seconds: float, result: Extraction) -> None:
    """Where fmprobe's wall time (``seconds``, the call) went, against the bare loop's time on the same batches."""
    s = getattr(result, "stages", None)
    if s is None:  # an older fmprobe (a "before" measured with this script) records no stage timings
        print("  where the time went: not recorded by this fmprobe")
        return
    loop = s.forward + s.pooling + s.buffer + s.input_wait + s.write_wait
    setup = seconds - loop  # manifest, fingerprints, cache scan, loader start, final index
    print(f"  where the time went (the repeat with the median ratio: {seconds:.2f} s, bare loop {bare:.2f} s):")
    print("    on the encoder's thread: forward {:.2f} s (bare loop {:.2f} s: {:+.2f} s taken by the other stages' CPU "
          "use and the encoder's own outputs), pooling {:.2f} s, copy into shard buffers {:.2f} s, waiting for input "
          "{:.2f} s, waiting for a shard write {:.2f} s".format(s.forward, bare, s.forward - bare, s.pooling, s.buffer,
                                                                s.input_wait, s.write_wait))
    print(f"    outside the loop: {setup:.2f} s (manifest, fingerprints, cache scan, loader start-up, index of the "
          "result)")
    print(f"    beside the encoder (overlapped, they cost only through the waits and their CPU): read+decode "
          f"{s.read:.2f} s, preprocess {s.preprocess:.2f} s, shard writes {s.write:.2f} s")
    print(f"    the forward pass took {s.forward / seconds:.1%} of fmprobe's wall time")
    print(f"    gap {seconds - bare:+.2f} s = forward {s.forward - bare:+.2f} + pooling {s.pooling:.2f} + "
          f"buffer {s.buffer:.2f} + waits {s.input_wait + s.write_wait:.2f} + outside the loop {setup:.2f}")


def measure(model: dict, encoder, manifest: Path, tmp: Path, settings: dict[int, int]) -> float:
    """Per ``num_workers`` setting, interleaved repeats of a bare pass and an fmprobe pass into a fresh cache; prints
    their spread and, at the default setting, where the time went. Returns the median ratio at the default."""
    batches = bare_batches(encoder, manifest, model)
    bare_loop(encoder, batches[:2])  # warm-up
    headline, caches = float("nan"), itertools.count()
    for workers, repeats in settings.items():
        runs: list[Extraction] = []

        def fmprobe(runs: list[Extraction] = runs, workers: int = workers) -> None:
            runs.append(extract(experiment(manifest, model, tmp / f"cache-{next(caches)}", workers), encoder))

        times, _ = interleaved({"bare": lambda: bare_loop(encoder, batches), "fmprobe": fmprobe}, repeats)
        per_repeat = ratios(times["bare"], times["fmprobe"])
        default = " (default)" if workers == DEFAULT_WORKERS else ""
        print(f"num_workers={workers}{default}: ratio {spread(per_repeat, unit='')}; "
              f"bare {spread([N_IMAGES / t for t in times['bare']], 'img/s', 1)}; "
              f"fmprobe {spread([N_IMAGES / t for t in times['fmprobe']], 'img/s', 1)}; {load_average()}", flush=True)
        if workers == DEFAULT_WORKERS:
            headline = median(per_repeat)
            mid = sorted(range(repeats), key=per_repeat.__getitem__)[repeats // 2]
            explain(times["bare"][mid], times["fmprobe"][mid], runs[mid])
    return headline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm", action="store_true", help="a timm ViT-S/16 at the default setting only")
    parser.add_argument("--repeats", type=int, default=SETTINGS[DEFAULT_WORKERS], help="repeats at the default")
    parser.add_argument("--default-only", action="store_true", help="only the default num_workers setting")
    args = parser.parse_args()
    name = "random-init timm ViT-S/16" if args.timm else "random-init ViT-S/14"
    print(f"torch threads {torch.get_num_threads()}, {N_IMAGES} PNG {SIZE}x{SIZE}, batch {BATCH}, {name}; default "
          f"data.num_workers = {DEFAULT_WORKERS}; {load_average()}", flush=True)
    settings = {**SETTINGS, DEFAULT_WORKERS: args.repeats}
    if args.timm or args.default_only:
        settings = {DEFAULT_WORKERS: args.repeats}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "img").mkdir()
        manifest = write_images(tmp / "img")
        model, encoder = (timm_vits16 if args.timm else vits14)(tmp)
        headline = measure(model, encoder, manifest, tmp, settings)
    print(f"extract_efficiency={headline:.3f}")


if __name__ == "__main__":
    main()
