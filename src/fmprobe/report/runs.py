"""The runs page of ``fmprobe report RUNS_DIR``: a table of every run the orchestration listed
(``experiments/overview.py``), with links relative to the page so the folder can be moved or shared."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fmprobe import __version__
from fmprobe.atomic import write_text
from fmprobe.report.terminal import fmt
from fmprobe.report.templating import render


def write_runs_page(dest: Path, entries: Sequence[dict[str, Any]], *, title: str) -> Path:
    dest = Path(dest)
    here = dest.parent.resolve()
    rows = [{**e, "link": os.path.relpath(e["report"], here) if e["report"] else None,
             "folder": os.path.relpath(e["run_dir"], here)} for e in entries]  # fmt: skip
    statuses = {s: sum(e["status"] == s for e in entries) for s in dict.fromkeys(e["status"] for e in entries)}
    write_text(dest, render("runs.html", title=title, rows=rows, statuses=statuses, fmt=fmt, version=__version__))
    return dest
