"""Experiment trackers (opt-in by ``tracking:`` in the config): MLflow and W&B, fed once a run is written.

The run directory stays the record; a tracker receives a copy: the flattened config as params, every
summary number (per head, split and metric, test CIs) as metrics, the per-epoch curves as stepped metrics
and the run's files as artifacts. Config validation already refused an enabled tracker whose package is
missing, so nothing here falls back silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fmprobe.config import Experiment


def log_run(exp: Experiment, run_dir: Path, metrics: dict[str, Any], curves: pd.DataFrame) -> None:
    if exp.tracking.mlflow:
        from fmprobe.tracking.mlflow_tracker import log_run as log_mlflow

        log_mlflow(exp, run_dir, metrics, curves)
    if exp.tracking.wandb:
        from fmprobe.tracking.wandb_tracker import log_run as log_wandb

        log_wandb(exp, run_dir, metrics, curves)
