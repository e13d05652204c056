"""`fmprobe gate-points`: the criteria of a gates file applied to extraction points — of one model, or of several
models side by side — not to runs.

Candidates are (model, extraction point) pairs: vision block k, the projector / merger, language-model layer j of
each encoder. Their numbers come from the diagnostics' output files, not from run directories:

- ``fmprobe spatial`` (``spatial.json``; the model is its ``model`` label: the experiment's name when run on a
  config, so two configs of one checkpoint stay apart): metrics ``still/box_iou``,
  ``still/mask_iou``, ``still/map50``, or ``moving/...`` for a file made with ``--frames`` (clips of moving
  shapes), with CIs when run with ``--bootstrap``;
- ``fmprobe align`` (``alignment.json``, the points as A's layers against a reference model as B, matched to a
  model by A's label): one metric per computed alignment metric (``linear_cka``, ``rsa``, ``knn_recall``,
  ...), named ``<metric>@<layer>`` when B has several layers; CIs where ``--bootstrap`` gave them;
- ``fmprobe reconstruct`` (``reconstruct.json``): ``recon/lpips``, ``recon/ssim``, ``recon/edge_f1``,
  ``recon/spatial_iou``, ``recon/map50`` with CIs and paired differences to the controls; ``fmprobe speed``
  (``speed.json``): ``speed_ratio`` to the baseline with its CI;
- metric tables (CSV with the columns ``model, point, metric, mean, ci_lo, ci_hi``; point ``*`` for a score of the
  whole model, such as a user-given integration complexity): any other per-point measurement. A criterion reads a metric by its name, so a new
  measurement is a new table and a new criterion — a new row of the decision matrix — and a new model is new
  files — a new column.

All of them are held-out / whole-sample numbers, so criteria use ``split: test``. Levels, verdicts, score and
recommendation are exactly those of ``fmprobe gate`` (:func:`fmprobe.experiments.gates.judge`); with several models
the verdicts over every (model, point) are the decision matrix, and each model's best point sums it up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmprobe.atomic import atomic_path, write_json
from fmprobe.diagnostics.outputs import data_kind, model_of, read_output
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.experiments.decision import decide
from fmprobe.experiments.gates import GateReport, GatesSpec, judge, load_gates
from fmprobe.experiments.leaderboard import RUN_QUANTITIES

SPATIAL_METRICS = ("box_iou", "mask_iou", "map50")
RECON_METRICS = ("lpips", "ssim", "edge_f1", "spatial_iou", "map50")
COLUMNS = ["point", "metric", "mean", "ci_lo", "ci_hi", "model"]
TABLE_COLUMNS = ["model", "point", "metric", "mean", "ci_lo", "ci_hi"]
ALL_POINTS = "*"  # a metric table's point for a score of the whole model


def _ci(row: dict[str, Any], metric: str) -> tuple[float, float]:
    ci = (row.get("ci") or {}).get(metric)
    return (float(ci[0]), float(ci[1])) if ci else (np.nan, np.nan)


def spatial_rows(spatial: dict[str, Any]) -> list[dict[str, Any]]:
    """Per point: its scores (``still/box_iou``, ...), any direction accuracy, and its paired differences to the
    controls probed with it (``still/box_iou-vs-pixel``, ...)."""
    return result_rows(spatial["results"], data_kind(spatial), [*SPATIAL_METRICS, "direction_accuracy"])


def result_rows(results: list[dict[str, Any]], prefix: str, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a diagnostics file's per-point results: ``<prefix>/<metric>`` with its CI, and every paired difference
    to a control (``vs``) as ``<prefix>/<metric>-vs-<control>``."""
    rows = []
    for r in results:
        for m in (m for m in metrics if m in r):
            rows.append({"point": r["layer"], "metric": f"{prefix}/{m}", "mean": float(r[m]),
                         **dict(zip(("ci_lo", "ci_hi"), _ci(r, m)))})  # fmt: skip
        for control, diffs in (r.get("vs") or {}).items():
            rows += [{"point": r["layer"], "metric": f"{prefix}/{m}-vs-{control}", "mean": d["diff"], "ci_lo": d["lo"],
                      "ci_hi": d["hi"]} for m, d in diffs.items() if m in metrics]  # fmt: skip
    return rows


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
    """Long table (point, metric, mean, ci_lo, ci_hi, model) of one encoder's points; spatial files' points first."""
    if not spatial:
        raise ConfigError("give at least one spatial.json (fmprobe spatial --encoder CONFIG ...)")
    encoders = sorted({model_of(s) for s in spatial})
    if len(encoders) > 1:
        raise FmprobeError(f"the spatial files come from different models {encoders}; use model_metrics")
    kinds = [data_kind(s) for s in spatial]
    if len(set(kinds)) != len(kinds):
        raise FmprobeError(f"two spatial files of the same data kind ({kinds}) for {encoders[0]}; give one still and/or "
                           "one moving per model")  # fmt: skip
    rows = [row for s in spatial for row in spatial_rows(s)]
    if alignment is not None:
        rows += alignment_rows(alignment)
    table = pd.DataFrame(rows, columns=COLUMNS[:-1]).assign(model=encoders[0])
    return table.astype({"ci_lo": float, "ci_hi": float})


