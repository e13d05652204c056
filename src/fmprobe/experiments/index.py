"""The results index: one SQLite file (``<runs_dir>/index.sqlite``) over every run directory.

It is derived data, rebuilt from the run directories (metrics.json, status.json, config.resolved.yaml, env.json):
``update_index`` re-reads a run only when its metrics.json or status.json changed and drops runs whose folder is
gone, so the files stay the truth and the index can always be deleted. Under the same write lock it compares the
test outputs of every finished run's heads (``experiments.twins``) and flags identical ones in both runs' files.
Tables:

- ``runs``    one row per run directory: experiment, status (``finished`` | ``failed`` | ``unfinished``, with the
              failed stage, the error and the time: ``experiments.status``), config hash, model; for finished
              runs also task, seeds, wall time, git sha, best head (``run_statuses`` lists every run's state)
- ``heads``   one row per (run, head) of a finished run: type, pooling, layer, trainable and total parameters,
              flags (warnings and errors), info flags, selected on val, configuration identity and test-output
              hash, and with ``train.grid`` the member (``<head>/lr<lr>/wd<wd>``) chosen on validation
- ``metrics`` one row per (run, head, split, metric): mean, sd over seeds, CI (test), baseline (test);
              also ``ece`` (test, mean over seeds) for probabilistic tasks, and with ``segmentation`` the
              decoder's ``seg/miou`` and ``seg/iou/<class>`` (baseline: the location prior). A frozen run has one
              decoder reading the backbone's tokens, not the heads: its numbers are listed under every head.
- ``params``  one row per (run, flattened config key): the resolved config, to show what varies in a sweep

An index written by an older fmprobe (``PRAGMA user_version`` below ``SCHEMA_VERSION``) gets the new columns
and every run is re-read on the next update, so no run shows a blank where its files hold the data.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from fmprobe.config import parse_config
from fmprobe.errors import FmprobeError
from fmprobe.experiments.identity import IDENTITY_VERSION, head_identities
from fmprobe.experiments.status import read_status
from fmprobe.experiments.twins import TWIN_FLAGS, HeadOutput, sync_twin_flags

INDEX_NAME = "index.sqlite"
# 0: the first index; 1: heads.total_params and heads.grid_member, segmentation metrics;
# 2: run status (failed / unfinished runs listed), heads' info flags, identity and output hash.
SCHEMA_VERSION = 2
SEG_PREFIX = "seg/"  # metric names of the segmentation decoder: seg/miou, seg/iou/<class>
SEG_MIOU = SEG_PREFIX + "miou"
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_dir TEXT PRIMARY KEY, experiment TEXT, run_id TEXT, config_hash TEXT, metrics_mtime REAL,
  task_type TEXT, primary_metric TEXT, model TEXT, seeds TEXT, n_seeds INTEGER, ci_level REAL,
  best_head TEXT, wall_seconds REAL, git_sha TEXT, status TEXT, stage TEXT, error TEXT, status_time TEXT,
  status_mtime REAL);
CREATE TABLE IF NOT EXISTS heads (
  run_dir TEXT, head TEXT, type TEXT, pooling TEXT, layer TEXT, trainable_params INTEGER,
  selected INTEGER, flags TEXT, error_flags INTEGER, total_params INTEGER, grid_member TEXT,
  info_flags TEXT, identity TEXT, output_hash TEXT,
  PRIMARY KEY (run_dir, head));
CREATE TABLE IF NOT EXISTS metrics (
  run_dir TEXT, head TEXT, split TEXT, metric TEXT, mean REAL, sd REAL, ci_lo REAL, ci_hi REAL, baseline REAL,
  PRIMARY KEY (run_dir, head, split, metric));
CREATE TABLE IF NOT EXISTS params (run_dir TEXT, key TEXT, value TEXT, PRIMARY KEY (run_dir, key));
"""
# Columns added since schema 0, which _migrate adds to an older file (ALTER TABLE appends them at the end).
ADDED_COLUMNS = {
    "heads": {"total_params": "INTEGER", "grid_member": "TEXT", "info_flags": "TEXT", "identity": "TEXT",
              "output_hash": "TEXT"},
    "runs": {"status": "TEXT", "stage": "TEXT", "error": "TEXT", "status_time": "TEXT", "status_mtime": "REAL"},
}


def index_path(runs_dir: str | Path) -> Path:
    return Path(runs_dir).expanduser() / INDEX_NAME


