"""Heads whose test outputs are identical, found among every finished run of a runs folder and flagged on both sides.

For each (run, head) whose test-output hash equals another (run, head)'s (the same run's other heads included):

- a different configuration identity (``identity.head_hash``: what changes the predictions) ->
  ``identical_predictions`` (error) on both: the configuration difference had no effect;
- the same identity -> ``reproduced`` (info) on both: a reproduction, which is expected.

The runs index calls :func:`sync_twin_flags` under its write lock, after reading the run directories, at the end of
every run and before every leaderboard, gate or sweep report. So two runs finishing at the same moment (a parallel
sweep, two ``fmprobe run`` at once) always meet: each writes its metrics.json before asking for the lock, and
whichever process takes it second sees both. A finished run learns about a twin found later because its own files
change: metrics.json is rewritten (atomically) with the flag on the head and in the run's flag list, and its
report.html is rendered again. The flags follow the runs present: a deleted twin's flag is dropped.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fmprobe.atomic import write_json
from fmprobe.config import parse_config, read_yaml
from fmprobe.errors import FmprobeError
from fmprobe.evaluate.flags import Flag, identical_predictions, reproduced
from fmprobe.report.html import write_run_report

TWIN_FLAGS = ("identical_predictions", "reproduced")


@dataclass(frozen=True)
class HeadOutput:
    """One head of a finished run: its configuration identity and the hash of its test outputs."""

    run_dir: str
    label: str  # experiment/run_id/head, as the flags name it
    head: str
    identity: str
    output_hash: str


def twin_flags(outputs: Iterable[HeadOutput]) -> dict[tuple[str, str], list[Flag]]:
    """(run_dir, head) -> its identical_predictions / reproduced flags, for every head that has a twin."""
    by_hash: dict[str, list[HeadOutput]] = defaultdict(list)
    for o in outputs:
        by_hash[o.output_hash].append(o)
    out: dict[tuple[str, str], list[Flag]] = {}
    for group in by_hash.values():
        if len(group) < 2:
            continue
        for o in group:
            others = {p.label: (p.identity, p.output_hash) for p in group if p is not o}
            found = [identical_predictions(o.identity, o.output_hash, others),
                     reproduced(o.identity, o.output_hash, others)]  # fmt: skip
            out[(o.run_dir, o.head)] = [f for f in found if f is not None]
    return out


def sync_twin_flags(outputs: Iterable[HeadOutput], flagged_runs: Iterable[str]) -> list[str]:
    """Bring every run's twin flags in line with ``outputs``; returns the runs whose files were rewritten.

    ``flagged_runs``: runs whose metrics.json carries a twin flag now (checked too, so a stale flag is dropped).
    Only heads in ``outputs`` are judged: a head without a recorded output hash (a run from an older fmprobe)
    keeps the flags it has.
    """
    outputs = list(outputs)
    wanted = twin_flags(outputs)
    judged = {(o.run_dir, o.head) for o in outputs}
    changed = []
    for run_dir in sorted({r for r, _ in wanted} | set(flagged_runs)):
        path = Path(run_dir) / "metrics.json"
        metrics = json.loads(path.read_text())
        current = _current(metrics)
        flags = {h: [f.to_dict() for f in wanted.get((run_dir, h), [])] if (run_dir, h) in judged else current[h]
                 for h in metrics["heads"]}  # fmt: skip
        if flags == current:
            continue
        for head, entry in metrics["heads"].items():
            entry["flags"] = [f for f in entry["flags"] if f["name"] not in TWIN_FLAGS] + flags[head]
        metrics["flags"] = [f for f in metrics["flags"] if f["name"] not in TWIN_FLAGS] + [
            {"head": h, **f} for h, fs in flags.items() for f in fs]
        _render_report(Path(run_dir), metrics)
        write_json(path, metrics)
        changed.append(run_dir)
    return changed


def _current(metrics: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {h: [f for f in entry["flags"] if f["name"] in TWIN_FLAGS] for h, entry in metrics["heads"].items()}


def _render_report(run_dir: Path, metrics: dict[str, Any]) -> None:
    """report.html again, with the new flags (a run whose config this fmprobe cannot read keeps its old one)."""
    try:
        exp = parse_config(read_yaml(run_dir / "config.resolved.yaml"), source=f"'{run_dir}'")
    except FmprobeError as err:
        warnings.warn(f"{run_dir}: metrics.json has its new identical-outputs flags, but report.html could not be "
                      f"rendered again: {err}", stacklevel=2)
        return
    curves = pd.read_parquet(run_dir / "curves.parquet")
    write_run_report(run_dir, exp, metrics, curves)
