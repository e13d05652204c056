"""MLflow: one MLflow run per fmprobe run, in the experiment of the same name.

Default store: ``sqlite:///<runs_dir>/mlflow.db`` with artifacts under ``<runs_dir>/mlflow-artifacts``
(``mlflow ui --backend-store-uri sqlite:///<runs_dir>/mlflow.db`` shows them). The client API is used
instead of mlflow's global active run, so tracking never leaks between runs of one process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from fmprobe.config import Experiment
from fmprobe.tracking.records import ARTIFACTS, epoch_series, flat_params, summary_metrics, tags

BATCH = 500  # mlflow's log_batch takes at most 1000 metrics and 100 params per call
PARAM_LIMIT = 6000  # mlflow's maximum param value length


def tracking_uri(exp: Experiment) -> str:
    if exp.tracking.mlflow_uri:
        return exp.tracking.mlflow_uri
    return f"sqlite:///{Path(exp.runs_dir).expanduser().resolve() / 'mlflow.db'}"


def log_run(exp: Experiment, run_dir: Path, metrics: dict[str, Any], curves: pd.DataFrame) -> str:
    """Log the run; returns the MLflow run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(exp))
    found = client.get_experiment_by_name(exp.name)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        artifacts = Path(exp.runs_dir).expanduser().resolve() / "mlflow-artifacts" / exp.name
        experiment_id = client.create_experiment(exp.name, artifact_location=artifacts.as_uri())
    run = client.create_run(experiment_id, run_name=run_dir.name,
                            tags={k: v for k, v in tags(metrics, run_dir).items()})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = [Param(k, v[:PARAM_LIMIT]) for k, v in flat_params(exp).items()]
    values = [Metric(k, v, now, 0) for k, v in summary_metrics(metrics).items()]
    values += [Metric(k, v, now, step) for k, step, v in epoch_series(curves)]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(values), BATCH):
        client.log_batch(run_id, metrics=values[i : i + BATCH])
    client.log_batch(run_id, tags=[RunTag("fmprobe.experiment", exp.name)])
    for name in ARTIFACTS:
        if (run_dir / name).exists():
            client.log_artifact(run_id, str(run_dir / name))
    client.set_terminated(run_id)
    return run_id