def connect(runs_dir: str | Path) -> sqlite3.Connection:
    runs_dir = Path(runs_dir).expanduser()
    if not runs_dir.is_dir():
        raise FmprobeError(f"runs folder '{runs_dir}' does not exist; run an experiment first or pass --runs")
    con = sqlite3.connect(index_path(runs_dir), timeout=60)
    con.executescript(SCHEMA)
    _migrate(con, index_path(runs_dir))
    return con


def _version(con: sqlite3.Connection) -> int:
    return int(con.execute("PRAGMA user_version").fetchone()[0])


def _migrate(con: sqlite3.Connection, path: Path) -> None:
    """Bring an index written by an older fmprobe to this schema: add the missing columns and mark every run
    for re-reading (its rows lack what this version indexes), which the next ``update_index`` does."""
    if _version(con) == SCHEMA_VERSION:
        return
    if _version(con) > SCHEMA_VERSION:
        raise FmprobeError(f"the index '{path}' was written by a newer fmprobe (schema {_version(con)}, this one "
                           f"reads {SCHEMA_VERSION}); upgrade fmprobe, or delete the file: it is rebuilt from the "
                           "run directories")  # fmt: skip
    with con:
        con.execute("BEGIN IMMEDIATE")  # one process migrates; the others find it done
        if _version(con) == SCHEMA_VERSION:
            return
        for table, columns in ADDED_COLUMNS.items():
            have = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in have:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        con.execute("UPDATE runs SET metrics_mtime = NULL")
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def update_index(runs_dir: str | Path) -> Path:
    """Bring the index up to date with the run directories, and every run's identical-outputs flags with the
    finished runs (``experiments.twins``); returns its path. One process at a time: the write lock is held
    throughout, so runs finishing together are compared with each other."""
    runs_dir = Path(runs_dir).expanduser().resolve()
    with closing(connect(runs_dir)) as con, con:
        con.execute("BEGIN IMMEDIATE")  # one writer at a time; readers keep reading
        _read_changed(con, runs_dir)
        marks = ", ".join("?" * len(TWIN_FLAGS))
        flagged = [r for (r,) in con.execute(
            "SELECT DISTINCT run_dir FROM heads h WHERE EXISTS (SELECT 1 FROM json_each(h.flags) WHERE value IN "
            f"({marks})) OR EXISTS (SELECT 1 FROM json_each(h.info_flags) WHERE value IN ({marks}))",
            TWIN_FLAGS * 2)]  # fmt: skip
        outputs = [HeadOutput(*row) for row in con.execute(
            "SELECT h.run_dir, r.experiment || '/' || r.run_id || '/' || h.head, h.head, h.identity, h.output_hash "
            "FROM heads h JOIN runs r USING (run_dir) WHERE h.identity IS NOT NULL AND h.output_hash IS NOT NULL")]
        rewritten = sync_twin_flags(outputs, flagged)
        if rewritten:
            _read_changed(con, runs_dir, force=set(rewritten))
    return index_path(runs_dir)


def _read_changed(con: sqlite3.Connection, runs_dir: Path, force: Collection[str] = ()) -> None:
    """(Re-)read every run directory whose metrics.json or status.json changed (and those in ``force``); drop the
    ones that are gone."""
    known = {d: (m, s) for d, m, s in con.execute("SELECT run_dir, metrics_mtime, status_mtime FROM runs")}
    present = set()
    for config_file in sorted(runs_dir.glob("*/*/config.resolved.yaml")):
        run_dir = config_file.parent
        key = str(run_dir)
        present.add(key)
        stamps = tuple(_mtime(run_dir / name) for name in ("metrics.json", "status.json"))
        if known.get(key) == stamps and key not in force:
            continue
        try:
            rows = _read_run(run_dir, *stamps)
        except (OSError, ValueError, KeyError) as err:
            raise FmprobeError(f"cannot index run '{key}': {err}") from None
        _delete(con, [key])
        _insert(con, rows)
    _delete(con, [d for d in known if d not in present])


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _delete(con: sqlite3.Connection, run_dirs: Iterable[str]) -> None:
    for table in ("runs", "heads", "metrics", "params"):
        con.executemany(f"DELETE FROM {table} WHERE run_dir = ?", [(d,) for d in run_dirs])


def _insert(con: sqlite3.Connection, rows: dict[str, list[dict[str, Any]]]) -> None:
    """Rows as {column: value}: named, since a migrated file has its added columns last."""
    for table, values in rows.items():
        if values:
            columns = list(values[0])
            con.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                            [tuple(v[c] for c in columns) for v in values])


