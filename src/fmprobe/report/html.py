"""The run report: one self-contained HTML file (figures embedded) next to the run's metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fmprobe import __version__
from fmprobe.atomic import write_text
from fmprobe.config import Experiment, dump_config
from fmprobe.report.efficiency import run_section
from fmprobe.report.plots import confusion_matrix_plot, metric_bars, reliability_diagram, training_curves
from fmprobe.report.terminal import fmt, headline_rows, params_text
from fmprobe.report.templating import render


def _per_class_bars(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """Bars with CIs for the per-class / per-target metrics of the selected head."""
    head = metrics["selection"]["best_head"]
    h = metrics["heads"][head]
    test = h["splits"]["test"]["mean"]
    out = []
    prefixes = sorted({k.split("/")[0] for k in test if "/" in k})
    for prefix in prefixes:
        keys = [k for k in test if k.startswith(prefix + "/")]
        if not keys or not all(k in h["test_ci"] for k in keys):
            continue
        values = [test[k] for k in keys]
        lows = [h["test_ci"][k][0] for k in keys]
        highs = [h["test_ci"][k][1] for k in keys]
        base = [metrics["baseline"]["test"].get(k) for k in keys]
        names = [k.split("/", 1)[1] for k in keys]
        out.append((f"{head}: {prefix} per class/target (test)", metric_bars(names, values, lows, highs, base, prefix)))
    return out


def _reliability(metrics: dict[str, Any]) -> str | None:
    """Reliability diagram of the selected head on test (binary, multiclass top-label, multilabel per label)."""
    head = metrics["selection"]["best_head"]
    cal = metrics["heads"][head].get("calibration_test")
    return reliability_diagram(cal, f"{head}: calibration on test") if cal else None


def _confusion(metrics: dict[str, Any], predictions: pd.DataFrame | None) -> str | None:
    """Multiclass: confusion matrix of the selected head on test, from the seed-mean probabilities."""
    if metrics["task"]["type"] != "multiclass" or predictions is None:
        return None
    from sklearn.metrics import confusion_matrix

    head = metrics["selection"]["best_head"]
    names = metrics["task"]["class_names"]
    target = metrics["task"]["targets"][0]
    test = predictions[(predictions["split"] == "test") & (predictions["head"] == head)]
    mean = test.groupby("sample_id")[[f"p/{c}" for c in names] + [f"y/{target}"]].mean()
    predicted = mean[[f"p/{c}" for c in names]].to_numpy().argmax(axis=1)
    matrix = confusion_matrix(mean[f"y/{target}"].to_numpy().astype(int), predicted, labels=list(range(len(names))))
    n_seeds = test["seed"].nunique()
    return confusion_matrix_plot(matrix, names, f"{head}: test confusion (argmax of the {n_seeds}-seed mean)")


def render_run_report(exp: Experiment, metrics: dict[str, Any], curves: pd.DataFrame, run_id: str,
                      predictions: pd.DataFrame | None = None) -> str:
    primary = metrics["task"]["primary_metric"]
    curve_imgs = {h: training_curves(curves, h, primary) for h in metrics["heads"]
                  if len(curves) and (curves["head"] == h).any()}  # fitted heads have no epochs
    return render(
        "run.html",
        m=metrics, rows=headline_rows(metrics), bars=_per_class_bars(metrics), curves=curve_imgs,
        reliability=_reliability(metrics), confusion=_confusion(metrics, predictions),
        fmt=fmt, params=params_text, config_yaml=dump_config(exp), run_id=run_id, version=__version__,
        efficiency=run_section(metrics),
        model_name=exp.model.checkpoint if exp.model.kind == "vjepa2-native" else exp.model.name,
    )


def write_run_report(run_dir: Path, exp: Experiment, metrics: dict[str, Any], curves: pd.DataFrame) -> Path:
    dest = run_dir / "report.html"
    preds = run_dir / "predictions.parquet"
    predictions = pd.read_parquet(preds) if preds.exists() else None
    write_text(dest, render_run_report(exp, metrics, curves, run_dir.name, predictions))
    return dest
