"""The summary table printed after a run: every number with its seeds, CI, baseline and flags."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

from fmprobe.evaluate.metrics import lower_is_better


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "nan" if v != v else f"{v:.{digits}f}"


def shorten(text: str, width: int = 40) -> str:
    """A long cell for the terminal: its end (where paths and ids differ), marked by a leading ellipsis. Files
    (CSV, HTML, JSON) always hold the full value."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def headline_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (head, metric) for the task's headline metrics, test split."""
    rows = []
    for head, h in metrics["heads"].items():
        test = h["splits"]["test"]
        for metric in metrics["task"]["headline_metrics"]:
            if metric not in test["mean"]:
                continue
            ci = h["test_ci"].get(metric)
            rows.append({
                "head": head,
                "metric": metric,
                "val": h["splits"]["val"]["mean"].get(metric),
                "mean": test["mean"][metric],
                "sd": test["sd"].get(metric),
                "ci": ci,
                "baseline": metrics["baseline"]["test"].get(metric),
                "flags": [f["name"] for f in h["flags"] if f["severity"] != "info"],  # info casts no doubt
                "selected": head == metrics["selection"]["best_head"],
            })
        if "segmentation" in h:  # adapted: the decoder trained jointly with this head
            rows.append(segmentation_row(metrics, head, h["segmentation"]))
    seg = metrics.get("segmentation")
    if seg and seg["path"] == "frozen":
        rows += [segmentation_row(metrics, name, block) for name, block in seg["decoders"].items()]
    return rows


def segmentation_row(metrics: dict[str, Any], head: str, block: dict[str, Any]) -> dict[str, Any]:
    """The mIoU of a segmentation decoder, as a headline row (baseline: the training location prior)."""
    return {
        "head": head, "metric": "mIoU (segmentation)", "val": block["splits"]["val"]["mean"]["miou"],
        "mean": block["splits"]["test"]["mean"]["miou"], "sd": block["splits"]["test"]["sd"]["miou"],
        "ci": block["test_ci"].get("miou"), "baseline": metrics["segmentation"]["baseline"]["test"]["miou"],
        "flags": [], "selected": False,
    }


def params_text(h: dict[str, Any]) -> str:
    """"trainable / total" parameters of a head's run (total unknown in runs written before it was recorded)."""
    total = h.get("total_params")
    return f"{h['trainable_params']:,} / {total:,}" if total is not None else f"{h['trainable_params']:,} / ?"


def parameter_lines(metrics: dict[str, Any]) -> list[str]:
    return ["parameters (trainable / total): " + "; ".join(f"{head} {params_text(h)}"
                                                           for head, h in metrics["heads"].items())]


def grid_lines(metrics: dict[str, Any]) -> list[str]:
    """train.grid: the member chosen per head, and how many there were."""
    grid = metrics["selection"].get("grid")
    if not grid:
        return []
    return [f"grid, per head the member with the best mean validation {grid['metric']}: " + "; ".join(
        f"{head} → lr {g['lr']:g}, wd {g['weight_decay']:g} "
        f"({fmt(next(m['val_mean'] for m in g['members'] if m['member'] == g['chosen']))} of {len(g['members'])})"
        for head, g in grid["heads"].items())]


def new_table(console: Console, title: str) -> Table:
    """A rich table: ruled on a terminal; in a log only a header rule, columns aligned with spaces."""
    return Table(title=title, title_justify="left", box=box.HEAVY_HEAD if console.is_terminal else box.SIMPLE_HEAD)


def fitted_lines(metrics: dict[str, Any]) -> list[str]:
    """knn / logreg: the k or C each head chose on validation (every seed fits the same, so one value unless they
    differ), with its validation score and how many values were tried."""
    parts = []
    for head, h in metrics["heads"].items():
        chosen: dict[str, str] = {}  # the value as shown -> "k 20 (0.83)"
        tried = 0
        for selected in (h.get("selected") or {}).values():
            name = "k" if "k" in selected else "C"
            value, tried = selected[name], len(selected["validation"])
            chosen.setdefault(f"{value:g}", f"{name} {value:g} ({fmt(selected['validation'][str(value)])})")
        if chosen:
            parts.append(f"{head} → {' / '.join(chosen.values())} of {tried}")
    primary = metrics["task"]["primary_metric"]
    return [f"fitted heads, chosen on validation {primary}: " + "; ".join(parts)] if parts else []


