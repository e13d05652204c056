"""A run's state, recorded in ``status.json`` in its directory, so a failed run is told apart from a running one.

The file is one small JSON object::

    {"status": "finished" | "failed",
     "stage": "extract" | "train" | "evaluate" | "write" | "tracking" | null,  # where it failed (null: finished)
     "error": "ValueError: ..." | null,                                        # what went wrong
     "time": "2025-01-31T12:00:00+00:00",                                      # when it was written (UTC)
     "config_hash": "..."}

``run_experiment`` writes it when a run fails (then re-raises) and after metrics.json when it finishes. A run
directory without it is read as ``finished`` when it holds metrics.json (runs written before status.json
existed) and as ``unfinished`` otherwise (still running, or killed before it could record anything). A failed
run's directory is never reused: a rerun creates a new one. A run whose status.json says finished but whose
metrics.json is gone (deleted by hand) has lost its results: it reads as ``unfinished``, with an error saying so,
and a sweep runs it again.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from fmprobe.atomic import write_json
from fmprobe.errors import FmprobeError

STATUS_FILE = "status.json"
State = Literal["finished", "failed", "unfinished"]


@dataclass(frozen=True)
class RunStatus:
    status: State
    stage: str | None = None
    error: str | None = None
    time: str | None = None
    config_hash: str | None = None


def write_status(run_dir: Path, status: Literal["finished", "failed"], *, config_hash: str, stage: str | None = None,
                 error: str | None = None) -> None:  # fmt: skip
    write_json(run_dir / STATUS_FILE, {"status": status, "stage": stage, "error": error,
                                       "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                       "config_hash": config_hash})  # fmt: skip


def read_status(run_dir: Path) -> RunStatus:
    """The run's state from status.json, or from metrics.json's presence when there is no status file."""
    path = run_dir / STATUS_FILE
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise FmprobeError(f"'{path}' is not valid JSON ({err}); fmprobe writes it whole, so it was edited: "
                               "restore it or delete it (the run then reads as unfinished)") from None
        status = RunStatus(data["status"], data.get("stage"), data.get("error"), data.get("time"),
                           data.get("config_hash"))  # fmt: skip
        if status.status == "finished" and not (run_dir / "metrics.json").exists():
            return RunStatus("unfinished", error="status.json says finished but metrics.json is gone: its results are "
                             "lost; run it again", time=status.time, config_hash=status.config_hash)  # fmt: skip
        return status
    return RunStatus("finished" if (run_dir / "metrics.json").exists() else "unfinished")


def is_finished(run_dir: Path) -> bool:
    return read_status(run_dir).status == "finished"


def describe_error(err: BaseException) -> str:
    """What went wrong, for status.json and sweep records: fmprobe's own errors say it in their message; anything
    else keeps its traceback (it is a bug or an environment problem someone will need to trace)."""
    if isinstance(err, FmprobeError):
        return "\n".join([f"{type(err).__name__}: {err}", *getattr(err, "__notes__", [])])
    return "".join(traceback.format_exception(err)).strip()


def short_error(error: str | None) -> str:
    """One line of a recorded error: a traceback's closing ``Type: message``, else the message's first line."""
    lines = [line for line in (error or "").strip().splitlines() if line.strip()]
    if not lines:
        return "no error recorded"
    if lines[0].startswith("Traceback"):
        closing = [line for line in lines if not line.startswith((" ", "Traceback"))]
        return closing[0] if closing else lines[-1]
    return lines[0]
