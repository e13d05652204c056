"""`fmprobe leaderboard`: every (run, head) of a runs folder with its metric, CI, seeds, baseline and flags.

Ranked on the validation mean of the metric, never on test: test (mean ± sd, CI, baseline) is shown
for each candidate, but choosing by it would make the winner's test number optimistic. Config keys
that differ between the listed runs are added as columns, so a sweep's grid shows next to its results.
Candidates without the metric are not ranked and are listed as such (``Leaderboard.missing``); a run with a
segmentation decoder adds its test mIoU as a column, and ``seg/miou`` can be the ranked metric itself. Runs that
failed are listed under the table with their stage and error (``Leaderboard.failed``), never ranked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fmprobe.atomic import atomic_path
from fmprobe.errors import FmprobeError
from fmprobe.evaluate.metrics import higher_is_better
from fmprobe.experiments.index import SEG_MIOU, candidates, metric_table, run_statuses, varying_params
from fmprobe.experiments.status import short_error
from fmprobe.report.terminal import SEG_NOTE, fmt, head_label, new_table, params_cell, seg_cell, shorten

# Non-metric quantities a gate or a leaderboard can read, all better when smaller.
RUN_QUANTITIES = ("trainable_params", "total_params", "wall_seconds")
LOWER_IS_BETTER = frozenset({"ece", *RUN_QUANTITIES})

COLUMNS = ["rank", "experiment", "run_id", "head", "selected", "metric", "val_mean", "test_mean", "test_sd",
           "ci_lo", "ci_hi", "baseline", "n_seeds", "flags", "trainable_params", "total_params", "wall_seconds"]
SEG_COLUMNS = ["seg_miou", "seg_miou_lo", "seg_miou_hi"]  # test mean and CI, when a run has a segmentation decoder


def better_high(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER and higher_is_better(metric)


@dataclass
class Leaderboard:
    table: pd.DataFrame  # COLUMNS + varying config keys, plus run_dir
    metric: str
    ci_level: float | None
    params: list[str]  # the varying config keys shown
    missing: list[str] = field(default_factory=list)  # candidates (experiment/run/head) without the metric
    failed: list[dict[str, str]] = field(default_factory=list)  # failed runs: {"run", "stage", "error"}

    @property
    def shows_segmentation(self) -> bool:
        return "seg_miou" in self.table

    def to_csv(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            self.table.assign(flags=self.table["flags"].map(";".join)).to_csv(tmp, index=False)


def boards_by_primary_metric(runs_dir: str | Path, run_dirs: Iterable[str | Path]) -> list[Leaderboard]:
    """One leaderboard per primary metric: runs of different tasks (R² and AUROC) cannot share one ranking."""
    cands = candidates(runs_dir, run_dirs=run_dirs)
    return [build_leaderboard(runs_dir, run_dirs=list(group["run_dir"].unique()), metric=metric)
            for metric, group in cands.groupby("primary_metric")]


def build_leaderboard(
    runs_dir: str | Path,
    *,
    experiment: str | None = None,
    run_dirs: Iterable[str | Path] | None = None,
    metric: str | None = None,
) -> Leaderboard:
    failed = failed_runs(runs_dir, experiment=experiment, run_dirs=run_dirs)
    cands = candidates(runs_dir, experiment=experiment, run_dirs=run_dirs)
    if cands.empty:
        raise FmprobeError(f"no finished run under {runs_dir}" + (f" for experiment '{experiment}'" if experiment else "")
                           + "".join(f"\nfailed: {f['run']} at {f['stage']}: {f['error']}" for f in failed))
    if metric is None:
        primaries = sorted(set(cands["primary_metric"]))
        if len(primaries) > 1:
            raise FmprobeError(
                f"the runs have different primary metrics {primaries}; pick one with --metric or one --experiment"
            )
        metric = primaries[0]
    if metric in RUN_QUANTITIES:
        raise FmprobeError(f"'{metric}' is shown in every row, not a metric to rank on (the leaderboard ranks on "
                           "validation); pick a metric with --metric, or make it a gate criterion (fmprobe gate)")
    every = metric_table(runs_dir, cands["run_dir"].unique())
    values = every[every["metric"] == metric]
    test = values[values["split"] == "test"].set_index(["run_dir", "head"])
    val = values[values["split"] == "val"].set_index(["run_dir", "head"])
    has = [(c.run_dir, c.head) in val.index and (c.run_dir, c.head) in test.index for c in cands.itertuples()]
    if not any(has):
        raise FmprobeError(f"no run has metric '{metric}' on val and test (the runs have: {_metric_names(every)})")
    missing = [f"{c.experiment}/{c.run_id}/{c.head}" for c, ok in zip(cands.itertuples(), has) if not ok]
    cands = cands[has]
    seg = every[(every["metric"] == SEG_MIOU) & (every["split"] == "test") & every["run_dir"].isin(cands["run_dir"])]
    seg = seg.set_index(["run_dir", "head"]) if metric != SEG_MIOU else seg.iloc[:0]
    rows = []
    for c in cands.itertuples(index=False):
        key = (c.run_dir, c.head)
        t = test.loc[key]
        row = {
            "run_dir": c.run_dir, "experiment": c.experiment, "run_id": c.run_id, "head": c.head,
            "selected": bool(c.selected), "metric": metric, "val_mean": val.loc[key, "mean"],
            "test_mean": t["mean"], "test_sd": t["sd"], "ci_lo": t["ci_lo"], "ci_hi": t["ci_hi"],
            "baseline": t["baseline"], "n_seeds": c.n_seeds, "flags": list(c.flags),
            "trainable_params": c.trainable_params, "total_params": c.total_params, "wall_seconds": c.wall_seconds,
            "grid_member": c.grid_member,
        }
        if not seg.empty:
            hit = seg.loc[key] if key in seg.index else None
            row.update({col: np.nan if hit is None else hit[part]
                        for col, part in zip(SEG_COLUMNS, ("mean", "ci_lo", "ci_hi"))})  # fmt: skip
        rows.append(row)
    table = pd.DataFrame(rows).astype({"trainable_params": "Int64", "total_params": "Int64"})
    sign = 1.0 if better_high(metric) else -1.0
    order = (sign * table["val_mean"].astype(float)).fillna(-np.inf)
    table = table.assign(_order=-order).sort_values(["_order", "run_id", "head"]).drop(columns="_order")
    table.insert(0, "rank", range(1, len(table) + 1))
    params = varying_params(runs_dir, table["run_dir"].unique())
    table = table.merge(params, left_on="run_dir", right_index=True, how="left")
    extra = [c for c in ("grid_member", *SEG_COLUMNS) if c in table and table[c].notna().any()]
    levels = set(cands["ci_level"])
    return Leaderboard(table[[*COLUMNS, *extra, *params.columns, "run_dir"]].reset_index(drop=True), metric,
                       levels.pop() if len(levels) == 1 else None, list(params.columns), missing, failed)


def failed_runs(runs_dir: str | Path, *, experiment: str | None = None,
                run_dirs: Iterable[str | Path] | None = None) -> list[dict[str, str]]:
    """The failed runs (of ``experiment`` / among ``run_dirs``): experiment/run id, stage, the error's last line."""
    df = run_statuses(runs_dir, experiment=experiment, run_dirs=run_dirs)
    return [{"run": f"{r.experiment}/{r.run_id}", "stage": r.stage or "?", "error": short_error(r.error)}
            for r in df[df["status"] == "failed"].itertuples()]


