"""`fmprobe demo`: the embedded default, needing no download.

Builds the MNI152 patch dataset, writes the two demo configs next to it (so a user can edit and rerun
them with `fmprobe run`), and runs both on the offline DINOv2-S. Features are extracted once: the
second task reads them from the cache.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd

from fmprobe.atomic import write_text
from fmprobe.config import Experiment, load_config
from fmprobe.demo.dataset import build_demo_dataset
from fmprobe.experiments.run import RunResult, run_experiment
from fmprobe.report.progress import Progress

DEMO_CONFIGS = ("tissues.yaml", "gm_fraction.yaml")


def write_demo_configs(out_dir: Path) -> list[Path]:
    paths = []
    for name in DEMO_CONFIGS:
        dest = out_dir / name
        if not dest.exists():
            write_text(dest, resources.files("fmprobe.demo").joinpath(name).read_text())
        paths.append(dest)
    return paths


def run_demo(out_dir: str | Path = "fmprobe-demo", *, progress: bool | Progress = True,
             overrides: dict | None = None) -> list[RunResult]:
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    display = progress if isinstance(progress, Progress) else Progress(enabled=progress)
    manifest = build_demo_dataset(out)
    configs = write_demo_configs(out)
    experiments = [load_config(p, overrides) for p in configs]
    for line in introduction(configs, experiments, len(pd.read_csv(manifest))):
        display.line(line)
    return [run_experiment(exp, progress=display) for exp in experiments]


def introduction(configs: list[Path], experiments: list[Experiment], samples: int) -> list[str]:
    """What the demo is about to do: its data, model and probes, and each task's question (the first comment line
    of its config, which the user can edit and rerun)."""
    first = experiments[0]
    heads = " and ".join(f"{'an' if h.type[0] in 'aeiou' else 'a'} {h.type}" for h in first.heads)
    lines = [f"fmprobe demo: {samples} patches of axial slices of the MNI152 T1 brain template (nilearn, offline), "
             f"{first.model.name} frozen, {heads} probe, seeds {first.train.seeds}; two tasks:"]  # fmt: skip
    for i, (path, exp) in enumerate(zip(configs, experiments), start=1):
        question = next((line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                         if line.startswith("# fmprobe demo:")), "")  # fmt: skip
        lines.append(f"  {i}. {exp.name} ({exp.task.type}; {', '.join(exp.task.targets)}): {question} ({path})")
    return lines
