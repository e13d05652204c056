"""`fmprobe leaderboard`: every (run, head) of a runs folder with its metric, CI, seeds, baseline and flags.

Ranked on the validation mean of the metric, never on test: test (mean ± sd, CI, baseline) is shown
for each candidate, but choosing by it would make the winner's test number optimistic. Config keys
that differ between the listed runs are added as columns, so a sweep's grid shows next to its results.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fmprobe.atomic import atomic_path
from fmprobe.errors import FmprobeError
from fmprobe.evaluate.metrics import higher_is_better
from fmprobe.experiments.index import candidates, metric_table, varying_params

# Non-metric quantities a gate or a leaderboard can read, all better when smaller.
RUN_QUANTITIES = ("trainable_params", "wall_seconds")
LOWER_IS_BETTER = frozenset({"ece", *RUN_QUANTITIES})

COLUMNS = ["rank", "experiment", "run_id", "head", "selected", "metric", "val_mean", "test_mean", "test_sd",
           "ci_lo", "ci_hi", "baseline", "n_seeds", "flags", "trainable_params", "wall_seconds"]


def better_high(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER and higher_is_better(metric)


@dataclass
class Leaderboard:
    table: pd.DataFrame  # COLUMNS + varying config keys, plus run_dir
    metric: str
    ci_level: float | None
    params: list[str]  # the varying config keys shown

    def to_csv(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            self.table.assign(flags=self.table["flags"].map(";".join)).to_csv(tmp, index=False)


def build_leaderboard(
    runs_dir: str | Path,
    *,
    experiment: str | None = None,
    run_dirs: Iterable[str | Path] | None = None,
    metric: str | None = None,
) -> Leaderboard:
    cands = candidates(runs_dir, experiment=experiment, run_dirs=run_dirs)
    if cands.empty:
        raise FmprobeError(f"no finished run under {runs_dir}" + (f" for experiment '{experiment}'" if experiment else ""))
    if metric is None:
        primaries = sorted(set(cands["primary_metric"]))
        if len(primaries) > 1:
            raise FmprobeError(
                f"the runs have different primary metrics {primaries}; pick one with --metric or one --experiment"
            )
        metric = primaries[0]
    values = metric_table(runs_dir, cands["run_dir"].unique())
    values = values[values["metric"] == metric]
    if values.empty and metric not in RUN_QUANTITIES:
        raise FmprobeError(f"no run has metric '{metric}'")
    test = values[values["split"] == "test"].set_index(["run_dir", "head"])
    val = values[values["split"] == "val"].set_index(["run_dir", "head"])
    rows = []
    for c in cands.itertuples(index=False):
        key = (c.run_dir, c.head)
        t = test.loc[key] if key in test.index else None
        rows.append({
            "run_dir": c.run_dir, "experiment": c.experiment, "run_id": c.run_id, "head": c.head,
            "selected": bool(c.selected), "metric": metric,
            "val_mean": val.loc[key, "mean"] if key in val.index else np.nan,
            "test_mean": t["mean"] if t is not None else np.nan,
            "test_sd": t["sd"] if t is not None else np.nan,
            "ci_lo": t["ci_lo"] if t is not None else np.nan,
            "ci_hi": t["ci_hi"] if t is not None else np.nan,
            "baseline": t["baseline"] if t is not None else np.nan,
            "n_seeds": c.n_seeds, "flags": list(c.flags), "trainable_params": c.trainable_params,
            "wall_seconds": c.wall_seconds,
        })
    table = pd.DataFrame(rows)
    sign = 1.0 if better_high(metric) else -1.0
    order = (sign * table["val_mean"].astype(float)).fillna(-np.inf)
    table = table.assign(_order=-order).sort_values(["_order", "run_id", "head"]).drop(columns="_order")
    table.insert(0, "rank", range(1, len(table) + 1))
    params = varying_params(runs_dir, table["run_dir"].unique())
    table = table.merge(params, left_on="run_dir", right_index=True, how="left")
    levels = set(cands["ci_level"])
    return Leaderboard(table[[*COLUMNS, *params.columns, "run_dir"]].reset_index(drop=True), metric,
                       levels.pop() if len(levels) == 1 else None, list(params.columns))


def print_leaderboard(console, board: Leaderboard) -> None:  # noqa: ANN001 (rich Console)
    from rich.table import Table

    from fmprobe.report.terminal import fmt

    level = f"{int(board.ci_level * 100)}% CI" if board.ci_level else "CI"
    table = Table(title=f"leaderboard · {board.metric} · ranked on validation", title_justify="left")
    for col in ("#", "run", "head", *board.params, "val", "test mean ± sd", level, "baseline", "seeds",
                "params", "wall s", "flags"):
        table.add_column(col)
    for r in board.table.itertuples(index=False):
        row = r._asdict()
        ci = "—" if np.isnan(row["ci_lo"]) else f"[{fmt(row['ci_lo'])}, {fmt(row['ci_hi'])}]"
        table.add_row(
            str(row["rank"]), f"{row['experiment']}/{row['run_id']}", row["head"] + (" *" if row["selected"] else ""),
            *[str(board.table.loc[row["rank"] - 1, p]) for p in board.params],
            fmt(row["val_mean"]), f"{fmt(row['test_mean'])} ± {fmt(row['test_sd'])}", ci, fmt(row["baseline"]),
            str(row["n_seeds"]), str(row["trainable_params"]), fmt(row["wall_seconds"], 1),
            ", ".join(row["flags"]) or "ok", style="red" if row["flags"] else None,
        )
    console.print(table)
    console.print("* the head selected on validation within its run; rows ranked by validation mean, never by test.")
