"""A tiny end-to-end setup for sweep / index / report tests: PNGs + manifest, a tiny random DINOv2 saved
with save_pretrained, and a base config writing its cache and runs under the same folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image


def write_dataset(folder: Path, n: int = 72, task: str = "binary", seed: int = 0) -> Path:
    """Images whose brightness carries the label (so a probe learns something), grouped in pairs."""
    img = folder / "img"
    img.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = (i // 2) % (3 if task == "multiclass" else 2)  # both of a pair share it
        base = 60 + 60 * label
        arr = np.clip(rng.normal(base, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
        path = img / f"img{i:03d}.png"
        Image.fromarray(arr).save(path)
        y = ["a", "b", "c"][label] if task == "multiclass" else label
        rows.append({"sample_id": f"s{i:03d}", "path": str(path), "y": y, "group": f"g{i // 2:03d}"})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def write_model(folder: Path, seed: int = 0) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          patch_size=8, image_size=16)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def base_config(folder: Path, task: str = "binary", **overrides) -> dict:
    manifest = write_dataset(folder, task=task)
    model = write_model(folder / "model")
    cfg = {
        "name": "tiny",
        "data": {"manifest": str(manifest), "split_column": None},
        "task": {"type": task, "targets": ["y"], **({"class_names": ["a", "b", "c"]} if task == "multiclass" else {})},
        "model": {"name": str(model), "layers": [-1]},
        "features": {"cache_dir": str(folder / "cache"), "batch_size": 16},
        "heads": [{"type": "linear"}],
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.01, "seeds": [0, 1]},
        "split": {"mode": "generate", "fractions": [0.6, 0.2, 0.2]},
        "eval": {"bootstrap": 50},
        "runs_dir": str(folder / "runs"),
    }
    for key, value in overrides.items():
        section, field = key.split(".")
        cfg.setdefault(section, {})[field] = value
    return cfg


def write_base(folder: Path, task: str = "binary", **overrides) -> Path:
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(base_config(folder, task, **overrides)))
    return path


def fake_run(runs_dir: Path, run_id: str, heads: dict[str, dict], *, experiment: str = "exp",
             primary: str = "auroc", lr: float = 0.01, wall: float = 10.0, config: dict | None = None) -> Path:
    """A run directory in the format of run_experiment with chosen numbers. ``heads``: name ->
    {"val": v, "test": t, "ci": (lo, hi), "baseline": b, "flags": [(name, severity)], "params": n,
    "total": total parameters (default params + 10000; None: not recorded, as in older runs)}. ``config``: the
    config.resolved.yaml to write instead of a minimal one."""
    import json

    run_dir = runs_dir / experiment / run_id
    run_dir.mkdir(parents=True)
    out = {}
    for name, h in heads.items():
        split = lambda v: {"per_seed": {primary: [v, v]}, "mean": {primary: v}, "sd": {primary: 0.01}}  # noqa: E731
        out[name] = {
            "type": "linear", "pooling": "mean", "layer": -1, "trainable_params": h.get("params", 100),
            **({} if "total" in h and h["total"] is None
               else {"total_params": h.get("total", h.get("params", 100) + 10000)}),
            "splits": {"train": split(h["val"]), "val": split(h["val"]), "test": split(h["test"])},
            "test_ci": {primary: list(h["ci"])},
            "flags": [{"name": f, "severity": s, "message": f, "details": {}} for f, s in h.get("flags", [])],
        }
    best = max(heads, key=lambda n: heads[n]["val"])
    metrics = {
        "experiment": experiment, "config_hash": f"hash-{run_id}",
        "task": {"type": "binary", "targets": ["y"], "class_names": None, "primary_metric": primary,
                 "headline_metrics": [primary]},
        "seeds": [0, 1], "ci_level": 0.95, "baseline": {"test": {primary: heads[best].get("baseline", 0.5)}},
        "selection": {"best_head": best}, "heads": out, "flags": [], "wall_seconds": wall,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    config = config or {"name": experiment, "model": {"name": "m"}, "train": {"lr": lr, "epochs": 5},
                        "runs_dir": str(runs_dir)}
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def add_fake_segmentation(run_dir: Path, decoders: dict[str, float], *, prior: float = 0.1) -> dict:
    """Add a segmentation section to a fake run's metrics.json, made by the real summariser from per-sample
    counts whose foreground IoU is the given value on every split and seed (a little lower on seed 1).
    ``decoders``: {"segmentation": v} for a frozen run, else {head: v} (adapted: copied beside each head)."""
    import json

    from fmprobe.evaluate.results import SegCounts, SegResults, SegRun
    from fmprobe.evaluate.segmentation import summarise_segmentation

    def counts(iou: float, n: int = 8) -> SegCounts:
        union = np.full((n, 2), 100, np.int64)
        inter = np.stack([np.full(n, 90), np.round(np.linspace(iou - 0.05, iou + 0.05, n) * 100)], 1).astype(np.int64)
        return SegCounts([f"s{i}" for i in range(n)], inter, union)

    runs = [SegRun(name, seed, 3, v, False, [], {s: counts(v - 0.02 * seed) for s in ("train", "val", "test")}, 50)
            for name, v in decoders.items() for seed in (0, 1)]
    frozen = list(decoders) == ["segmentation"]
    results = SegResults("frozen" if frozen else "adapted", "fake", runs, counts(prior), {"test": 8})
    block = summarise_segmentation(results, ["background", "fg"], test_groups=None, n_resamples=50, ci=0.95)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["segmentation"] = block
    if not frozen:
        for head, entry in block["decoders"].items():
            metrics["heads"][head]["segmentation"] = entry
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return block
