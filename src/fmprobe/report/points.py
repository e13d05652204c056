"""The extraction-point report of `fmprobe gate-points`: one self-contained HTML file with the gate verdict per
(model,) point and the recommendation, for several models the decision matrix (criteria x models at each model's
best point), paired comparisons of points, the spatial scores against depth per model (with CI bands and the pixel
/ random controls as flat lines), and the alignment with the reference (CKA curve with CI band, a heatmap per
metric)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmprobe import __version__
from fmprobe.atomic import write_text
from fmprobe.diagnostics import plots
from fmprobe.diagnostics.outputs import data_kind, model_of
from fmprobe.report.templating import render
from fmprobe.report.terminal import fmt

NAMES = {"box_iou": "box IoU", "mask_iou": "mask IoU", "map50": "AP@0.5"}


def _series(table: pd.DataFrame, points: list[str], metric: str) -> tuple[list[float], list[float], list[float]]:
    rows = table[table["metric"] == metric].set_index("point").reindex(points)
    mean = rows["mean"].to_numpy(dtype=float)
    lo, hi = rows["ci_lo"].to_numpy(dtype=float), rows["ci_hi"].to_numpy(dtype=float)
    return mean.tolist(), np.where(np.isnan(lo), mean, lo).tolist(), np.where(np.isnan(hi), mean, hi).tolist()


def _figures(dest_dir: Path, table: pd.DataFrame, spatial: Sequence[dict[str, Any]],
             alignments: Sequence[dict[str, Any]], heatmaps: Sequence[dict[str, Any]] = ()
             ) -> list[tuple[str, str]]:  # fmt: skip
    models = list(dict.fromkeys(table["model"]))
    figures = []
    for s in spatial:
        kind, model = data_kind(s), model_of(s)
        rows = table[table["model"] == model]
        points = list(dict.fromkeys(rows["point"]))
        series = {NAMES[m]: _series(rows, points, f"{kind}/{m}") for m in NAMES}
        for name in dict.fromkeys(c["control"] for c in s.get("controls", ())):
            rows_c = {c["layer"]: c for c in s["controls"] if c["control"] == name}
            picked = [rows_c.get(p) or next(iter(rows_c.values())) for p in points]  # one row: a flat line
            cis = [(r.get("ci") or {}).get("mask_iou") or (r["mask_iou"], r["mask_iou"]) for r in picked]
            series[f"{name} mask IoU"] = ([r["mask_iou"] for r in picked], [c[0] for c in cis], [c[1] for c in cis])
        tag = f"{models.index(model)}_{kind}" if len(models) > 1 else kind
        path = plots.depth_curves(points, series, metric="score", dest=dest_dir / f"spatial_{tag}.png",
                                  title=f"{model}: spatial probes on {kind} shapes "
                                        f"({s['n_test']} test {'clips' if kind == 'moving' else 'images'})")  # fmt: skip
        figures.append((f"Spatial probes, {kind} shapes" + (f": {model}" if len(models) > 1 else ""),
                        plots.png_base64(path)))  # fmt: skip
    for alignment, tag in [(a, "") for a in alignments] + [(h, "channels_") for h in heatmaps]:
        if "matrices" not in alignment:
            continue
        model = alignment["a"].get("model") or models[0]
        rows = table[table["model"] == model]
        points = list(dict.fromkeys(rows["point"]))
        reference = alignment["b"]["source"]
        prefix = tag + (f"{models.index(model)}_" if len(models) > 1 else "")
        for metric, m in alignment["matrices"].items():
            if len(m["cols"]) == 1:
                series = {metric: _series(rows, points, metric)}
                path = plots.depth_curves(points, series, metric=metric, dest=dest_dir / f"alignment_{prefix}{metric}.png",
                                          title=f"{model}: {metric} against {reference}")  # fmt: skip
            else:
                path = plots.heatmap(np.asarray(m["values"]), m["rows"], m["cols"], title=f"{model}: {metric}",
                                     xlabel=f"reference: {reference}", ylabel="extraction point",
                                     dest=dest_dir / f"alignment_{prefix}{metric}.png")  # fmt: skip
            figures.append((f"Alignment with the reference: {metric}" + (f" ({model})" if len(models) > 1 else ""),
                            plots.png_base64(path)))  # fmt: skip
    return figures


def _galleries(reconstructions: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, base64 PNG) of every reconstructed point's gallery, controls included."""
    out = []
    for r in reconstructions:
        for row in [*r["results"], *r.get("controls", ())]:
            what = f"{row['control']} control at {row['layer']}" if "control" in row else row["layer"]
            path = Path(r["folder"]) / row["gallery"]
            out.append((f"{r['model']}: {what} — LPIPS {fmt(row['lpips'])}, SSIM {fmt(row['ssim'])}, spatial IoU "
                        f"{fmt(row['spatial_iou'])}", base64.b64encode(path.read_bytes()).decode()))  # fmt: skip
    return out


def write_points_report(dest: Path, gates: Any, table: pd.DataFrame, spatial: Sequence[dict[str, Any]],
                        alignments: Sequence[dict[str, Any]] | None, *, pairs: Sequence[dict[str, Any]] = (),
                        summary: Sequence[dict[str, Any]] = (), outcome: dict[str, Any] | None = None,
                        reconstructions: Sequence[dict[str, Any]] = (),
                        heatmaps: Sequence[dict[str, Any]] = ()) -> Path:  # fmt: skip
    """Write the report (figures next to it as PNG too) and return its path. ``summary``: each model's best point
    (point_gates.model_summary), shown as the decision matrix when there are several models; ``outcome``: the rule
    of the study's outcome table that fired (experiments.decision); ``reconstructions``: reconstruct.json contents
    with their ``folder``, whose galleries are shown; ``heatmaps``: alignment.json contents shown as figures only (the
    points against each channel of the reference)."""
    dest = Path(dest)
    alignments = list(alignments or ())
    models = list(dict.fromkeys(table["model"]))
    metrics = list(dict.fromkeys(table["metric"]))
    cells = {(r.model, r.point, r.metric): r for r in table.itertuples(index=False)}
    control_rows = [{"model": model_of(s), "encoder": c["control"], "point": c["layer"], "kind": data_kind(s),
                     **{m: c[m] for m in NAMES}, "ci": c.get("ci") or {}} for s in spatial for c in s.get("controls", ())]
    several = len(models) > 1
    title = f"extraction points of {models[0]}" if not several else f"extraction points of {len(models)} models"
    html = render(
        "points.html",
        title=title, gates=gates, metrics=metrics, cells=cells, models=models, several=several,
        points=list(dict.fromkeys(zip(table["model"], table["point"]))), spatial=spatial, alignments=alignments,
        controls=control_rows, pairs=pairs, summary=summary if several else (), names=NAMES, outcome=outcome,
        galleries=_galleries(reconstructions), figures=_figures(dest.parent, table, spatial, alignments, heatmaps),
        fmt=fmt, version=__version__,
    )
    write_text(dest, html)
    return dest
