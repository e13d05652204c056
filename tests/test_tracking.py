"""Tracking: opt-in, refused with the pip command when the package is missing, MLflow logged for real."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
from run_factories import base_config, fake_run

from fmprobe.config import parse_config
from fmprobe.errors import ConfigError
from fmprobe.tracking.records import epoch_series, summary_metrics, tags


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
    metrics["flags"] = [{"name": "reproduced", "severity": "info", "head": "lin"},
                        {"name": "tiny_class", "severity": "warning", "head": "lin"}]  # fmt: skip
    assert tags(metrics, run)["fmprobe.flags"] == "tiny_class"  # info casts no doubt, as in every flags column
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


def _wandb_records(path):
    """The protobuf records of W&B's offline ``.wandb`` file (a LevelDB-style log: 32 KiB blocks of
    ``crc32 | length | type`` chunks), decoded with W&B's own ``Record`` message."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_run_holds_params_metrics_per_epoch_and_artifacts(tmp_path, monkeypatch):
    import json

    from fmprobe.experiments.run import run_experiment

    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = base_config(tmp_path)
    cfg["tracking"] = {"wandb": True}
    result = run_experiment(parse_config(cfg), progress=False)
    (log,) = (tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
    config, history, summary, artifacts, runs = {}, [], {}, [], []
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            runs.append(record.run)
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            artifacts.append(record.artifact)
    (run,) = runs
    assert run.display_name == result.run_dir.name and run.project == "tiny"
    assert config["train.lr"] == "0.01" and config["heads.0.type"] == "linear"
    test_auroc = result.metrics["heads"]["linear"]["splits"]["test"]["mean"]["auroc"]
    assert summary["test/linear/auroc"] == pytest.approx(test_auroc)
    assert summary["fmprobe.config_hash"] == result.metrics["config_hash"]
    curves = pd.read_parquet(result.run_dir / "curves.parquet")
    expected = curves[(curves["head"] == "linear") & (curves["seed"] == 1)].sort_values("epoch")
    logged = [(h["linear/seed1/epoch"], h["linear/seed1/val_loss"]) for h in history if "linear/seed1/val_loss" in h]
    assert [e for e, _ in logged] == list(range(1, cfg["train"]["epochs"] + 1)) == expected["epoch"].tolist()
    assert [v for _, v in logged] == pytest.approx(expected["val_loss"].tolist())
    assert len(history) == len(curves)  # one history row per head, seed and epoch, all its columns together
    assert all(h["linear/seed1/val_auroc"] == pytest.approx(a) for h, a in
               zip([h for h in history if "linear/seed1/val_loss" in h], expected["val_auroc"]))
    (artifact,) = artifacts
    assert artifact.type == "fmprobe-run" and artifact.name == f"fmprobe-{result.run_dir.name}"
    files = {entry.path: entry for entry in artifact.manifest.contents}
    assert {"metrics.json", "config.resolved.yaml", "report.html", "predictions.parquet"} <= set(files)
    assert files["metrics.json"].size == (result.run_dir / "metrics.json").stat().st_size