def reconstruction_table(reconstruct: dict[str, Any]) -> pd.DataFrame:
    """A reconstruct.json's points as a metric table: ``recon/<metric>`` with CIs and paired control differences."""
    rows = result_rows(reconstruct["results"], "recon", RECON_METRICS)
    return pd.DataFrame(rows, columns=COLUMNS[:-1]).assign(model=reconstruct["model"])[COLUMNS]


def speed_table(speed: dict[str, Any]) -> pd.DataFrame:
    """A speed.json as a metric table: ``speed_ratio`` (seconds relative to the baseline's point) with its CI."""
    rows = [{"model": r["model"], "point": r["point"], "metric": "speed_ratio", "mean": r["ratio"], "ci_lo": r["ci"][0],
             "ci_hi": r["ci"][1]} for r in speed["results"]]  # fmt: skip
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)[COLUMNS]


def model_metrics(spatial: Sequence[dict[str, Any]], alignments: Sequence[dict[str, Any]] = (),
                  tables: Sequence[pd.DataFrame] = ()) -> pd.DataFrame:  # fmt: skip
    """Long table of every model's points: spatial files grouped by encoder, each alignment with the model its A side
    names (a lone alignment goes with a lone model), then the rows of any metric tables (reconstructions, speed,
    user-given scores, ...)."""
    models: dict[str, list[dict[str, Any]]] = {}
    for s in spatial:
        models.setdefault(model_of(s), []).append(s)
    matched: dict[str, dict[str, Any]] = {}
    for a in alignments:
        model = a["a"].get("model") or (next(iter(models)) if len(models) == 1 == len(alignments) else None)
        if model not in models:
            raise FmprobeError(f"alignment of '{a['a']['source']}' names model {model!r}, which no spatial.json "
                               f"measured ({', '.join(models)}); align the same config the spatial run used")  # fmt: skip
        if model in matched:
            raise FmprobeError(f"two alignments for model '{model}'; give one per model")
        matched[model] = a
    parts = [point_metrics(files, matched.get(model)) for model, files in models.items()]
    points = {model: list(dict.fromkeys(part["point"])) for model, part in zip(models, parts)}
    for table in tables:
        unknown = sorted(set(table["model"]) - set(models))
        if unknown:
            raise FmprobeError(f"a metric table has rows for models {unknown} that no spatial.json measured "
                               f"({', '.join(models)})")  # fmt: skip
        parts.append(_every_point(table[COLUMNS], points))
    return pd.concat(parts, ignore_index=True).astype({"ci_lo": float, "ci_hi": float})


def _every_point(table: pd.DataFrame, points: dict[str, list[str]]) -> pd.DataFrame:
    """A row whose point is ``*`` (a score of the whole model, e.g. its integration complexity) stands for each of
    the model's points."""
    whole = table["point"] == ALL_POINTS
    spread = [row._replace(point=p) for row in table[whole].itertuples(index=False) for p in points[row.model]]
    return pd.concat([table[~whole], pd.DataFrame(spread, columns=table.columns)], ignore_index=True)


def read_table(path: str | Path) -> pd.DataFrame:
    """A metric table (CSV: model, point, metric, mean, ci_lo, ci_hi; empty CIs where there are none; point ``*``:
    every point of the model)."""
    try:
        table = pd.read_csv(Path(path).expanduser(), dtype={"model": str, "point": str, "metric": str})
    except OSError as err:
        raise ConfigError(f"cannot read metric table '{path}': {err.strerror}") from None
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(f"metric table '{path}' lacks the columns {missing}; it needs {', '.join(TABLE_COLUMNS)}")
    return table


