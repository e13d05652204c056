"""Tracking: opt-in, refused with the pip command when the package is missing, MLflow logged for real."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
from run_factories import base_config, fake_run

from fmprobe.config import parse_config
from fmprobe.errors import ConfigError
from fmprobe.tracking import epoch_series, summary_metrics


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_enabled_tracker_without_its_package_is_a_config_error(tmp_path, monkeypatch, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    cfg = {"name": "t", "data": {"manifest": "m.csv"}, "task": {"type": "binary", "targets": ["y"]},
           "tracking": {package: True}}
    with pytest.raises(ConfigError, match=f"tracking.{package}: true needs the {package} package.*pip install {package}"):
        parse_config(cfg)
    cfg["tracking"] = {package: False}
    parse_config(cfg)  # off by default and when disabled: nothing is required


def test_summary_and_epoch_series(tmp_path):
    import json

    run = fake_run(tmp_path / "runs", "r1", {"lin": {"val": 0.9, "test": 0.8, "ci": (0.7, float("nan"))}}, wall=4.0)
    metrics = json.loads((run / "metrics.json").read_text())
    summary = summary_metrics(metrics)
    assert summary["test/lin/auroc"] == 0.8 and summary["test/lin/auroc/ci_lo"] == 0.7
    assert "test/lin/auroc/ci_hi" not in summary  # not finite: left out rather than logged as NaN
    assert summary["selected/auroc"] == 0.8 and summary["wall_seconds"] == 4.0
    curves = pd.DataFrame({"head": ["lin", "lin"], "seed": [0, 0], "epoch": [0, 1], "val_loss": [0.7, 0.5],
                           "val_f1/a+b": [0.1, 0.2]})
    assert epoch_series(curves) == [("lin/seed0/val_loss", 0, 0.7), ("lin/seed0/val_f1/a_b", 0, 0.1),
                                    ("lin/seed0/val_loss", 1, 0.5), ("lin/seed0/val_f1/a_b", 1, 0.2)]


@pytest.mark.slow  # creating the MLflow SQLite schema (alembic migrations) takes ~20 s
@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (pip install mlflow)")
def test_mlflow_receives_params_metrics_per_epoch_and_artifacts(tmp_path):
    import mlflow

    from fmprobe.experiments.run import run_experiment

    cfg = base_config(tmp_path)
    cfg["tracking"] = {"mlflow": True}
    result = run_experiment(parse_config(cfg), progress=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == result.run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["heads.0.type"] == "linear"
    test_auroc = result.metrics["heads"]["linear"]["splits"]["test"]["mean"]["auroc"]
    assert run.data.metrics["test/linear/auroc"] == pytest.approx(test_auroc)
    history = client.get_metric_history(run.info.run_id, "linear/seed1/val_loss")
    assert sorted(m.step for m in history) == list(range(1, cfg["train"]["epochs"] + 1))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.resolved.yaml", "report.html", "predictions.parquet"} <= artifacts
    assert run.data.tags["fmprobe.config_hash"] == result.metrics["config_hash"]
