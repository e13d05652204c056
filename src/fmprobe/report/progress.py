"""What a long command shows while it works: one line per step (its count, rate, best score so far, time left)
and the notes the orchestration adds (estimates, warnings).

On a terminal the steps are rich bars redrawn in place. Anywhere else — stdout redirected to a log file, a CI
job — they are plain, unwrapped lines without colour or spinners: a step prints when it starts, at most once
every ``interval`` seconds while it runs, and once when it ends, so a log stays short and grep-able. This module
only draws: what a step counts and how long is left are computed by its caller (``experiments/clock.py``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress as Bars, TaskID, TextColumn

LOG_WIDTH = 100_000  # not a terminal: never wrap (one printed line is one line of the log)


def stdout_console(file: TextIO | None = None) -> Console:
    """A console for ``file`` (default stdout): the terminal's width on a terminal; anywhere else no wrapping,
    no colour, no highlighting."""
    stream = file if file is not None else sys.stdout
    if stream.isatty():
        return Console(file=file, highlight=False)
    return Console(file=file, width=LOG_WIDTH, soft_wrap=True, no_color=True, highlight=False)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 04 min``: what a person reads at a glance."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Step:
    """One step's line: ``label: done/total unit · detail · time left``."""

    def __init__(self, display: Progress, label: str, unit: str, total: float | None):
        self.display, self.label, self.unit = display, label, unit
        self.done, self.total, self.detail, self.eta = 0.0, total, "", None
        self.started = display.clock()
        self._printed: float | None = None
        self._task: TaskID | None = None
        if display.bars is not None:
            if not display.bars.tasks:
                display.bars.start()
            self._task = display.bars.add_task(label, total=total, counts="", detail="")

    def update(self, done: float, total: float | None = None, *, detail: str = "", eta: float | None = None) -> None:
        self.done, self.detail, self.eta = done, detail, eta
        if total is not None:
            self.total = total
        if self.display.bars is not None and self._task is not None:
            self.display.bars.update(self._task, completed=done, total=self.total, counts=self._counts(),
                                     detail=self._tail())  # fmt: skip
        elif self.display.enabled:
            now = self.display.clock()
            if self._printed is None or now - self._printed >= self.display.interval:
                self._printed = now
                self.display.line(f"{self.label}: {self._counts()}{self._tail()}")

    def finish(self, detail: str = "", *, done: float | None = None) -> None:
        """The step's last state, always shown: its count, its own summary and how long it took. ``done``: the
        final count, which becomes the total (a total that was an estimate, such as epochs under early stopping)."""
        if done is not None:
            self.done = self.total = done
        took = duration(self.display.clock() - self.started)
        summary = f"{self.label}: {self._counts()} in {took}" + (f" · {detail}" if detail else "")
        if self.display.bars is not None and self._task is not None:
            self.display.bars.remove_task(self._task)
            self._task = None
            if not self.display.bars.tasks:
                self.display.bars.stop()
        self.display.line(summary)

    def _counts(self) -> str:
        total = "" if self.total is None else f"/{self.total:g}"
        return f"{self.done:g}{total} {self.unit}"

    def _tail(self) -> str:
        parts = [self.detail] if self.detail else []
        if self.eta is not None:
            parts.append(f"{duration(self.eta)} left")
        return "".join(f" · {p}" for p in parts)


class Progress:
    """The display of one command. ``enabled=False`` draws nothing (library use, tests, other processes)."""

    def __init__(self, console: Console | None = None, *, enabled: bool = True, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.console = console if console is not None else stdout_console()
        self.enabled, self.interval, self.clock = enabled, interval, clock
        self.bars: Bars | None = None
        if enabled and self.console.is_terminal:
            self.bars = Bars(TextColumn("{task.description}"), BarColumn(bar_width=24),
                             TextColumn("{task.fields[counts]}"), TextColumn("{task.fields[detail]}"),
                             console=self.console, transient=True)  # fmt: skip

    @classmethod
    def off(cls) -> Progress:
        return cls(enabled=False)

    def line(self, text: str) -> None:
        """A plain line (above the bars on a terminal)."""
        if self.enabled:
            self.console.print(text, markup=False, highlight=False)

    def step(self, label: str, unit: str, total: float | None = None) -> Step:
        return Step(self, label, unit, total)

    def counter(self, label: str, unit: str) -> Callable[[int, int], None]:
        """``tick(done, total)`` for a step that only counts (diagnostics: samples, heads, extraction points);
        the step ends when ``done`` reaches ``total``."""
        step: Step | None = None

        def tick(done: int, total: int) -> None:
            nonlocal step
            if step is None:
                step = self.step(label, unit, total)
            step.update(done, total)
            if done >= total:
                step.finish()
                step = None

        return tick