def _num(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return None if v != v else v


def _read_run(run_dir: Path, metrics_mtime: float | None, status_mtime: float | None) -> dict[str, list[dict]]:
    """The rows of one run directory: the run with its status, and for a finished run its heads and metrics."""
    config = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    state = read_status(run_dir)
    key = str(run_dir)
    run = {"run_dir": key, "experiment": run_dir.parent.name, "run_id": run_dir.name,
           "config_hash": state.config_hash, "metrics_mtime": metrics_mtime, "status_mtime": status_mtime,
           "model": config["model"]["name"], "status": state.status, "stage": state.stage, "error": state.error,
           "status_time": state.time}  # fmt: skip
    params = [{"run_dir": key, "key": k, "value": json.dumps(v)} for k, v in _flatten(config).items()]
    if state.status != "finished":
        return {"runs": [run], "heads": [], "metrics": [], "params": params}
    m = json.loads((run_dir / "metrics.json").read_text())
    env_file = run_dir / "env.json"
    env = json.loads(env_file.read_text()) if env_file.exists() else {}
    best = m["selection"]["best_head"]
    grid = m["selection"].get("grid", {}).get("heads", {})
    run.update({"experiment": m["experiment"], "config_hash": m["config_hash"], "task_type": m["task"]["type"],
                "primary_metric": m["task"]["primary_metric"], "seeds": json.dumps(m["seeds"]),
                "n_seeds": len(m["seeds"]), "ci_level": m["ci_level"], "best_head": best,
                "wall_seconds": _num(m.get("wall_seconds")), "git_sha": env.get("git_sha")})  # fmt: skip
    identities, hashes = _identities(m, config), m.get("prediction_hashes", {})
    heads, metrics = [], []
    for head, h in m["heads"].items():
        concerns = [f for f in h["flags"] if f["severity"] != "info"]
        heads.append({"run_dir": key, "head": head, "type": h["type"], "pooling": h["pooling"],
                      "layer": str(h["layer"]), "trainable_params": h["trainable_params"],
                      "total_params": h.get("total_params"),  # absent in runs written before it was recorded
                      "selected": int(head == best), "flags": json.dumps([f["name"] for f in concerns]),
                      "error_flags": sum(f["severity"] == "error" for f in concerns),
                      "info_flags": json.dumps([f["name"] for f in h["flags"] if f["severity"] == "info"]),
                      "identity": identities.get(head), "output_hash": hashes.get(head, [None, None])[1],
                      "grid_member": grid.get(head, {}).get("chosen")})  # fmt: skip
        metrics += _metric_rows(key, head, h, m["baseline"]["test"])
        if h.get("calibration_test"):
            eces = [c["ece"] for c in h["calibration_test"].values()]
            sd = float(np.std(eces, ddof=1)) if len(eces) > 1 else None
            metrics.append({"run_dir": key, "head": head, "split": "test", "metric": "ece",
                            "mean": float(np.mean(eces)), "sd": sd, "ci_lo": None, "ci_hi": None,
                            "baseline": None})  # fmt: skip
        decoder = _decoder_of(m, head)
        if decoder is not None:
            metrics += _metric_rows(key, head, decoder, m["segmentation"]["baseline"]["test"], prefix=SEG_PREFIX)
    return {"runs": [run], "heads": heads, "metrics": metrics, "params": params}


def _identities(m: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    """Each head's configuration identity as this fmprobe defines it: as recorded, or for a run recorded under an
    older definition recomputed from its config (a config this version cannot read: its heads are not compared)."""
    recorded = {h: v[0] for h, v in m.get("prediction_hashes", {}).items()}
    if not recorded or m.get("identity_version") == IDENTITY_VERSION:
        return recorded
    try:
        return head_identities(parse_config(config))
    except FmprobeError:
        return {}


def _metric_rows(key: str, head: str, block: dict[str, Any], baseline: dict[str, Any], prefix: str = "") -> list[dict]:
    """Rows of a block with ``splits`` (mean, sd per split) and ``test_ci``: a head's, or a segmentation decoder's."""
    rows = []
    for split, s in block["splits"].items():
        for metric, mean in s["mean"].items():
            test = split == "test"
            ci = block["test_ci"].get(metric) if test else None
            rows.append({"run_dir": key, "head": head, "split": split, "metric": prefix + metric, "mean": _num(mean),
                         "sd": _num(s["sd"].get(metric)), "ci_lo": _num(ci[0]) if ci else None,
                         "ci_hi": _num(ci[1]) if ci else None,
                         "baseline": _num(baseline.get(metric)) if test else None})  # fmt: skip
    return rows


def _decoder_of(m: dict[str, Any], head: str) -> dict[str, Any] | None:
    """The segmentation decoder block that goes with ``head``: its own (adapted runs), or the run's one decoder
    on the frozen tokens, which every head shares."""
    seg = m.get("segmentation")
    if seg is None:
        return None
    own = m["heads"][head].get("segmentation")
    if own is not None:
        return own
    return seg["decoders"]["segmentation"] if seg["path"] == "frozen" else None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


def query(runs_dir: str | Path, sql: str, args: tuple = ()) -> pd.DataFrame:
    with closing(connect(runs_dir)) as con:
        return pd.read_sql_query(sql, con, params=args)


def candidates(
    runs_dir: str | Path, *, experiment: str | None = None, run_dirs: Iterable[str | Path] | None = None
) -> pd.DataFrame:
    """One row per (run, head) with run and head columns, after updating the index."""
    update_index(runs_dir)
    sql = ("SELECT r.*, h.head, h.type, h.pooling, h.layer, h.trainable_params, h.total_params, h.grid_member, "
           "h.selected, h.flags, h.error_flags FROM runs r JOIN heads h USING (run_dir) WHERE r.status = 'finished'")
    df = query(runs_dir, sql)
    if experiment is not None:
        if experiment not in set(df["experiment"]):
            known = ", ".join(sorted(set(df["experiment"]))) or "none"
            raise FmprobeError(f"no finished run of experiment '{experiment}' under {runs_dir} (experiments: {known})")
        df = df[df["experiment"] == experiment]
    if run_dirs is not None:
        wanted = {str(Path(d).resolve()) for d in run_dirs}
        df = df[df["run_dir"].isin(wanted)]
    df = df.assign(flags=df["flags"].map(json.loads), seeds=df["seeds"].map(json.loads))
    return df.sort_values(["experiment", "run_id", "head"]).reset_index(drop=True)


def run_statuses(runs_dir: str | Path, *, experiment: str | None = None,
                 run_dirs: Iterable[str | Path] | None = None) -> pd.DataFrame:
    """Every run directory's state, after updating the index: run_dir, experiment, run_id, status (finished |
    failed | unfinished), stage and error (failed runs), status_time, config_hash, model; newest first."""
    update_index(runs_dir)
    df = query(runs_dir, "SELECT run_dir, experiment, run_id, status, stage, error, status_time, config_hash, model "
                         "FROM runs ORDER BY experiment, run_id DESC")  # fmt: skip
    if experiment is not None:
        df = df[df["experiment"] == experiment]
    if run_dirs is not None:
        df = df[df["run_dir"].isin({str(Path(d).resolve()) for d in run_dirs})]
    return df.reset_index(drop=True)


def metric_table(runs_dir: str | Path, run_dirs: Iterable[str]) -> pd.DataFrame:
    """Every (run, head, split, metric) row of the given runs."""
    dirs = list(run_dirs)
    if not dirs:
        return pd.DataFrame(columns=["run_dir", "head", "split", "metric", "mean", "sd", "ci_lo", "ci_hi", "baseline"])
    marks = ", ".join("?" * len(dirs))
    return query(runs_dir, f"SELECT * FROM metrics WHERE run_dir IN ({marks})", tuple(dirs))


def varying_params(runs_dir: str | Path, run_dirs: Iterable[str]) -> pd.DataFrame:
    """Config keys whose value differs between the given runs (run_dir x key, values as YAML-ish text)."""
    dirs = list(run_dirs)
    if len(dirs) < 2:
        return pd.DataFrame(index=pd.Index(dirs, name="run_dir"))
    marks = ", ".join("?" * len(dirs))
    long = query(runs_dir, f"SELECT * FROM params WHERE run_dir IN ({marks})", tuple(dirs))
    wide = long.pivot(index="run_dir", columns="key", values="value")
    ignore = {"name", "runs_dir"}
    keep = [c for c in wide.columns if c not in ignore and wide[c].nunique(dropna=False) > 1]
    return wide[keep].map(lambda v: "—" if v is None or v != v else _short(json.loads(v)))


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 40 else "…" + text[-39:]
