"""The run report: one self-contained HTML file (figures embedded) next to the run's metrics.

The page is a list of sections, each its own partial template under ``templates/run/`` rendered with the same
context (``RUN_SECTIONS``): a new section is a template and a line here.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from fmprobe import __version__
from fmprobe.atomic import write_text
from fmprobe.config import Experiment
from fmprobe.forks import fork_map
from fmprobe.report.config_view import applied_config, loss_text
from fmprobe.report.efficiency import run_section
from fmprobe.report.plots import (
    confusion_matrix_plot,
    per_class_bars,
    regression_figure,
    reliability_diagram,
    training_curves,
)
from fmprobe.report.terminal import baseline_text, fmt, headline_rows, params_text, runner_up_text, verdict_parts
from fmprobe.report.templating import render

RUN_SECTIONS = [
    "run/verdict.html",
    "run/splits.html",
    "run/flags.html",
    "run/results.html",
    "run/segmentation.html",
    "run/efficiency.html",
    "run/heads.html",
    "run/subgroups.html",
    "run/training_inputs.html",
    "run/metrics.html",
    "run/skipped.html",
    "run/config.html",
]


def per_class_groups(metrics: dict[str, Any], head: str) -> list[tuple[str, list[str], list[float], list[float],
                                                                       list[float], list[float | None]]]:  # fmt: skip
    """Per metric with per-class / per-target values (``ap/<label>``...): names, test means, CI ends, baselines.
    A single target repeats the aggregate, so it has none."""
    h = metrics["heads"][head]
    test = h["splits"]["test"]["mean"]
    out = []
    for prefix in dict.fromkeys(k.split("/")[0] for k in test if "/" in k):
        keys = [k for k in test if k.startswith(prefix + "/")]
        if len(keys) < 2 or not all(k in h["test_ci"] for k in keys):
            continue
        out.append((prefix, [k.split("/", 1)[1] for k in keys], [test[k] for k in keys],
                    [h["test_ci"][k][0] for k in keys], [h["test_ci"][k][1] for k in keys],
                    [metrics["baseline"]["test"].get(k) for k in keys]))  # fmt: skip
    return out


def shown_metrics(metrics: dict[str, Any], head: str) -> list[str]:
    """The metric rows of a head's table: a single target's ``r2/<target>`` repeats ``r2`` and is left out."""
    names = list(metrics["heads"][head]["splits"]["test"]["mean"])
    if len(metrics["task"]["targets"]) == 1 and metrics["task"]["type"] == "regression":
        names = [n for n in names if "/" not in n]
    return names


def subgroup_view(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The selected head's subgroup table with each label's true and predicted shares in one column."""
    sg = metrics["heads"][metrics["selection"]["best_head"]].get("subgroups")
    if not sg or not sg["groups"]:
        return None
    keys = list(next(iter(sg["groups"].values())))
    paired = [k.split("/", 1)[1] for k in keys if k.startswith("true/") and "pred/" + k.split("/", 1)[1] in keys]
    single = [k for k in keys if not any(k == f"{side}/{n}" for n in paired for side in ("true", "pred"))]
    return {**sg, "paired": paired, "single": single}


def _seed_mean_test(predictions: pd.DataFrame, head: str, columns: list[str]) -> pd.DataFrame:
    test = predictions[(predictions["split"] == "test") & (predictions["head"] == head)]
    return test.groupby("sample_id")[columns].mean()


def _confusion(metrics: dict[str, Any], predictions: pd.DataFrame, head: str) -> str:
    """Multiclass: the head's test confusion matrix, from the seed-mean probabilities."""
    from sklearn.metrics import confusion_matrix

    names = metrics["task"]["class_names"]
    target = metrics["task"]["targets"][0]
    mean = _seed_mean_test(predictions, head, [f"p/{c}" for c in names] + [f"y/{target}"])
    predicted = mean[[f"p/{c}" for c in names]].to_numpy().argmax(axis=1)
    matrix = confusion_matrix(mean[f"y/{target}"].to_numpy().astype(int), predicted, labels=list(range(len(names))))
    return confusion_matrix_plot(matrix, names, f"{head}: test confusion (argmax of the {len(metrics['seeds'])}-seed "
                                                "mean)")  # fmt: skip


