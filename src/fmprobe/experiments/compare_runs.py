"""`fmprobe compare RUN_A RUN_B`: is A really better than B on the same test samples?

A head's score is the one every table shows (``evaluate.summary.SCORE_DEFINITION``): the mean over its members
(seeds, folds) of each member's test metric. The paired bootstrap resamples the test samples (groups when the
runs had groups) once for both heads and all their members, and gives the difference of the two scores with its
CI and p-value, next to A's and B's values; heads with identical test outputs are said to be so. Runs evaluated on
different test samples, or with different targets, are refused: that would compare the samples, not the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.bootstrap import METHOD, MemberMean
from fmprobe.evaluate.compare import align_predictions, paired_bootstrap
from fmprobe.evaluate.flags import prediction_hash
from fmprobe.evaluate.summary import SCORE_DEFINITION
from fmprobe.evaluate.task import TaskMetric

# Metrics that need a decision threshold differ by each run's tuned thresholds; compare scores instead.
THRESHOLD_FREE = {
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


def _test_rows(preds: pd.DataFrame, head: str, run: str) -> pd.DataFrame:
    rows = preds[(preds["head"] == head) & (preds["split"] == "test")]
    if rows.empty:
        raise FmprobeError(f"run {run} has no test predictions for head '{head}' (heads: {sorted(preds['head'].unique())})")
    return rows


def _samples(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per test sample (targets, group), as the first member scored it."""
    keep = [c for c in rows.columns if c.startswith("y/")] + ["group", "split"]
    return rows.groupby("sample_id", sort=True)[keep].first().reset_index()


def _member_scores(rows: pd.DataFrame, ids: pd.Series, task_type: str) -> list[np.ndarray]:
    """Each member's (fold, seed) test scores, in the order of ``ids``."""
    return [_scores(member.set_index("sample_id").loc[ids].reset_index(), task_type)
            for _, member in rows.groupby(["fold", "seed"], sort=True)]


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
    """metric(A) - metric(B) of two heads (default: each run's selected head), A's and B's values beside it."""
    run_a, run_b = Path(run_a), Path(run_b)
    (ma, pa), (mb, pb) = _load(run_a), _load(run_b)
    task = ma["task"]
    if (task["type"], task["targets"]) != (mb["task"]["type"], mb["task"]["targets"]):
        raise FmprobeError(
            f"the runs answer different tasks: A {task['type']} {task['targets']}, "
            f"B {mb['task']['type']} {mb['task']['targets']}"
        )
    metric = metric or task["primary_metric"]
    if metric not in THRESHOLD_FREE[task["type"]]:
        raise FmprobeError(
            f"compare takes a metric that needs no decision threshold; for a {task['type']} task choose one of "
            f"{', '.join(THRESHOLD_FREE[task['type']])}"
        )
    head_a = head_a or ma["selection"]["best_head"]
    head_b = head_b or mb["selection"]["best_head"]
    rows_a, rows_b = _test_rows(pa, head_a, "A"), _test_rows(pb, head_b, "B")
    y_cols = [c for c in rows_a.columns if c.startswith("y/")]
    a, _ = align_predictions(_samples(rows_a), _samples(rows_b), same_columns=y_cols)
    members_a = _member_scores(rows_a, a["sample_id"], task["type"])
    members_b = _member_scores(rows_b, a["sample_id"], task["type"])
    label_names = task["class_names"] if task["type"] == "multiclass" else task["targets"]
    fn = MemberMean((TaskMetric(task["type"], class_names=label_names, target_names=task["targets"]),))
    grouped = ma["bootstrap"]["unit"] == "group" and mb["bootstrap"]["unit"] == "group"
    result = paired_bootstrap(
        fn, _targets(a, task["type"]), members_a, members_b, metric=metric,
        groups=a["group"].to_numpy() if grouped else None, n_resamples=n_resamples, ci=ci, seed=seed,
    )
    ids = a["sample_id"].tolist()
    identical = (prediction_hash(np.mean(members_a, axis=0), sample_ids=ids)
                 == prediction_hash(np.mean(members_b, axis=0), sample_ids=ids))  # as the identical_predictions flag
    return {
        "metric": metric,
        "definition": SCORE_DEFINITION,
        "a": {"run": str(run_a), "head": head_a, "value": result.pop("a"), "members": len(members_a)},
        "b": {"run": str(run_b), "head": head_b, "value": result.pop("b"), "members": len(members_b)},
        "identical_outputs": identical,
        "n_test": len(a),
        "resampled": "groups" if grouped else "samples",
        "n_resamples": n_resamples,
        "ci_level": ci,
        "ci_method": METHOD,
        **result,
    }
