"""The sweep (or leaderboard) report: one self-contained HTML file with the leaderboard, a forest plot of
every candidate's test CI and, when gates are given, the verdict of each candidate and the recommendation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any


from fmprobe import __version__
from fmprobe.atomic import write_json, write_text
from fmprobe.report.plots import forest_plot
from fmprobe.report.terminal import fmt
from fmprobe.report.templating import render

if TYPE_CHECKING:
    from fmprobe.experiments.gates import GateReport
    from fmprobe.experiments.leaderboard import Leaderboard
    from fmprobe.experiments.sweep import SweepPoint


def render_board_report(boards: Sequence[Leaderboard], gates: GateReport | None, *, title: str,
                        dest_dir: Path | None = None, failed: Sequence[dict[str, Any]] = ()) -> str:
    """One leaderboard per primary metric (a sweep over tasks mixes them); ``dest_dir``: where the file will live,
    so links to each run's report.html are relative."""
    sections = [_board_section(board, gates, dest_dir) for board in boards]
    return render("sweep.html", title=title, sections=sections, gates=gates, failed=failed, fmt=fmt,
                  version=__version__)


def _board_section(board: Leaderboard, gates: GateReport | None, dest_dir: Path | None) -> dict[str, Any]:
    from fmprobe.experiments.leaderboard import SEG_NOTE, head_label, params_cell, seg_cell

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
    return {"board": board, "rows": rows, "plot": plot, "seg_note": SEG_NOTE}


def write_sweep_report(dest: Path, runs_dir: Path, name: str, points: Sequence[SweepPoint],
                       gates_path: Path | None) -> Path:
    from fmprobe.experiments.gates import evaluate_gates, load_gates
    from fmprobe.experiments.leaderboard import boards_by_primary_metric

    run_dirs = [p.run_dir for p in points if p.run_dir is not None]
    boards = boards_by_primary_metric(runs_dir, run_dirs) if run_dirs else []
    gates = None
    if gates_path is not None and run_dirs:
        gates = evaluate_gates(load_gates(gates_path), runs_dir, run_dirs=run_dirs)
        write_json(dest.parent / "gates.json", gates.to_dict())
    failed = [{"values": ", ".join(f"{k}={v}" for k, v in p.values.items()), "error": p.error}
              for p in points if p.status == "failed"]
    write_text(dest, render_board_report(boards, gates, title=f"sweep {name}", dest_dir=dest.parent, failed=failed))
    return dest


def write_board_report(dest: Path, board: Leaderboard, gates: GateReport | None = None, *, title: str) -> Path:
    """The leaderboard (and gate verdicts) of a runs folder as one HTML file (``fmprobe leaderboard --html``)."""
    dest = Path(dest)
    write_text(dest, render_board_report([board], gates, title=title, dest_dir=dest.parent.resolve()))
    return dest