def _regression(metrics: dict[str, Any], predictions: pd.DataFrame, head: str) -> str:
    targets = metrics["task"]["targets"]
    mean = _seed_mean_test(predictions, head, [f"y/{t}" for t in targets] + [f"p/{t}" for t in targets])
    test = metrics["heads"][head]["splits"]["test"]["mean"]
    r2 = [test.get(f"r2/{t}", test["r2"]) for t in targets]
    return regression_figure(mean[[f"y/{t}" for t in targets]].to_numpy(), mean[[f"p/{t}" for t in targets]].to_numpy(),
                             targets, r2, f"{head}: test predictions (mean of {len(metrics['seeds'])} seeds)")


def head_figures(metrics: dict[str, Any], curves: pd.DataFrame, predictions: pd.DataFrame | None, head: str
                 ) -> dict[str, str]:  # fmt: skip
    """Every figure of one head, base64 PNG by kind: per-class bars, confusion, calibration, regression, curves."""
    task = metrics["task"]["type"]
    h = metrics["heads"][head]
    out: dict[str, str] = {}
    groups = per_class_groups(metrics, head)
    if groups:
        out["per_class"] = per_class_bars(groups, f"{head}: per class / target on test (bars: seed mean, whiskers: "
                                                  f"{int(metrics['ci_level'] * 100)}% CI)")  # fmt: skip
    if predictions is not None and task == "multiclass":
        out["confusion"] = _confusion(metrics, predictions, head)
    if h.get("calibration_seed_mean"):
        out["calibration"] = reliability_diagram(h["calibration_seed_mean"], h["calibration_test"],
                                                 f"{head}: calibration on test")  # fmt: skip
    if predictions is not None and task == "regression":
        out["regression"] = _regression(metrics, predictions, head)
    if len(curves) and (curves["head"] == head).any():
        out["curves"] = training_curves(curves, head, metrics["task"]["primary_metric"])
    return out


def render_run_report(exp: Experiment, metrics: dict[str, Any], curves: pd.DataFrame, run_id: str,
                      predictions: pd.DataFrame | None = None) -> str:  # fmt: skip
    names = list(metrics["heads"])
    figures = fork_map(partial(head_figures, metrics, curves, predictions), names)  # the heads' figures side by side
    heads = [{"name": name, "h": metrics["heads"][name], "figures": figs, "metrics": shown_metrics(metrics, name),
              "loss": loss_text(metrics["heads"][name]["loss"], metrics)} for name, figs in zip(names, figures)]
    return render(
        "run.html", sections=RUN_SECTIONS,
        m=metrics, rows=headline_rows(metrics), heads=heads, verdict=verdict_parts(metrics),
        subgroups=subgroup_view(metrics),
        runner_up=runner_up_text(metrics, metrics["selection"]["runner_up"])
        if metrics["selection"].get("runner_up") else None,
        fmt=fmt, baseline=lambda metric, value: baseline_text(metrics, metric, value), params=params_text,
        config_yaml=applied_config(exp), run_id=run_id, version=__version__, efficiency=run_section(metrics),
        model_name=exp.model.checkpoint if exp.model.kind == "vjepa2-native" else exp.model.name,
    )


def write_run_report(run_dir: Path, exp: Experiment, metrics: dict[str, Any], curves: pd.DataFrame) -> Path:
    dest = run_dir / "report.html"
    preds = run_dir / "predictions.parquet"
    predictions = pd.read_parquet(preds) if preds.exists() else None
    write_text(dest, render_run_report(exp, metrics, curves, run_dir.name, predictions))
    return dest
