"""`fmprobe demo`: the embedded default, needing no download.

Builds the MNI152 patch dataset, writes the two demo configs next to it (so a user can edit and rerun
them with `fmprobe run`), and runs both on the offline DINOv2-S. Features are extracted once: the
second task reads them from the cache.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fmprobe.atomic import write_text
from fmprobe.config import load_config
from fmprobe.demo.dataset import build_demo_dataset
from fmprobe.experiments.run import RunResult, run_experiment

DEMO_CONFIGS = ("tissues.yaml", "gm_fraction.yaml")


def write_demo_configs(out_dir: Path) -> list[Path]:
    paths = []
    for name in DEMO_CONFIGS:
        dest = out_dir / name
        if not dest.exists():
            write_text(dest, resources.files("fmprobe.demo").joinpath(name).read_text())
        paths.append(dest)
    return paths


def run_demo(out_dir: str | Path = "fmprobe-demo", *, progress: bool = True,
             overrides: dict | None = None) -> list[RunResult]:
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    build_demo_dataset(out)
    return [run_experiment(load_config(p, overrides), progress=progress) for p in write_demo_configs(out)]
