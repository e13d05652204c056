"""Timing helpers shared by the benchmarks: interleaved repeats (the machine is shared, so every side is timed in
turn, repeat after repeat), and min / median / max of each side. Headlines are ratios of medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(sides: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds of every side per repeat, the sides run in turn within each repeat; and each side's last result."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, results


def spread(values: list[float], unit: str = "s") -> str:
    return (f"min {min(values):.3f} {unit} / median {statistics.median(values):.3f} {unit} / "
            f"max {max(values):.3f} {unit} ({len(values)} repeats)")


def median(values: list[float]) -> float:
    return statistics.median(values)
