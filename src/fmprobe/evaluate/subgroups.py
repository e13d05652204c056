"""Where a classifier goes wrong: results per true-label group, and which class it picks instead.

``subgroup_report`` takes the seed-mean test scores and the decision thresholds used everywhere else
(validation-tuned, averaged over seeds) and returns, in a shape the report renders as one table:

- ``groups``: name -> flat dict of numbers, every group with the same keys;
  binary: the negatives and the positives (accuracy there = specificity / sensitivity);
  multiclass: one group per true class, with its recall and ``pred/<class>``, the row of the confusion
  matrix normalised per true class (which class the model predicts when this one is true);
  multilabel: ``all``, ``exactly one label``, then every label combination present (``none``, ``a``,
  ``a+b``, ...), with ``exact_match`` (the whole combination right) and per label the true and predicted
  positive rates; ``single_label_detection``: per label, the samples where it alone is met, how many of them the
  model detects it in (at the threshold) with a Wilson 95% CI over samples, and what it calls there instead
  (a label never detected when it alone is met is blind to it, whatever its AP).
- multiclass also: ``confusion_normalised`` (rows: true class) and ``top_confusions`` (largest off-diagonal
  rates first).
Regression has no label groups; callers skip it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.metrics import check_inputs

TOP_CONFUSIONS = 10


def subgroup_report(
    task_type: str,
    y_true: np.ndarray,
    scores: np.ndarray,
    *,
    class_names: Sequence[str],
    thresholds: float | Sequence[float] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-group results of one set of scores (see the module docstring). ``class_names``: the classes
    (multiclass), the labels (multilabel) or the single target (binary)."""
    if task_type == "regression":
        raise FmprobeError("subgroups are defined by labels; a regression task has none")
    y, s = check_inputs(task_type, y_true, scores)
    names = list(class_names)
    if task_type == "multiclass":
        return _multiclass(y, s, names)
    cut = np.broadcast_to(np.asarray(0.5 if thresholds is None else thresholds, dtype=np.float64).ravel(),
                          (1 if task_type == "binary" else s.shape[1],))
    if task_type == "binary":
        return _binary(y, s >= cut[0])
    if len(names) != s.shape[1]:
        raise FmprobeError(f"{s.shape[1]} label columns but {len(names)} label names")
    return _multilabel(y.astype(bool), s >= cut[None, :], names)


def _binary(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    groups = {}
    for name, value in (("negative (0)", 0), ("positive (1)", 1)):
        rows = y == value
        n = int(rows.sum())
        groups[name] = {
            "n": n,
            "accuracy": float(np.mean(pred[rows] == value)) if n else float("nan"),
            "predicted_positive": float(np.mean(pred[rows])) if n else float("nan"),
        }
    return {"kind": "true class", "groups": groups}


def _multiclass(y: np.ndarray, scores: np.ndarray, names: list[str]) -> dict[str, Any]:
    k = scores.shape[1]
    if len(names) != k:
        raise FmprobeError(f"{k} score columns but {len(names)} class names")
    counts = confusion_matrix(y, scores.argmax(axis=1), labels=np.arange(k))
    support = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = counts / support[:, None]
    groups = {}
    for i, name in enumerate(names):
        groups[f"true {name}"] = {"n": int(support[i]), "recall": float(rates[i, i]),
                                  **{f"pred/{other}": float(rates[i, j]) for j, other in enumerate(names)}}
    off = [(rates[i, j], counts[i, j], i, j) for i in range(k) for j in range(k) if i != j and counts[i, j] > 0]
    off.sort(key=lambda c: (-c[0], -c[1]))
    top = [{"true": names[i], "predicted": names[j], "rate": float(r), "count": int(c)}
           for r, c, i, j in off[:TOP_CONFUSIONS]]
    return {"kind": "true class", "groups": groups, "class_order": names,
            "confusion_normalised": rates.tolist(), "top_confusions": top}


def _multilabel(y: np.ndarray, pred: np.ndarray, names: list[str]) -> dict[str, Any]:
    def stats(rows: np.ndarray) -> dict[str, float | int]:
        n = int(rows.sum())
        out: dict[str, float | int] = {"n": n}
        out["exact_match"] = float(np.mean((pred[rows] == y[rows]).all(axis=1))) if n else float("nan")
        for j, name in enumerate(names):
            out[f"true/{name}"] = float(np.mean(y[rows, j])) if n else float("nan")
            out[f"pred/{name}"] = float(np.mean(pred[rows, j])) if n else float("nan")
        return out

    positives = y.sum(axis=1)
    groups = {"all": stats(np.ones(len(y), dtype=bool)), "exactly one label": stats(positives == 1)}
    combos = {tuple(row) for row in y.tolist()}
    for combo in sorted(combos, key=lambda c: (sum(c), [-v for v in c])):
        label = "+".join(n for n, v in zip(names, combo) if v) or "none"
        groups[label] = stats((y == np.array(combo)).all(axis=1))
    return {"kind": "label combination", "groups": groups, "label_order": names,
            "single_label_detection": _single_label_detection(y, pred, names)}


def _single_label_detection(y: np.ndarray, pred: np.ndarray, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per label, on the samples where only it is met: detections / n with a Wilson 95% CI (samples treated as
    independent: several from one video make it narrower than it should be), and the rate of every other label
    called there."""
    out = {}
    for j, name in enumerate(names):
        only = np.zeros(len(names), dtype=bool)
        only[j] = True
        rows = (y == only).all(axis=1)
        n, detected = int(rows.sum()), int(pred[rows, j].sum())
        ci = binomtest(detected, n).proportion_ci(method="wilson") if n else None
        out[f"only {name}"] = {
            "n": n, "detected": detected, "rate": detected / n if n else float("nan"),
            "ci": [float(ci.low), float(ci.high)] if ci is not None else None,
            "called_instead": {f"pred/{o}": float(np.mean(pred[rows, k])) if n else float("nan")
                               for k, o in enumerate(names) if k != j},
        }
    return out
