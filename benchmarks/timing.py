"""Timing helpers shared by the benchmarks. The machine is shared, so every side is timed in turn, repeat after
repeat, the order rotating from one repeat to the next (no side always runs first, on a cold or a warm machine);
each figure is printed as min / median / max of its repeats next to the load average, and headlines are medians:
a ratio of medians, or the median of per-repeat ratios for sides timed back to back (:func:`ratios`)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(sides: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds of every side per repeat, the sides run in turn within each repeat (repeat r starts with side
    r mod len(sides)); and each side's last result."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, Any] = {}
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            results[name] = sides[name]()
            times[name].append(time.perf_counter() - start)
    return times, results


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-repeat ratios of two sides timed in the same repeats."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def spread(values: list[float], unit: str = "s", digits: int = 3) -> str:
    low, mid, high = (f"{v:.{digits}f}{' ' + unit if unit else ''}" for v in
                      (min(values), statistics.median(values), max(values)))
    return f"min {low} / median {mid} / max {high} ({len(values)} repeats)"


def median(values: list[float]) -> float:
    return statistics.median(values)


def load_average() -> str:
    """The 1-minute load average, to print next to timings taken on a shared machine."""
    return f"load average {os.getloadavg()[0]:.2f}"
