"""Weights & Biases, always offline: files under ``<runs_dir>/wandb``; ``wandb sync <that dir>`` uploads them.

One W&B run per fmprobe run. Each (head, seed) curve gets its own step metric (``<head>/seed<k>/epoch``),
since W&B's global step must only grow and the heads' epochs restart at 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fmprobe.config import Experiment
from fmprobe.tracking import ARTIFACTS, epoch_series, flat_params, summary_metrics, tags


def log_run(exp: Experiment, run_dir: Path, metrics: dict[str, Any], curves: pd.DataFrame) -> str:
    """Log the run; returns the W&B run id."""
    import wandb

    root = Path(exp.runs_dir).expanduser().resolve()
    run = wandb.init(project=exp.tracking.wandb_project or exp.name, name=run_dir.name, dir=str(root),
                     mode="offline", config=flat_params(exp), tags=[metrics["task"]["type"]],
                     notes=str(run_dir))
    try:
        run.summary.update({**summary_metrics(metrics), **tags(metrics, run_dir)})
        series: dict[str, list[tuple[int, float]]] = {}
        for key, epoch, value in epoch_series(curves):
            series.setdefault(key, []).append((epoch, value))
        for key, points in series.items():
            step = f"{key.rsplit('/', 1)[0]}/epoch"
            run.define_metric(step, hidden=True)
            run.define_metric(key, step_metric=step)
            for epoch, value in points:
                run.log({key: value, step: epoch})
        artifact = wandb.Artifact(name=f"fmprobe-{run_dir.name}", type="fmprobe-run")
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                artifact.add_file(str(run_dir / name))
        run.log_artifact(artifact)
        return run.id
    finally:
        run.finish()
