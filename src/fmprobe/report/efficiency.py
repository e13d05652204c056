"""The label-efficiency section of the run report, the sweep report and the terminal: curves with their intervals,
one row per head and budget, and the labels needed to reach the target. Renders metrics.json's ``efficiency``
block (``evaluate.efficiency``); computes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console

from fmprobe.report.plots import label_curves
from fmprobe.report.terminal import fmt, new_table

TITLES = {"shots": "few-shot episodes", "fraction": "label fractions"}


def budget_text(protocol: str, value: float) -> str:
    return f"K={value:g}" if protocol == "shots" else f"{value:.0%}"


def rows(block: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per head and budget, in the order computed."""
    out = []
    metric = block["metric"]
    for p in block["points"]:
        row = {"head": p["head"], "protocol": p["protocol"], "budget": budget_text(p["protocol"], p["value"])}
        if p["status"] != "ok":
            out.append({**row, "status": f"not drawn: {p['missing']}", "flags": []})
            continue
        labelled = p["labelled"]
        out.append({**row, "status": "ok", "repeats": len(p["repeats"]),
                    "groups": _median(labelled["groups"]), "samples": _median(labelled["samples"]),
                    "mean": p["test"]["mean"][metric], "sd": p["test"]["sd"][metric], "interval": p["interval"],
                    "selected": p.get("selected"), "flags": [f["name"] for f in p["flags"]]})  # fmt: skip
    return out


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def needed_lines(block: dict[str, Any]) -> list[str]:
    """"labels needed to reach the target", per head and protocol."""
    needed = block.get("labels_needed")
    if not needed:
        return []
    lines = []
    for head, by_protocol in needed.items():
        for protocol, hit in by_protocol.items():
            if hit is None:
                text = "not reached within the budgets tried"
            else:
                text = (f"{budget_text(protocol, hit['value'])}: {hit['groups']:g} groups, {hit['samples']:g} "
                        "labelled samples (median over repeats)")
            lines.append(f"{head}, {TITLES[protocol]}: {text}")
    return lines


def curves(points: Sequence[tuple[str, dict[str, Any]]], protocol: str) -> dict[str, tuple[list, ...]]:
    """Series label -> (budgets, means, lows, highs) of the budgets that were drawn; ``points``: (label, point)."""
    series: dict[str, tuple[list, ...]] = {}
    for label, p in points:
        if p["protocol"] != protocol or p["status"] != "ok":
            continue
        x, mean, lo, hi = series.setdefault(label, ([], [], [], []))
        x.append(p["value"])
        mean.append(p["test"]["mean"][p["_metric"]])
        lo.append(p["interval"][0])
        hi.append(p["interval"][1])
    return series


def figures(labelled: Sequence[tuple[str, dict[str, Any]]], *, baseline: float | None, title: str) -> dict[str, str]:
    """One figure per protocol; ``labelled``: (series prefix, efficiency block) — a run's block, or each run of a
    sweep with its label."""
    points = [((f"{prefix}/" if prefix else "") + p["head"], {**p, "_metric": block["metric"]})
              for prefix, block in labelled for p in block["points"]]  # fmt: skip
    first = labelled[0][1]
    out = {}
    for protocol, name in TITLES.items():
        series = curves(points, protocol)
        if series:
            out[protocol] = label_curves(series, protocol=protocol, metric=first["metric"], baseline=baseline,
                                         target=first.get("target"), title=f"{title}: {name}")  # fmt: skip
    return out


def run_section(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """What the run report's label-efficiency partial shows; None without the protocol."""
    block = metrics.get("efficiency")
    if block is None:
        return None
    baseline = metrics["baseline"]["test"].get(block["metric"])
    return {"block": block, "rows": rows(block), "needed": needed_lines(block), "baseline": baseline,
            "figures": figures([("", block)], baseline=baseline, title=metrics["experiment"])}  # fmt: skip


def sweep_section(runs: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The sweep report's curves: one line per run (labelled by its sweep values) and head; ``runs``: (label,
    metrics) of the runs with the protocol. Runs of another primary metric than the first are named, not drawn."""
    runs = [(label, m) for label, m in runs if m.get("efficiency")]
    if not runs:
        return None
    metric = runs[0][1]["efficiency"]["metric"]
    drawn = [(label, m) for label, m in runs if m["efficiency"]["metric"] == metric]
    return {"metric": metric, "interval": runs[0][1]["efficiency"]["interval"],
            "others": [label for label, m in runs if m["efficiency"]["metric"] != metric],
            "figures": figures([(label, m["efficiency"]) for label, m in drawn], baseline=None,
                               title=f"test {metric}")}  # fmt: skip


def print_efficiency(console: Console, metrics: dict[str, Any]) -> None:
    block = metrics.get("efficiency")
    if block is None:
        return
    metric = block["metric"]
    table = new_table(console, f"label efficiency · test {metric} · interval: {int(metrics['ci_level'] * 100)}% "
                               "over repeats and test resamples")  # fmt: skip
    for col in ("head", "budget", "repeats", "groups", "samples", "mean ± sd", "interval", "baseline", "flags"):
        table.add_column(col)
    baseline = fmt(metrics["baseline"]["test"].get(metric))
    for r in rows(block):
        if r["status"] != "ok":
            table.add_row(r["head"], r["budget"], "—", "—", "—", "—", "—", baseline, r["status"], style="yellow")
            continue
        table.add_row(r["head"], r["budget"], str(r["repeats"]), f"{r['groups']:g}", f"{r['samples']:g}",
                      f"{fmt(r['mean'])} ± {fmt(r['sd'])}", f"[{fmt(r['interval'][0])}, {fmt(r['interval'][1])}]",
                      baseline, ", ".join(r["flags"]) or "ok", style="red" if r["flags"] else None)  # fmt: skip
    console.print(table)
    if block.get("target") is not None:
        console.print(f"labels needed to reach {metric} {block['target']:g} (interval's bound):")
        for line in needed_lines(block):
            console.print(f"  {line}", highlight=False)
