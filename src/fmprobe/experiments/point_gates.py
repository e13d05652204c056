"""`fmprobe gate-points`: the criteria of a gates file applied to one model's extraction points, not to runs.

Candidates are the extraction points of one encoder (vision block k, ``visual.merger``, language-model layer
j). Their numbers come from the diagnostics' output files, not from run directories:

- ``fmprobe spatial`` (``spatial.json``): metrics ``still/box_iou``, ``still/mask_iou``, ``still/map50``, or
  ``moving/...`` for a file made with ``--frames`` (clips of moving shapes), with CIs when run with
  ``--bootstrap``;
- ``fmprobe align`` (``alignment.json``, the points as A's layers against a reference model as B): one metric
  per computed alignment metric (``linear_cka``, ``rsa``, ``knn_recall``, ...), named ``<metric>@<layer>``
  when B has several layers; CIs where ``--bootstrap`` gave them (linear and RBF CKA).

All of them are held-out / whole-sample numbers, so criteria use ``split: test``. Levels, verdicts, score and
recommendation are exactly those of ``fmprobe gate`` (:func:`fmprobe.experiments.gates.judge`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmprobe.atomic import atomic_path, write_json
from fmprobe.diagnostics.spatial_run import data_kind
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.experiments.gates import GateReport, GatesSpec, judge, load_gates
from fmprobe.experiments.leaderboard import RUN_QUANTITIES

SPATIAL_METRICS = ("box_iou", "mask_iou", "map50")
COLUMNS = ["point", "metric", "mean", "ci_lo", "ci_hi"]


def read_output(path: str | Path, name: str) -> dict[str, Any]:
    """A diagnostics output file (``name``), given as the file or the folder holding it."""
    path = Path(path).expanduser()
    file = path / name if path.is_dir() else path
    try:
        return json.loads(file.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read '{file}': {err.strerror}; give the {name} a command wrote, or its folder"
                          ) from None
    except json.JSONDecodeError as err:
        raise FmprobeError(f"'{file}' is not valid JSON: {err}") from None


def _ci(row: dict[str, Any], metric: str) -> tuple[float, float]:
    ci = (row.get("ci") or {}).get(metric)
    return (float(ci[0]), float(ci[1])) if ci else (np.nan, np.nan)


def spatial_rows(spatial: dict[str, Any]) -> list[dict[str, Any]]:
    kind = data_kind(spatial)
    return [{"point": r["layer"], "metric": f"{kind}/{m}", "mean": float(r[m]),
             **dict(zip(("ci_lo", "ci_hi"), _ci(r, m)))} for r in spatial["results"] for m in SPATIAL_METRICS]


def alignment_rows(alignment: dict[str, Any]) -> list[dict[str, Any]]:
    """The points (A's layers) against the reference (B's layers), one row per (point, metric[@B layer])."""
    rows = []
    if "metrics" in alignment:  # one layer each side
        point = alignment["a"]["layers"][0]
        for metric, value in alignment["metrics"].items():
            ci = (alignment.get("intervals") or {}).get(metric) or (np.nan, np.nan)
            rows.append({"point": point, "metric": metric, "mean": float(value), "ci_lo": ci[0], "ci_hi": ci[1]})
        return rows
    for metric, m in alignment["matrices"].items():
        single = len(m["cols"]) == 1
        for i, point in enumerate(m["rows"]):
            for j, col in enumerate(m["cols"]):
                ci = (m.get("ci") or [[None] * len(m["cols"])] * len(m["rows"]))[i][j] or (np.nan, np.nan)
                rows.append({"point": point, "metric": metric if single else f"{metric}@{col}",
                             "mean": float(m["values"][i][j]), "ci_lo": ci[0], "ci_hi": ci[1]})  # fmt: skip
    return rows


def point_metrics(spatial: Sequence[dict[str, Any]], alignment: dict[str, Any] | None = None) -> pd.DataFrame:
    """Long table (point, metric, mean, ci_lo, ci_hi) of one encoder's points; spatial files' points first."""
    if not spatial:
        raise ConfigError("give at least one spatial.json (fmprobe spatial --encoder CONFIG ...)")
    encoders = sorted({s["encoder"] for s in spatial})
    if len(encoders) > 1:
        raise FmprobeError(f"the spatial files come from different encoders {encoders}; gate one model at a time")
    kinds = [data_kind(s) for s in spatial]
    if len(set(kinds)) != len(kinds):
        raise FmprobeError(f"two spatial files of the same data kind ({kinds}); give one still and/or one moving")
    rows = [row for s in spatial for row in spatial_rows(s)]
    if alignment is not None:
        rows += alignment_rows(alignment)
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype({"ci_lo": float, "ci_hi": float})


def gate_points(spec: GatesSpec, table: pd.DataFrame, encoder: str) -> GateReport:
    """A verdict per extraction point of ``encoder`` from its metric table, and the recommendation."""
    if spec.experiment is not None:
        raise ConfigError("'experiment:' selects runs; gate-points takes its candidates from the spatial file(s), "
                          "so remove it from the gates file")  # fmt: skip
    bad = [c.name for c in spec.criteria if c.metric in RUN_QUANTITIES or c.split != "test"]
    if bad:
        raise ConfigError(f"criteria {bad}: extraction points have only test metrics from the diagnostics' files "
                          f"(no validation split, no {', '.join(RUN_QUANTITIES)}); use split: test")  # fmt: skip
    points = list(dict.fromkeys(table["point"]))
    cands = pd.DataFrame({"run_dir": encoder, "experiment": encoder, "run_id": "", "head": points,
                          "flags": [[] for _ in points], "error_flags": 0,
                          **{q: np.nan for q in RUN_QUANTITIES}})  # fmt: skip
    values = table.rename(columns={"point": "head"}).assign(run_dir=encoder, split="test")
    return judge(spec, cands, values)


def points_command(
    gates: str | Path, spatial: Sequence[str | Path], align: str | Path | None = None, *,
    controls: Sequence[str | Path] = (), out: str | Path = "fmprobe-gate-points",
) -> GateReport:
    """Gate the points; write ``points.csv``, ``gates.json``, the figures and ``report.html`` to ``out``."""
    from fmprobe.report.points import write_points_report

    spatial_results = [read_output(p, "spatial.json") for p in spatial]
    alignment = read_output(align, "alignment.json") if align is not None else None
    control_results = [read_output(p, "spatial.json") for p in controls]
    table = point_metrics(spatial_results, alignment)
    report = gate_points(load_gates(gates), table, spatial_results[0]["encoder"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gates.json", report.to_dict())
    with atomic_path(out / "points.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_points_report(out / "report.html", report, table, spatial_results, alignment, control_results)
    return report
