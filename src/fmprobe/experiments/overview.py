"""`fmprobe report RUNS_DIR`: every run directory of a runs folder on one page — finished, failed or unfinished —
with its headline number, flags and a link to its report.

A run's status is what ``experiments.status`` reads: its ``status.json`` (finished, or failed with the stage and
the error), else finished when metrics.json exists, else unfinished (still running, or killed). Only files are
read: the page is rebuilt from the run directories every time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmprobe.errors import FmprobeError
from fmprobe.experiments.status import RunStatus, read_status, short_error
from fmprobe.report.runs import write_runs_page

RUN_FILES = ("config.resolved.yaml", "metrics.json", "status.json")  # any of them marks a run directory


def run_entries(runs_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per run directory (``<runs_dir>/<experiment>/<run_id>/``), newest first."""
    root = Path(runs_dir).expanduser().resolve()
    if not root.is_dir():
        raise FmprobeError(f"runs folder '{root}' does not exist; give the runs_dir of your configs")
    dirs = {p.parent for name in RUN_FILES for p in root.glob(f"*/*/{name}")
            if not p.parent.parent.name.startswith("_")}  # fmt: skip
    entries = [_entry(d) for d in dirs]
    return sorted(entries, key=lambda e: (e["run_id"], e["experiment"]), reverse=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _entry(run_dir: Path) -> dict[str, Any]:
    try:
        state = read_status(run_dir)
    except FmprobeError as err:  # an edited status.json: listed, with what is wrong with it
        state = RunStatus("unfinished", error=str(err))
    metrics = _read_json(run_dir / "metrics.json") if state.status == "finished" else None
    error = None if state.error is None else short_error(state.error) + (f" (in {state.stage})" if state.stage else "")
    entry: dict[str, Any] = {
        "run_dir": str(run_dir), "experiment": run_dir.parent.name, "run_id": run_dir.name, "status": state.status,
        "error": error,
        "report": str(run_dir / "report.html") if (run_dir / "report.html").exists() else None,
        "headline": None,
    }
    if metrics is not None:
        entry["headline"] = headline(metrics)
    return entry


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The selected head's test primary metric with its CI and the baseline, and every flag raised in the run."""
    primary = metrics["task"]["primary_metric"]
    best = metrics["selection"]["best_head"]
    h = metrics["heads"][best]
    ci = h.get("test_ci", {}).get(primary) or [None, None]
    return {
        "task": metrics["task"]["type"], "metric": primary, "head": best,
        "test": h["splits"]["test"]["mean"].get(primary), "ci": ci,
        "baseline": metrics.get("baseline", {}).get("test", {}).get(primary),
        "flags": sorted({f["name"] for f in metrics.get("flags", [])}),
        "seeds": len(metrics.get("seeds", [])), "wall_seconds": metrics.get("wall_seconds"),
        "ci_level": metrics.get("ci_level"),
    }


def runs_index_command(runs_dir: str | Path, out: str | Path | None = None) -> tuple[Path, dict[str, int]]:
    """Write the runs page (default ``<runs_dir>/index.html``); returns its path and the count per status."""
    entries = run_entries(runs_dir)
    dest = Path(out) if out is not None else Path(runs_dir).expanduser().resolve() / "index.html"
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    return write_runs_page(dest, entries, title=f"Runs in {Path(runs_dir).expanduser().resolve()}"), counts
