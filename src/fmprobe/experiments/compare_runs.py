"""`fmprobe compare RUN_A RUN_B`: is A really better than B on the same test samples?

Paired bootstrap of the metric difference on the seed-mean test outputs of each run's selected head
(or a named head), resampling groups when the runs had groups. Runs evaluated on different test
samples, or with different targets, are refused: that would compare the samples, not the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.task import TaskMetric
from fmprobe.evaluate.compare import align_predictions, paired_bootstrap

# Metrics that need a decision threshold differ by each run's tuned thresholds; compare scores instead.
_THRESHOLD_FREE = {
    "binary": ("auroc", "ap"),
    "multilabel": ("map", "macro_auroc"),
    "multiclass": ("balanced_accuracy", "accuracy", "macro_f1", "auroc_ovr"),
    "regression": ("r2", "mae", "rmse", "pearson_r"),
}


def _load(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    metrics_path, preds_path = run_dir / "metrics.json", run_dir / "predictions.parquet"
    for path in (metrics_path, preds_path):
        if not path.exists():
            raise FmprobeError(f"'{run_dir}' is not a finished run directory: {path.name} is missing")
    return json.loads(metrics_path.read_text()), pd.read_parquet(preds_path)


def _seed_mean(preds: pd.DataFrame, head: str, run: str) -> pd.DataFrame:
    rows = preds[(preds["head"] == head) & (preds["split"] == "test")]
    if rows.empty:
        raise FmprobeError(f"run {run} has no test predictions for head '{head}' (heads: {sorted(preds['head'].unique())})")
    score_cols = [c for c in rows.columns if c.startswith("p/")]
    keep = [c for c in rows.columns if c.startswith("y/")] + ["group", "split"]
    firsts = rows.groupby("sample_id", sort=True)[keep].first()
    means = rows.groupby("sample_id", sort=True)[score_cols].mean()
    return firsts.join(means).reset_index()


def _targets(df: pd.DataFrame, task_type: str) -> np.ndarray:
    y = df[[c for c in df.columns if c.startswith("y/")]].to_numpy()
    if task_type == "binary":
        return y[:, 0].astype(np.float64)
    if task_type == "multiclass":
        return y[:, 0].astype(np.int64)
    return y.astype(np.float64)


def _scores(df: pd.DataFrame, task_type: str) -> np.ndarray:
    s = df[[c for c in df.columns if c.startswith("p/")]].to_numpy(dtype=np.float64)
    return s[:, 0] if task_type == "binary" else s


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    *,
    head_a: str | None = None,
    head_b: str | None = None,
    metric: str | None = None,
    n_resamples: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    run_a, run_b = Path(run_a), Path(run_b)
    (ma, pa), (mb, pb) = _load(run_a), _load(run_b)
    task = ma["task"]
    if (task["type"], task["targets"]) != (mb["task"]["type"], mb["task"]["targets"]):
        raise FmprobeError(
            f"the runs answer different tasks: A {task['type']} {task['targets']}, "
            f"B {mb['task']['type']} {mb['task']['targets']}"
        )
    metric = metric or task["primary_metric"]
    if metric not in _THRESHOLD_FREE[task["type"]]:
        raise FmprobeError(
            f"compare takes a metric that needs no decision threshold; for a {task['type']} task choose one of "
            f"{', '.join(_THRESHOLD_FREE[task['type']])}"
        )
    head_a = head_a or ma["selection"]["best_head"]
    head_b = head_b or mb["selection"]["best_head"]
    a, b = _seed_mean(pa, head_a, "A"), _seed_mean(pb, head_b, "B")
    y_cols = [c for c in a.columns if c.startswith("y/")]
    a, b = align_predictions(a, b, same_columns=y_cols)
    label_names = task["class_names"] if task["type"] == "multiclass" else task["targets"]
    fn = TaskMetric(task["type"], class_names=label_names, target_names=task["targets"])
    grouped = ma["bootstrap"]["unit"] == "group" and mb["bootstrap"]["unit"] == "group"
    result = paired_bootstrap(
        fn, _targets(a, task["type"]), _scores(a, task["type"]), _scores(b, task["type"]), metric=metric,
        groups=a["group"].to_numpy() if grouped else None, n_resamples=n_resamples, ci=ci, seed=seed,
    )
    return {
        "metric": metric,
        "a": {"run": str(run_a), "head": head_a},
        "b": {"run": str(run_b), "head": head_b},
        "n_test": len(a),
        "resampled": "groups" if grouped else "samples",
        "n_resamples": n_resamples,
        "ci_level": ci,
        **result,
    }