def _metric_names(values: pd.DataFrame) -> str:
    """The metrics the runs have, per-class and per-target names folded (``ap/…``)."""
    names = {m if "/" not in m or m == SEG_MIOU else m.rsplit("/", 1)[0] + "/…" for m in values["metric"]}
    return ", ".join(sorted(names)) or "none"


def print_leaderboard(console, board: Leaderboard) -> None:  # noqa: ANN001 (rich Console)
    level = f"{int(board.ci_level * 100)}% CI" if board.ci_level else "CI"
    table = new_table(console, f"leaderboard · {board.metric} · ranked on validation")
    seg = ["seg mIoU (test)"] if board.shows_segmentation else []
    for col in ("#", "run", "head", *board.params, "val", "test mean ± sd", level, "baseline", *seg, "seeds",
                "params (trainable / total)", "wall s", "flags"):
        table.add_column(col)
    for r in board.table.itertuples(index=False):
        row = r._asdict()
        ci = "—" if pd.isna(row["ci_lo"]) else f"[{fmt(row['ci_lo'])}, {fmt(row['ci_hi'])}]"
        table.add_row(
            str(row["rank"]), f"{row['experiment']}/{row['run_id']}",
            head_label(row) + (" *" if row["selected"] else ""),
            *[shorten(str(board.table.loc[row["rank"] - 1, p])) for p in board.params],
            fmt(row["val_mean"]), f"{fmt(row['test_mean'])} ± {fmt(row['test_sd'])}", ci, fmt(row["baseline"]),
            *([seg_cell(row)] if seg else []), str(row["n_seeds"]),
            params_cell(row["trainable_params"], row["total_params"]), fmt(row["wall_seconds"], 1),
            ", ".join(row["flags"]) or "ok", style="red" if row["flags"] else None,
        )
    console.print(table)
    console.print("* the head selected on validation within its run; rows ranked by validation mean, never by test.")
    if seg:
        console.print(SEG_NOTE)
    if board.missing:
        console.print(f"[yellow]not ranked: {len(board.missing)} candidate(s) have no {board.metric} on val and "
                      f"test: {', '.join(board.missing)}[/]")
    for f in board.failed:
        console.print(f"[red]failed: {f['run']} at {f['stage']}: {f['error']}[/]", highlight=False)
