"""Determinism: the same config and seeds give the same metrics.json, predictions and checkpoints on CPU.

The first run extracts features and the second is served from the cache, so this also checks that cached
features train exactly like fresh ones. Only ``wall_seconds`` may differ, and each run's ``reproduced`` flag names
the other (see fault_injection.comparable_metrics).
"""

from __future__ import annotations

import json

import pandas as pd
import torch

import fault_injection as fi
from fmprobe.config import load_config
from fmprobe.experiments.run import run_experiment


def test_two_runs_of_one_config_write_identical_results(tmp_path):
    model = fi.save_tiny_dinov2(tmp_path / "model")
    config = fi.write_project(tmp_path / "project", model, n=24)
    first = run_experiment(load_config(config), progress=False).run_dir
    second = run_experiment(load_config(config), progress=False).run_dir
    assert first != second

    assert fi.comparable_metrics(first) == fi.comparable_metrics(second)
    for run, other in ((first, second), (second, first)):  # same config, same outputs: a reproduction, no error
        flags = json.loads((run / "metrics.json").read_text())["flags"]
        assert not [f for f in flags if f["name"] == "identical_predictions"]
        assert all(f"{other.name}/" in " ".join(f["details"]["identical"]) for f in flags if f["name"] == "reproduced")
        assert {f["head"] for f in flags if f["name"] == "reproduced"} == set(fi.comparable_metrics(run)["heads"])
    pd.testing.assert_frame_equal(pd.read_parquet(first / "predictions.parquet"),
                                  pd.read_parquet(second / "predictions.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(first / "curves.parquet"), pd.read_parquet(second / "curves.parquet"))
    checkpoints = sorted(p.relative_to(first) for p in first.glob("checkpoints/*/*/*.pt"))
    assert checkpoints and checkpoints == sorted(p.relative_to(second) for p in second.glob("checkpoints/*/*/*.pt"))
    for rel in checkpoints:
        x, y = torch.load(first / rel), torch.load(second / rel)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
