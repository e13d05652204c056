"""Two extractions on one cache split the work: wall time of two processes started together ÷ one process alone.

Each child process imports fmprobe, loads the model and waits at a barrier; the parent releases the barrier and
takes the time until the last child has finished extracting. Children run one torch thread each, so one process
uses one core and two processes fill the machine's 2 cores. Each repeat extracts the same images into a fresh cache
with one process and into another fresh cache with two, back to back, the order alternating from one repeat to the
next (the machine is shared; timing helpers in benchmarks/timing.py); the benchmark prints
min / median / max of the ratio over the repeats, each process's share and the rows stored per sample (1.00: each
sample stored once), and the same ratio in CPU time of the busiest process (what the wall ratio is when each
process has a free core: on a machine shared with other work, the wall ratio also measures their load).
``--repeats N`` (default 3).
Last line: ``two_process_wall_ratio=<median of T(two processes) ÷ T(one)>`` (goal <= 0.55: half, or better).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from timing import load_average, median, ratios, spread

N_IMAGES, SIZE, BATCH, SHARD = 96, 224, 8, 16


def child(manifest: str, model_dir: str, cache: str, folder: str) -> None:
    """Load everything, say ready, wait for the go, extract, report when it ended."""
    import torch

    from fmprobe.backbones.registry import load_encoder
    from fmprobe.config import parse_config
    from fmprobe.data.manifest import load_manifest
    from fmprobe.features.extract import run_extraction

    torch.set_num_threads(1)
    exp = parse_config({
        "name": "two",
        "data": {"manifest": manifest, "group_column": None, "split_column": None},
        "task": {"type": "binary", "targets": ["y"]},
        "model": {"name": model_dir},
        "features": {"cache_dir": cache, "batch_size": BATCH, "shard_size": SHARD},
    })
    manifest_rows = load_manifest(exp.data, exp.task)
    encoder = load_encoder(exp.model)
    (Path(folder) / f"ready-{os.getpid()}").touch()
    while not (Path(folder) / "go").exists():
        time.sleep(0.002)
    cpu = time.process_time()
    result = run_extraction(exp, manifest_rows, encoder, progress=False)
    print(json.dumps({"end": time.time(), "cpu": time.process_time() - cpu, "extracted": result.extracted,
                      "samples": len(result.features)}))


def timed(
    n_processes: int, manifest: Path, model_dir: Path, cache: Path, folder: Path
) -> tuple[float, float, list[int]]:
    """Wall seconds from the go to the last process's end, the CPU seconds of the busiest process, and how many
    samples each process extracted."""
    folder.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(manifest), str(model_dir), str(cache),
                               str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n_processes)]
    while len(list(folder.glob("ready-*"))) < n_processes:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("\n".join(p.communicate()[1][-3000:] for p in procs))
        time.sleep(0.01)
    start = time.time()
    (folder / "go").touch()
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode:
            raise RuntimeError(err[-3000:])
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["samples"] == N_IMAGES for r in reports), reports
    return max(r["end"] for r in reports) - start, max(r["cpu"] for r in reports), [r["extracted"] for r in reports]


def stored_rows(cache: Path) -> int:
    return sum(len(json.loads(m.read_text())["sample_ids"]) for m in cache.glob("*/shard-*/meta.json"))


def main(repeats: int) -> None:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    print(f"{N_IMAGES} PNG {SIZE}x{SIZE}, random-init ViT-Ti/14, batch {BATCH}, shard {SHARD}, one torch thread per "
          f"process, {repeats} repeats", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                                 patch_size=14, image_size=224)).save_pretrained(tmp / "model")
        rng = np.random.default_rng(0)
        (tmp / "img").mkdir()
        rows = []
        for i in range(N_IMAGES):
            path = tmp / "img" / f"{i:04d}.png"
            small = rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((SIZE, SIZE), Image.BILINEAR).save(path)
            rows.append({"sample_id": f"s{i:04d}", "path": str(path), "y": i % 2})
        manifest = tmp / "manifest.csv"
        pd.DataFrame(rows).to_csv(manifest, index=False)
        ones, twos, one_cpus, two_cpus, stored = [], [], [], [], []
        for rep in range(repeats):
            for n in (1, 2) if rep % 2 == 0 else (2, 1):
                wall, cpu, extracted = timed(n, manifest, tmp / "model", tmp / f"cache-{n}-{rep}", tmp / f"go-{n}-{rep}")
                (ones if n == 1 else twos).append(wall)
                (one_cpus if n == 1 else two_cpus).append(cpu)
                if n == 2:
                    split = extracted
            stored.append(stored_rows(tmp / f"cache-2-{rep}") / N_IMAGES)
            print(f"repeat {rep}: one process {ones[-1]:.2f} s, two processes {twos[-1]:.2f} s (extracted {split[0]} + "
                  f"{split[1]}), ratio {twos[-1] / ones[-1]:.3f}; busiest process's CPU time two ÷ one "
                  f"{two_cpus[-1] / one_cpus[-1]:.3f}; rows stored per sample {stored[-1]:.2f}; {load_average()}",
                  flush=True)
        wall_ratios = ratios(twos, ones)
        print(f"one process: {spread(ones)}; two processes: {spread(twos)}")
        print(f"rows stored per sample with two processes: {spread(stored, unit='')}")
        print(f"CPU time of the busiest of two processes ÷ one process's: {spread(ratios(two_cpus, one_cpus), unit='')}"
              " (the wall ratio on a machine with a free core per process)")
        print(f"wall ratio two ÷ one: {spread(wall_ratios, unit='')}; {load_average()}")
        print(f"two_process_wall_ratio={median(wall_ratios):.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main(int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 3)
