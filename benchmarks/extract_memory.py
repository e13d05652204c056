"""Peak memory of extraction does not grow with the dataset: 1k vs 4k samples, each in a fresh subprocess.

Tiny images and a tiny random-init DINOv2 keep it fast; tokens are stored (the largest arrays), shards of
the default 256 rows. Each child reports its own peak RSS (ru_maxrss); the sizes alternate over ``REPEATS`` rounds
and each size's peak is printed as min / median / max over them (benchmarks/timing.py).
Last line: ``rss_growth=<median peak 4k ÷ median peak 1k>`` (goal <= 1.10).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from timing import load_average, median, ratios, spread

SIZES = (1000, 4000)
REPEATS = 3


def child(manifest: str, model_dir: str, cache: str) -> None:
    from fmprobe.config import parse_config
    from fmprobe.data.manifest import load_manifest
    from fmprobe.features.extract import run_extraction

    exp = parse_config({
        "name": "mem",
        "data": {"manifest": manifest, "group_column": None, "split_column": None},
        "task": {"type": "binary", "targets": ["y"]},
        "model": {"name": model_dir, "layers": [-1, 0]},
        "features": {"cache_dir": cache, "batch_size": 32},
    })
    result = run_extraction(exp, load_manifest(exp.data, exp.task), progress=False)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stored = sum(f.stat().st_size for f in result.features.store_dir.rglob("*.npy"))
    print(json.dumps({"extracted": result.extracted, "peak_kb": peak_kb, "stored_bytes": stored,
                      "seconds": result.seconds}))


def main() -> None:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "tiny"
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 patch_size=4, image_size=32)).save_pretrained(model_dir)
        rng = np.random.default_rng(0)
        (tmp / "img").mkdir()
        rows = []
        for i in range(max(SIZES)):
            path = tmp / "img" / f"{i:05d}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
            rows.append({"sample_id": f"s{i:05d}", "path": str(path), "y": i % 2})
        peaks: dict[int, list[float]] = {n: [] for n in SIZES}
        for rep in range(REPEATS):
            for n in SIZES:
                manifest = tmp / f"manifest{n}.csv"
                pd.DataFrame(rows[:n]).to_csv(manifest, index=False)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(manifest), str(model_dir), str(tmp / f"cache{n}-{rep}")],
                    capture_output=True, text=True, check=True,
                )
                report = json.loads(out.stdout.strip().splitlines()[-1])
                assert report["extracted"] == n, report
                peaks[n].append(report["peak_kb"] / 1024)
                print(f"repeat {rep}, {n} samples: peak RSS {peaks[n][-1]:.0f} MiB, extraction {report['seconds']:.1f} "
                      f"s, stored on disk {report['stored_bytes'] / 2**20:.1f} MiB", flush=True)
        for n, values in peaks.items():
            print(f"{n} samples: peak RSS {spread(values, 'MiB', 0)}")
        print(f"growth per repeat: {spread(ratios(peaks[SIZES[1]], peaks[SIZES[0]]), unit='')}; {load_average()}")
        print(f"rss_growth={median(peaks[SIZES[1]]) / median(peaks[SIZES[0]]):.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
