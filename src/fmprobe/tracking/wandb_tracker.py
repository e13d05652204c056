"""Weights & Biases, always offline: files under ``<runs_dir>/wandb``; ``wandb sync <that dir>`` uploads them.

W&B's own console capture and end-of-run printout are off (the run directory holds fmprobe's output);
the artifact references the run's files in place, so ``wandb sync`` needs the run directory.

One W&B run per fmprobe run. Each (head, seed) curve gets its own step metric (``<head>/seed<k>/epoch``),
since W&B's global step must only grow and the heads' epochs restart at 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fmprobe.config import Experiment
from fmprobe.tracking.records import ARTIFACTS, epoch_series, flat_params, summary_metrics, tags


def log_run(exp: Experiment, run_dir: Path, metrics: dict[str, Any], curves: pd.DataFrame) -> str:
    """Log the run; returns the W&B run id."""
    import wandb

    root = Path(exp.runs_dir).expanduser().resolve()
    run = wandb.init(project=exp.tracking.wandb_project or exp.name, name=run_dir.name, dir=str(root),
                     mode="offline", config=flat_params(exp), tags=[metrics["task"]["type"]],
                     notes=str(run_dir), settings=wandb.Settings(console="off", silent=True))
    try:
        run.summary.update({**summary_metrics(metrics), **tags(metrics, run_dir)})
        rows: dict[tuple[str, int], dict[str, float]] = {}  # one history row per (head, seed, epoch)
        defined: set[str] = set()
        for key, epoch, value in epoch_series(curves):
            step = f"{key.rsplit('/', 1)[0]}/epoch"
            if step not in defined:
                run.define_metric(step, hidden=True)
            if key not in defined:
                run.define_metric(key, step_metric=step)
            defined.update((step, key))
            rows.setdefault((step, epoch), {})[key] = value
        for (step, epoch), values in rows.items():
            run.log({**values, step: epoch})
        artifact = wandb.Artifact(name=f"fmprobe-{run_dir.name}", type="fmprobe-run")
        for name in ARTIFACTS:
            if (run_dir / name).exists():  # a run directory is never overwritten: reference, don't copy
                artifact.add_file(str(run_dir / name), policy="immutable")
        run.log_artifact(artifact)
        return run.id
    finally:
        run.finish()
        wandb.teardown()  # finish() can return before wandb-core has written the last records; this waits
