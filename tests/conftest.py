"""Shared fixtures: a tiny real backbone saved to disk and toy studies written as real files."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Dinov2Model (hidden 32, 2 layers, 32-px input, patch 8) saved with save_pretrained."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("tiny-dinov2")
    Dinov2Model(cfg).save_pretrained(path)
    return path


def write_toy_images(folder: Path, labels: np.ndarray, *, informative: bool = True, seed: int = 0,
                     size: int = 32) -> list[str]:
    """Gray PNGs; when informative, the label sets the brightness of the top half (a signal a probe can read)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, label in enumerate(labels):
        img = rng.integers(0, 90, size=(size, size)).astype(np.uint8)
        if informative:
            img[: size // 2] += np.uint8(40 * int(label))
        name = f"img{i:04d}.png"
        Image.fromarray(img, mode="L").save(folder / name)
        paths.append(f"images/{name}")
    return paths


@pytest.fixture
def toy_study(tmp_path: Path, tiny_dinov2_dir: Path) -> Callable[..., dict[str, Any]]:
    """Factory: writes a manifest + images and returns a config dict for ``fmprobe.config.parse_config``."""

    def make(task_type: str = "binary", n: int = 90, *, informative: bool = True, n_classes: int = 2,
             weights: list[float] | None = None, seed: int = 0, name: str = "toy", **sections: Any) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        labels = rng.choice(n_classes, size=n, p=weights)
        df = pd.DataFrame({
            "sample_id": [f"s{i:04d}" for i in range(n)],
            "path": write_toy_images(root / "images", labels, informative=informative, seed=seed),
            "group": [f"patient{i // 3:03d}" for i in range(n)],
        })
        if task_type == "regression":
            df["y"] = labels + rng.normal(0, 0.1, n)
        else:
            df["y"] = labels
        df.to_csv(root / "manifest.csv", index=False)
        config: dict[str, Any] = {
            "name": name,
            "data": {"manifest": str(root / "manifest.csv"), "kind": "image", "split_column": None},
            "task": {"type": task_type, "targets": ["y"]},
            "model": {"name": str(tiny_dinov2_dir), "layers": [-1]},
            "features": {"cache_dir": str(tmp_path / "cache"), "batch_size": 32},
            "heads": [{"type": "linear", "pooling": "mean"}],
            "train": {"epochs": 15, "batch_size": 32, "lr": 0.01, "seeds": [0, 1]},
            "split": {"mode": "generate", "seed": 0},
            "eval": {"bootstrap": 200},
            "runs_dir": str(tmp_path / "runs"),
        }
        for key, value in sections.items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        return config

    return make


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Probe matmuls are tiny: one thread is faster than two fighting other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
