"""The sweep (or leaderboard) report: one self-contained HTML file with the leaderboard, a forest plot of
every candidate's test CI, the label-efficiency curves of the runs that have them (one per run and head) and, when
gates are given, the verdict of each candidate and the recommendation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fmprobe import __version__
from fmprobe.atomic import write_text
from fmprobe.report.efficiency import sweep_section
from fmprobe.report.plots import forest_plot
from fmprobe.report.terminal import SEG_NOTE, fmt, head_label, params_cell, seg_cell
from fmprobe.report.templating import render

# ``boards`` are experiments.leaderboard.Leaderboard and ``gates`` an experiments.gates.GateReport: this module
# only renders what the orchestration computed, so it reads their fields without importing them.


def render_board_report(boards: Sequence[Any], gates: Any | None, *, title: str,
                        dest_dir: Path | None = None, failed: Sequence[dict[str, Any]] = (),
                        efficiency: Sequence[tuple[str, dict[str, Any]]] = ()) -> str:  # fmt: skip
    """One leaderboard per primary metric (a sweep over tasks mixes them); ``dest_dir``: where the file will live,
    so links to each run's report.html are relative; ``efficiency``: (label, metrics) of runs whose label-efficiency
    curves are drawn together."""
    sections = [_board_section(board, gates, dest_dir) for board in boards]
    return render("sweep.html", title=title, sections=sections, gates=gates, failed=failed, fmt=fmt,
                  version=__version__, efficiency=sweep_section(efficiency))


def _board_section(board: Any, gates: Any | None, dest_dir: Path | None) -> dict[str, Any]:
    table = board.table
    rows = []
    for r in table.to_dict("records"):
        report = Path(r["run_dir"]) / "report.html"
        link = None
        if report.exists():
            link = os.path.relpath(report, dest_dir) if dest_dir else report.as_uri()
        rows.append({**r, "link": link, "params": {p: r[p] for p in board.params}, "label": head_label(r),
                     "counts": params_cell(r["trainable_params"], r["total_params"]),
                     "seg": seg_cell(r) if board.shows_segmentation else None})  # fmt: skip
    levels = None
    if gates is not None:
        crit = next((c for c in gates.spec.criteria if c.metric == board.metric and c.split == "test"), None)
        if crit is not None:
            levels = {k: v for k, v in (("target", crit.target), ("acceptable", crit.acceptable),
                                        ("fail", crit.fail)) if v is not None}
    plot = forest_plot([f"{r['rank']}. {r['run_id']}/{r['head']}" for r in rows],
                       table["test_mean"].tolist(), table["ci_lo"].tolist(), table["ci_hi"].tolist(),
                       table["baseline"].tolist(), board.metric, levels)
    runs = []  # per-run quantities, once per run (not on every head row)
    for r in rows:
        if all(r["run_dir"] != known["run_dir"] for known in runs):
            runs.append({k: r[k] for k in ("run_dir", "experiment", "run_id", "link", "n_seeds", "wall_seconds")}
                        | {"heads": sum(x["run_dir"] == r["run_dir"] for x in rows)})
    experiments = sorted({r["experiment"] for r in rows})
    summary = (f"{len(rows)} heads of {len(runs)} run{'s' if len(runs) != 1 else ''} "
               f"({', '.join(experiments)}), ranked by validation {board.metric}")
    return {"board": board, "rows": rows, "runs": runs, "plot": plot, "seg_note": SEG_NOTE, "summary": summary}


def write_board_report(dest: Path, boards: Sequence[Any], gates: Any | None = None, *, title: str,
                       failed: Sequence[dict[str, Any]] = (), efficiency: Sequence[tuple[str, dict[str, Any]]] = ()
                       ) -> Path:  # fmt: skip
    """Leaderboards (and gate verdicts) as one HTML file: a sweep's report, or ``fmprobe leaderboard --html``."""
    dest = Path(dest)
    write_text(dest, render_board_report(boards, gates, title=title, dest_dir=dest.parent.resolve(), failed=failed,
                                         efficiency=efficiency))  # fmt: skip
    return dest