def gate_points(spec: GatesSpec, table: pd.DataFrame, encoder: str) -> GateReport:
    """A verdict per extraction point of ``encoder`` from its metric table, and the recommendation."""
    return gate_models(spec, table.assign(model=encoder))


def gate_models(spec: GatesSpec, table: pd.DataFrame) -> GateReport:
    """A verdict per (model, point) of the table, ranked across models, and the recommendation."""
    if spec.experiment is not None:
        raise ConfigError("'experiment:' selects runs; gate-points takes its candidates from the spatial file(s), "
                          "so remove it from the gates file")  # fmt: skip
    bad = [c.name for c in spec.criteria if c.metric in RUN_QUANTITIES or c.split != "test"]
    if bad:
        raise ConfigError(f"criteria {bad}: extraction points have only test metrics from the diagnostics' files "
                          f"(no validation split, no {', '.join(RUN_QUANTITIES)}); use split: test")  # fmt: skip
    pairs = list(dict.fromkeys(zip(table["model"], table["point"])))
    cands = pd.DataFrame({"run_dir": [m for m, _ in pairs], "experiment": [m for m, _ in pairs], "run_id": "",
                          "head": [p for _, p in pairs], "flags": [[] for _ in pairs], "error_flags": 0,
                          **{q: np.nan for q in RUN_QUANTITIES}})  # fmt: skip
    values = table.rename(columns={"point": "head", "model": "run_dir"}).assign(split="test")
    return judge(spec, cands, values)


def model_summary(report: GateReport) -> list[dict[str, Any]]:
    """Each model's best point (the first of its verdicts in the report's ranking) with its verdict, score and levels:
    the decision matrix summed up per model, best model first."""
    best: dict[str, Any] = {}
    for v in report.verdicts:
        best.setdefault(v.run_dir, v)
    return [{"model": m, "point": v.head, "verdict": v.verdict, "score": v.score, "weighted": v.weighted,
             "levels": {k: vars(lv) for k, lv in v.levels.items()}} for m, v in best.items()]  # fmt: skip


def points_command(
    gates: str | Path, spatial: Sequence[str | Path], align: Sequence[str | Path] = (), *,
    pairs: Sequence[str | Path] = (), tables: Sequence[str | Path] = (), reconstructions: Sequence[str | Path] = (),
    speeds: Sequence[str | Path] = (), heatmaps: Sequence[str | Path] = (), out: str | Path = "fmprobe-gate-points",
) -> GateReport:
    """Gate the points; write ``points.csv``, ``gates.json``, the figures and ``report.html`` to ``out``.

    ``pairs``: pair.json files of `fmprobe compare-points` (paired differences between two points), shown as such;
    ``reconstructions``: reconstruct.json files (``recon/...`` metrics, galleries in the report); ``speeds``:
    speed.json files (``speed_ratio``); ``heatmaps``: alignment.json files shown as figures only (a model's points
    against every channel of a VAE's latents)."""
    from fmprobe.report.points import write_points_report

    spatial_results = [read_output(p, "spatial.json") for p in spatial]
    alignments = [read_output(p, "alignment.json") for p in align]
    pair_results = [read_output(p, "pair.json") for p in pairs]
    recon_results = [{**read_output(p, "reconstruct.json"), "folder": str(_folder(p))} for p in reconstructions]
    metric_tables = [*(reconstruction_table(r) for r in recon_results),
                     *(speed_table(read_output(p, "speed.json")) for p in speeds), *(read_table(t) for t in tables)]
    table = model_metrics(spatial_results, alignments, metric_tables)
    report = gate_models(load_gates(gates), table)
    summary = model_summary(report)
    outcome = decide(report.spec, summary)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gates.json", {**report.to_dict(), "models": summary, "outcome": outcome})
    with atomic_path(out / "points.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_points_report(out / "report.html", report, table, spatial_results, alignments, pairs=pair_results,
                        summary=summary, outcome=outcome, reconstructions=recon_results,
                        heatmaps=[read_output(p, "alignment.json") for p in heatmaps])  # fmt: skip
    return report


def _folder(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_dir() else path.parent