def print_summary(console: Console, metrics: dict[str, Any], run_dir: Path, *,
                  more: Sequence[Callable[[Console, dict[str, Any]], None]] = ()) -> None:  # fmt: skip
    """The headline table, the flags, ``more`` sections (the label-efficiency table), and last the verdict line and
    the report's absolute path."""
    task = metrics["task"]
    split = metrics["split"]
    title = (
        f"{metrics['experiment']} · {task['type']} · test n={split['sizes']['test']} "
        f"({split['groups']['test']} groups) · seeds {metrics['seeds']}"
    )
    table = new_table(console, title)
    for col in ("head", "metric", "val mean", "test mean ± sd", f"{int(metrics['ci_level'] * 100)}% CI",
                "baseline", "flags"):
        table.add_column(col)
    for r in headline_rows(metrics):
        ci = "—" if r["ci"] is None else f"[{fmt(r['ci'][0])}, {fmt(r['ci'][1])}]"
        name = f"{r['head']} *" if r["selected"] else r["head"]
        flags = ", ".join(r["flags"]) or "ok"
        style = "red" if r["flags"] else None
        table.add_row(name, r["metric"], fmt(r["val"]), f"{fmt(r['mean'])} ± {fmt(r['sd'])}", ci,
                      baseline_text(metrics, r["metric"], r["baseline"]), flags, style=style)
    console.print(table)
    console.print(f"* selected on validation ({metrics['selection']['rule']}); test evaluated once per seed.")
    for line in parameter_lines(metrics) + grid_lines(metrics) + fitted_lines(metrics):
        console.print(line)
    for flag in metrics["flags"]:
        colour = {"error": "red", "warning": "yellow"}.get(flag["severity"], "cyan")
        console.print(f"[{colour}]flag {flag['name']}[/] ({flag.get('head', 'run')}): {flag['message']}")
    if split.get("group_overlap"):
        console.print(f"[bold red]groups overlap across splits (allowed by config): {len(split['group_overlap'])}[/]")
    if metrics.get("skipped"):
        console.print(f"[yellow]{len(metrics['skipped'])} samples skipped (on_error: skip); see metrics.json[/]")
    for section in more:
        section(console, metrics)
    console.print(verdict_line(metrics), markup=False)
    console.print(f"report: {(Path(run_dir) / 'report.html').resolve()}", markup=False)


def baseline_text(metrics: dict[str, Any], metric: str, value: Any) -> str:
    """The baseline's value, or why it has none (a constant prediction has no correlation, ...)."""
    reason = metrics["baseline"].get("undefined", {}).get(metric)
    if value is not None and value == value or reason is None:
        return fmt(value)
    return f"— ({reason})"


def verdict_parts(metrics: dict[str, Any]) -> list[str]:
    """What a researcher can repeat: the selected head, its test score with CI, the baseline, its flags, and
    whether it is distinguishable from the runner-up on the same test samples."""
    primary = metrics["task"]["primary_metric"]
    best = metrics["selection"]["best_head"]
    h = metrics["heads"][best]
    level = f"{int(metrics['ci_level'] * 100)}% CI"
    lo, hi = h["test_ci"].get(primary) or (None, None)
    flags = sorted({f["name"] for f in h["flags"]})
    parts = [
        f"{best} (selected on validation)",
        f"test {primary} {fmt(h['splits']['test']['mean'][primary])} [{fmt(lo)}, {fmt(hi)}] ({level})",
        f"baseline {baseline_text(metrics, primary, metrics['baseline']['test'].get(primary))}",
        "flags: " + (", ".join(flags) if flags else "none"),
    ]
    runner = metrics["selection"].get("runner_up")
    if runner is not None:
        parts.append(runner_up_text(metrics, runner))
    return parts


def verdict_line(metrics: dict[str, Any]) -> str:
    return f"verdict {metrics['experiment']}: " + " · ".join(verdict_parts(metrics))


def runner_up_text(metrics: dict[str, Any], runner: dict[str, Any]) -> str:
    """``attentive ≈ linear (difference -0.0001, 95% CI [-0.004, 0.004])``: tied unless the paired CI excludes 0."""
    best, other = metrics["selection"]["best_head"], runner["head"]
    if "skipped" in runner:
        return f"{best} vs {other}: not compared ({runner['skipped']})"
    lo, hi = runner["ci"]
    lower = lower_is_better(runner["metric"])
    if not runner["distinguishable"]:
        relation = "≈"
    else:
        relation = "better than" if (hi < 0) == lower else "worse than"
    level = f"{int(metrics['ci_level'] * 100)}% CI"
    return (f"{best} {relation} {other} (difference {runner['difference']:+.4f}, {level} "
            f"[{lo:+.4f}, {hi:+.4f}], paired over test {runner['resampled']})")


def params_cell(trainable: Any, total: Any) -> str:
    """"trainable / total" parameters; "?" for the total of a run written before it was recorded."""
    return params_text({"trainable_params": int(trainable), "total_params": None if pd.isna(total) else int(total)})


def seg_cell(row: dict[str, Any]) -> str:
    """The segmentation decoder's test mIoU and CI; "—" for a run without segmentation."""
    if pd.isna(row["seg_miou"]):
        return "—"
    return f"{fmt(row['seg_miou'])} [{fmt(row['seg_miou_lo'])}, {fmt(row['seg_miou_hi'])}]"


def head_label(row: dict[str, Any]) -> str:
    """The head, or with train.grid the member chosen on validation (``<head>/lr<lr>/wd<wd>``)."""
    member = row.get("grid_member")
    return member if isinstance(member, str) else row["head"]


SEG_NOTE = ("seg mIoU: test mean [CI] of the run's segmentation decoder (a frozen run has one decoder on the "
            "backbone's tokens, shared by every head)")


def comparison_lines(result: dict[str, Any]) -> list[str]:
    """``fmprobe compare``'s answer in words: A's and B's scores, their difference with its CI and p-value."""
    metric, level = result["metric"], int(result["ci_level"] * 100)
    lines = [f"{side} {result[side]['run']} · {result[side]['head']}: {metric} {fmt(result[side]['value'])} "
             f"(mean over {result[side]['members']} members)" for side in ("a", "b")]
    lines.append(f"A − B = {fmt(result['diff'])}, {level}% CI [{fmt(result['lo'])}, {fmt(result['hi'])}], "
                 f"p = {fmt(result['p_value'])} (paired bootstrap over {result['n_test']} test samples, "
                 f"{result['resampled']} resampled)")
    if result["identical_outputs"]:
        lines.append("identical outputs: A and B predict the same test scores, so they cannot differ")
    return lines
