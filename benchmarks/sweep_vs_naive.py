"""A probe sweep on cached features against the naive loop that re-runs the frozen backbone every epoch.

Setup: a random ViT (DINOv2 architecture) saved with save_pretrained, synthetic PNGs whose brightness
carries a binary label, 12 probe configurations (head type x learning rate x pooling) x 3 seeds.

- sweep: ``run_sweep`` on the grid — one extraction pass into the feature cache, then the runs on cached
  features: the 12 arms differ only in their heads, so they train in one process, features loaded once, one
  HeadBank pass per input (pooling) and seed; each writes its full run directory (metrics with bootstrap CIs,
  flags, report).
- naive: what the researchers' scripts did — for every configuration, seed and epoch, read and
  preprocess the images and run the frozen backbone again (``torch.no_grad``), then step the head.
  The full naive loop would take hours here, so it is timed on one configuration, one seed and
  ``NAIVE_EPOCHS`` epochs and extrapolated linearly (epochs x seeds x configurations); the output says so.

Last lines: ``sweep_speedup=<naive ÷ sweep>`` (goal >= 30) and, the headline,
``sweep_over_extraction=<sweep wall ÷ one extraction pass>`` (goal <= 1.2), both measured in this one run.
"""

from __future__ import annotations

import io
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image
from rich.console import Console
from torch.utils.data import DataLoader
from transformers import Dinov2Config, Dinov2Model

from fmprobe.backbones.registry import load_encoder
from fmprobe.config import parse_config
from fmprobe.data.dataset import MediaDataset, collate_samples
from fmprobe.data.manifest import load_manifest
from fmprobe.data.transforms import Preprocess
from fmprobe.experiments.sweep import run_sweep
from fmprobe.heads import build_head
from fmprobe.report.progress import Progress

sys.path.insert(0, str(Path(__file__).parent))
from timing import load_average  # noqa: E402

N_IMAGES, SIZE, HIDDEN, EPOCHS, SEEDS, NAIVE_EPOCHS = 600, 224, 384, 20, [0, 1, 2], 1
GRID = {"heads.0.type": ["linear", "mlp"], "train.lr": [0.0003, 0.001, 0.003],
        "heads.0.pooling": ["mean", "cls"]}  # 12 configurations


def write_data(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        label = i % 2
        small = np.clip(rng.normal(100 + 30 * label, 40, (SIZE // 8, SIZE // 8, 3)), 0, 255).astype(np.uint8)
        path = folder / "img" / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((SIZE, SIZE), Image.BILINEAR).save(path)
        rows.append({"sample_id": f"s{i:04d}", "path": str(path), "y": label, "group": f"s{i:04d}"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def write_model(folder: Path) -> Path:
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                          patch_size=16, image_size=SIZE)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def base_config(folder: Path, manifest: Path, model: Path) -> dict:
    return {
        "name": "bench",
        "data": {"manifest": str(manifest), "split_column": None},
        "task": {"type": "binary", "targets": ["y"]},
        "model": {"name": str(model), "layers": [-1], "image_size": SIZE},
        "features": {"cache_dir": str(folder / "cache"), "batch_size": 32, "store_tokens": False},
        "heads": [{"type": "linear"}],
        "train": {"epochs": EPOCHS, "batch_size": 64, "seeds": SEEDS},
        "split": {"mode": "generate", "fractions": [0.7, 0.15, 0.15]},
        "runs_dir": str(folder / "runs"),
    }


def naive_epoch_seconds(cfg: dict) -> float:
    """One epoch of the naive loop (train pass through the frozen backbone + head step, then a val pass)."""
    from fmprobe.data.splits import make_splits

    exp = parse_config(cfg)
    manifest = load_manifest(exp.data, exp.task)
    df = manifest.df.copy()
    df["split"] = make_splits(df, exp.task, exp.split, manifest.targets(df)).to_numpy()
    encoder = load_encoder(exp.model).eval()
    pre = Preprocess(encoder.input_spec, exp.data, train=False)
    head = build_head(exp.heads[0], HIDDEN, 1)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    loaders = {s: DataLoader(MediaDataset(df[df["split"] == s].reset_index(drop=True), exp.data, pre),
                             batch_size=exp.train.batch_size, collate_fn=collate_samples, shuffle=s == "train")
               for s in ("train", "val")}
    y = dict(zip(df["sample_id"], manifest.targets(df).astype(np.float32)))
    start = time.perf_counter()
    for _ in range(NAIVE_EPOCHS):
        for split, loader in loaders.items():
            for batch in loader:
                pixels = batch["pixels"]
                with torch.no_grad():
                    tokens = encoder.encode(pixels.reshape(-1, *pixels.shape[3:]), [-1]).tokens["-1"]
                    feats = tokens.float().mean(1)
                target = torch.tensor([y[s] for s in batch["sample_id"]])
                if split == "train":
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(head(feats).squeeze(-1), target)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                else:
                    with torch.no_grad():
                        head(feats)
    return (time.perf_counter() - start) / NAIVE_EPOCHS


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="fmprobe-sweep-bench-") as tmp:  # ~150 MB of images, cache and runs
        measure(Path(tmp))


def measure(folder: Path) -> None:
    manifest = write_data(folder)
    model = write_model(folder / "model")
    cfg = base_config(folder, manifest, model)
    (folder / "base.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "sweep.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "grid": GRID, "workers": 1}))
    n_configs = int(np.prod([len(v) for v in GRID.values()]))
    print(f"{N_IMAGES} images {SIZE}px, random ViT-S/16 (12 blocks, 384 wide), {n_configs} configurations x "
          f"{len(SEEDS)} seeds x {EPOCHS} epochs")

    log = io.StringIO()  # the sweep's progress lines, one of which times its extraction pass
    start = time.perf_counter()
    result = run_sweep(folder / "sweep.yaml", progress=Progress(Console(file=log, width=200)))
    sweep_seconds = time.perf_counter() - start
    extraction = float(re.search(r"^features: .*\(([\d.]+) s\)$", log.getvalue(), re.MULTILINE).group(1))
    assert result.extractions == 1 and all(p.status == "ran" for p in result.points)
    print(f"sweep: {len(result.points)} runs in {sweep_seconds:.1f} s wall, including one extraction pass of "
          f"{extraction:.1f} s; {load_average()}")

    per_epoch = naive_epoch_seconds(cfg)
    naive_total = per_epoch * EPOCHS * len(SEEDS) * n_configs
    print(f"naive: measured {per_epoch:.1f} s per epoch ({NAIVE_EPOCHS} epoch(s) of 1 configuration, 1 seed: "
          f"backbone on train + val every epoch); EXTRAPOLATED to {EPOCHS} epochs x {len(SEEDS)} seeds x "
          f"{n_configs} configurations = {naive_total:.0f} s ({naive_total / 3600:.1f} h), not run in full")
    print(f"sweep_speedup={naive_total / sweep_seconds:.1f}")
    print(f"sweep_over_extraction={sweep_seconds / extraction:.2f}")


if __name__ == "__main__":
    main()
