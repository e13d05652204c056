"""The summary table printed after a run: every number with its seeds, CI, baseline and flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "nan" if v != v else f"{v:.{digits}f}"


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
                "flags": [f["name"] for f in h["flags"]],
                "selected": head == metrics["selection"]["best_head"],
            })
    return rows


def print_summary(console: Console, metrics: dict[str, Any], run_dir: Path) -> None:
    task = metrics["task"]
    split = metrics["split"]
    title = (
        f"{metrics['experiment']} · {task['type']} · test n={split['sizes']['test']} "
        f"({split['groups']['test']} groups) · seeds {metrics['seeds']}"
    )
    table = Table(title=title, title_justify="left")
    for col in ("head", "metric", "val mean", "test mean ± sd", f"{int(metrics['ci_level'] * 100)}% CI",
                "baseline", "flags"):
        table.add_column(col)
    for r in headline_rows(metrics):
        ci = "—" if r["ci"] is None else f"[{fmt(r['ci'][0])}, {fmt(r['ci'][1])}]"
        name = f"{r['head']} *" if r["selected"] else r["head"]
        flags = ", ".join(r["flags"]) or "ok"
        style = "red" if r["flags"] else None
        table.add_row(name, r["metric"], fmt(r["val"]), f"{fmt(r['mean'])} ± {fmt(r['sd'])}", ci,
                      fmt(r["baseline"]), flags, style=style)
    console.print(table)
    console.print(f"* selected on validation ({metrics['selection']['rule']}); test evaluated once per seed.")
    for flag in metrics["flags"]:
        colour = "red" if flag["severity"] == "error" else "yellow"
        console.print(f"[{colour}]flag {flag['name']}[/] ({flag.get('head', 'run')}): {flag['message']}")
    if split.get("group_overlap"):
        console.print(f"[bold red]groups overlap across splits (allowed by config): {len(split['group_overlap'])}[/]")
    if metrics.get("skipped"):
        console.print(f"[yellow]{len(metrics['skipped'])} samples skipped (on_error: skip); see metrics.json[/]")
    console.print(f"run directory: {run_dir}")
