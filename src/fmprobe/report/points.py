"""The extraction-point report of `fmprobe gate-points`: one self-contained HTML file with the gate verdict per
point and the recommendation, the spatial scores against depth (with CI bands and the pixel / random controls as
flat lines), and the alignment with the reference (CKA curve with CI band, a heatmap per metric)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmprobe import __version__
from fmprobe.atomic import write_text
from fmprobe.diagnostics import plots
from fmprobe.diagnostics.spatial_run import data_kind
from fmprobe.report.terminal import fmt
from fmprobe.report.templating import render

NAMES = {"box_iou": "box IoU", "mask_iou": "mask IoU", "map50": "AP@0.5"}


def _series(table: pd.DataFrame, points: list[str], metric: str) -> tuple[list[float], list[float], list[float]]:
    rows = table[table["metric"] == metric].set_index("point").reindex(points)
    mean = rows["mean"].to_numpy(dtype=float)
    lo, hi = rows["ci_lo"].to_numpy(dtype=float), rows["ci_hi"].to_numpy(dtype=float)
    return mean.tolist(), np.where(np.isnan(lo), mean, lo).tolist(), np.where(np.isnan(hi), mean, hi).tolist()


def _figures(dest_dir: Path, table: pd.DataFrame, spatial: Sequence[dict[str, Any]], alignment: dict[str, Any] | None,
             controls: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:  # fmt: skip
    points = list(dict.fromkeys(table["point"]))
    figures = []
    for s in spatial:
        kind = data_kind(s)
        series = {NAMES[m]: _series(table, points, f"{kind}/{m}") for m in NAMES}
        for c in (c for c in controls if data_kind(c) == kind):
            r = c["results"][0]
            lo, hi = (r.get("ci") or {}).get("mask_iou") or (r["mask_iou"], r["mask_iou"])
            n = len(points)
            series[f"{c['encoder']} mask IoU"] = ([r["mask_iou"]] * n, [lo] * n, [hi] * n)
        path = plots.depth_curves(points, series, metric="score", dest=dest_dir / f"spatial_{kind}.png",
                                  title=f"{s['encoder']}: spatial probes on {kind} shapes "
                                        f"({s['n_test']} test {'clips' if kind == 'moving' else 'images'})")  # fmt: skip
        figures.append((f"Spatial probes, {kind} shapes", plots.png_base64(path)))
    if alignment is not None and "matrices" in alignment:
        reference = alignment["b"]["source"]
        for metric, m in alignment["matrices"].items():
            if len(m["cols"]) == 1:
                series = {metric: _series(table, points, metric)}
                path = plots.depth_curves(points, series, metric=metric, dest=dest_dir / f"alignment_{metric}.png",
                                          title=f"{metric} against {reference}")  # fmt: skip
            else:
                path = plots.heatmap(np.asarray(m["values"]), m["rows"], m["cols"], title=metric,
                                     xlabel=f"reference: {reference}", ylabel="extraction point",
                                     dest=dest_dir / f"alignment_{metric}.png")  # fmt: skip
            figures.append((f"Alignment with the reference: {metric}", plots.png_base64(path)))
    return figures


def write_points_report(dest: Path, gates: Any, table: pd.DataFrame, spatial: Sequence[dict[str, Any]],
                        alignment: dict[str, Any] | None, controls: Sequence[dict[str, Any]] = ()) -> Path:  # fmt: skip
    """Write the report (figures next to it as PNG too) and return its path."""
    dest = Path(dest)
    metrics = list(dict.fromkeys(table["metric"]))
    cells = {(r.point, r.metric): r for r in table.itertuples(index=False)}
    control_rows = [{"encoder": c["encoder"], "kind": data_kind(c), **{m: c["results"][0][m] for m in NAMES},
                     "ci": c["results"][0].get("ci") or {}} for c in controls]  # fmt: skip
    html = render(
        "points.html",
        title=f"extraction points of {spatial[0]['encoder']}", gates=gates, metrics=metrics, cells=cells,
        points=list(dict.fromkeys(table["point"])), spatial=spatial, alignment=alignment, controls=control_rows,
        names=NAMES, figures=_figures(dest.parent, table, spatial, alignment, controls), fmt=fmt,
        version=__version__,
    )
    write_text(dest, html)
    return dest
