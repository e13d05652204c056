"""How long a run takes, measured as it goes: each long step's progress and the estimate of what is left.

The lower layers report plain events — extraction ``(samples done, total)``, training ``(seed, EpochReport)``
after every epoch, evaluation ``(heads done, total)`` — and this clock turns them into progress lines (count,
rate, best validation score, time left) and into the run's estimate:

    left = samples to extract / measured samples per second
         + for each member group: fits to go x the mean duration of its finished fits
         + evaluation and report: in units of one drawn report figure (``finish_units``: the heads' evaluation,
           their figures drawn side by side), each unit as long as in the latest finished run under the same
           runs folder, else as long as this machine takes to draw one report figure now

A fit's duration runs from the end of the previous fit to its own last epoch, so it includes what happens
between fits (building the heads, predicting every split, saving checkpoints). While a group has no finished
fit, its fits are costed at their maximum epochs x its seconds per epoch (median of the intervals between its
epochs): early stopping cannot be known before one fit has run. So the run's estimate is announced once every
group has finished a fit (``probes/frozen.py`` trains the first seed of every group first for this).
metrics.json's ``timing`` records the seconds of each phase and the estimate: when it was made, and how long
the rest of the run then took. Every time is read from the display's clock.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fmprobe.forks import cores
from fmprobe.report.progress import Progress, Step, duration
from fmprobe.train.core import EpochReport

HOUR = 3600.0
# By task type, in units of one drawn report figure (reference_figure_seconds): a head's evaluation (bootstrap,
# baselines, thresholds, flags) and the figures its report draws (per-class bars, confusion, calibration or
# predictions, training curves). Evaluation measured on the demo, one figure 0.36 s: multilabel 0.51 s a head,
# regression 0.07 s; binary and multiclass are costed as multilabel.
EVALUATION_UNITS = {"binary": 1.4, "multilabel": 1.4, "multiclass": 1.4, "regression": 0.2}
FIGURES = {"binary": 3, "multilabel": 3, "multiclass": 4, "regression": 2}


@dataclass
class GroupPlan:
    """Members that train together (one HeadBank, a decoder, an end-to-end model) and how often they will."""

    names: tuple[str, ...]  # the members' names, as the EpochReport lists them
    fits: int  # seeds x folds this process trains
    epochs: int  # the most one fit trains
    metric: str  # the validation metric it is selected on ("" when unknown)
    lower_is_better: bool
    continued: bool = False  # a second stage (staged adaptation): its epochs are numbered after the first's
    epoch_seconds: list[float] = field(default_factory=list)  # intervals between consecutive epochs of a fit
    finished: list[tuple[int, float]] = field(default_factory=list)  # (epochs, seconds) of each finished fit

    @property
    def label(self) -> str:
        heads = list(dict.fromkeys(n.split("/")[0] for n in self.names))
        members = f" ({len(self.names)} members)" if len(self.names) > len(heads) else ""
        return ", ".join(heads) + members + (" (stage 2)" if self.continued else "")

    def expected_epochs(self) -> float:
        return statistics.fmean(e for e, _ in self.finished) if self.finished else float(self.epochs)

    def seconds_left(self, running: tuple[int, float] | None) -> float | None:
        """Seconds until the group's fits are done; ``running``: (epochs done, seconds spent) of its running fit.
        None while it cannot be costed (no finished fit and fewer than two epochs seen)."""
        waiting = self.fits - len(self.finished) - (running is not None)
        if self.finished:
            per_fit = statistics.fmean(s for _, s in self.finished)
            return waiting * per_fit + (max(per_fit - running[1], 0.0) if running is not None else 0.0)
        if not self.epoch_seconds:
            return None
        per_epoch = statistics.median(self.epoch_seconds)
        epochs = waiting * self.epochs + (self.epochs - running[0] if running is not None else 0)
        return epochs * per_epoch


@dataclass
class Finish:
    """The expected seconds of a run's evaluation and report, and what that expectation rests on."""

    seconds: float
    basis: str


@dataclass
class Estimate:
    """The run's estimate when it was announced, and (at the end) how long the rest took."""

    seconds_left: float
    made_at: float  # seconds since the run started
    finish_basis: str
    actual_left: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"seconds_left": round(self.seconds_left, 2), "made_at_seconds": round(self.made_at, 2),
               "basis": "the duration of every member group's first fit, the extraction rate; evaluation and "
                        f"report: {self.finish_basis}"}  # fmt: skip
        if self.actual_left is not None:
            out["actual_seconds_left"] = round(self.actual_left, 2)
            out["ratio"] = round(self.seconds_left / max(self.actual_left, 1e-9), 3)
        return out


@dataclass
class _Fit:
    group: GroupPlan
    key: tuple[tuple[str, ...], int]  # (member names, seed)
    started: float  # clock time the fit's span began (the previous fit's end)
    first_epoch: int
    last_epoch: int
    last_time: float

    @property
    def epochs(self) -> int:
        return self.last_epoch - self.first_epoch + 1


class RunClock:
    """The progress and time estimate of one run (``display`` draws; nothing here draws by itself)."""

    def __init__(self, display: Progress, name: str, *, finish: Finish | None = None):
        """``finish``: the expected evaluation and report time (see ``finish_estimate``)."""
        self.display, self.name = display, name
        self.finish_time = finish if finish is not None else Finish(0.0, "not counted")
        self.clock = display.clock
        self.started = self.clock()
        self.phases: dict[str, float] = {}  # seconds spent in each phase of the run, in order
        self._phase: tuple[str, float] | None = None
        self.groups: list[GroupPlan] = []
        self.extract_left = 0.0
        self.estimate: Estimate | None = None
        self.warned = False
        self._fit: _Fit | None = None
        self._last_end = self.started  # when the last fit ended (a new fit's span starts there)
        self._train: Step | None = None

    def elapsed(self) -> float:
        return self.clock() - self.started

    def phase(self, name: str) -> None:
        """The run enters phase ``name`` (the previous one ends): where the time went, in metrics.json."""
        now = self.clock()
        if self._phase is not None:
            self.phases[self._phase[0]] = self.phases.get(self._phase[0], 0.0) + now - self._phase[1]
        self._phase = (name, now)

    # ---- extraction ---------------------------------------------------------------------------------------

    def extraction(self, label: str) -> Callable[[int, int], None]:
        """``tick(done, total)`` after every batch; the rate leaves out the first batch (model warm-up)."""
        step: Step | None = None
        first: tuple[float, int] | None = None

        def tick(done: int, total: int) -> None:
            nonlocal step, first
            now = self.clock()
            if step is None:
                step = self.display.step(f"extract {label}", "samples", total)
            if first is None:
                first = (now, done)
            rate = (done - first[1]) / (now - first[0]) if now > first[0] and done > first[1] else None
            self.extract_left = (total - done) / rate if rate else 0.0
            step.update(done, total, detail=f"{rate:.1f} samples/s" if rate else "", eta=self.extract_left or None)
            if done >= total:  # the step ends; another extraction (align's second side) starts a new one
                seconds = now - step.started
                step.finish(f"{done / seconds:.1f} samples/s" if seconds > 0 else "")
                step = first = None

        return tick

    # ---- training -----------------------------------------------------------------------------------------

    def plan_training(self, groups: list[GroupPlan]) -> None:
        self.groups = groups
        self._last_end = self.clock()
        total = sum(g.fits * g.epochs for g in groups)
        self._train = self.display.step(f"train {self.name}", "epochs", total) if groups else None

    def on_epoch(self, seed: int, report: EpochReport) -> None:
        """After every epoch of every fit (``train_heads``, ``adapt_heads`` and the segmentation decoder)."""
        now = self.clock()
        key = (tuple(report.names), seed)
        fit = self._fit
        if fit is None or fit.key != key or report.epoch <= fit.last_epoch:  # a new fit
            self._finish_fit()
            group = self._find(key[0], continued=report.epoch > 1)
            fit = self._fit = _Fit(group, key, self._last_end, report.epoch, report.epoch, now)
        else:
            fit.group.epoch_seconds.append(now - fit.last_time)
            fit.last_epoch, fit.last_time = report.epoch, now
        self._last_end = now
        self._announce()
        self._show(seed, report)
        self._check_hours()

    def _finish_fit(self) -> None:
        fit, self._fit = self._fit, None
        if fit is not None:
            fit.group.finished.append((fit.epochs, fit.last_time - fit.started))

    def _find(self, names: tuple[str, ...], continued: bool) -> GroupPlan:
        for g in self.groups:
            if g.names == names and g.continued == continued:
                return g
        group = GroupPlan(names, 1, 1, "", False, continued)  # not planned (a caller outside the run): still shown
        self.groups.append(group)
        return group

    def training_left(self, *, known_only: bool = False) -> float | None:
        """Seconds of training still to do; None while a group cannot be costed yet (``known_only``: the costed
        groups' share)."""
        now = self.clock()
        fit = self._fit
        parts = [g.seconds_left((fit.epochs, now - fit.started) if fit is not None and fit.group is g else None)
                 for g in self.groups]  # fmt: skip
        if any(p is None for p in parts) and not known_only:
            return None
        return float(sum(p for p in parts if p is not None))

    def _show(self, seed: int, report: EpochReport) -> None:
        fit = self._fit
        if self._train is None or fit is None:
            return
        done = sum(e for g in self.groups for e, _ in g.finished) + fit.epochs
        total = done + sum((g.fits - len(g.finished) - (g is fit.group)) * g.expected_epochs() for g in self.groups)
        total += max(fit.group.expected_epochs() - fit.epochs, 0)
        best = report.best_score[~np.isnan(report.best_score)]
        score = ""
        if best.size and fit.group.metric:
            value = best.min() if fit.group.lower_is_better else best.max()
            score = f" · best val {fit.group.metric} {value:.3f}"
        detail = (f"{fit.group.label} seed {seed} epoch {report.epoch}/{report.epochs}{score} · "
                  f"{report.seconds:.2f} s/epoch")  # fmt: skip
        self._train.update(done, round(total), detail=detail, eta=self.training_left())

    def end_training(self) -> None:
        self._finish_fit()
        if self._train is not None:
            epochs = sum(e for g in self.groups for e, _ in g.finished)
            self._train.finish(f"{sum(len(g.finished) for g in self.groups)} fits", done=epochs)
            self._train = None

    # ---- the run's estimate -------------------------------------------------------------------------------

    def seconds_left(self) -> float | None:
        training = self.training_left()
        return None if training is None else self.extract_left + training + self.finish_time.seconds

    def _announce(self) -> None:
        """Once every planned group has finished one fit: the run's estimate, said once and recorded."""
        if self.estimate is not None or not all(g.finished for g in self.groups):
            return
        if all(len(g.finished) >= g.fits for g in self.groups):
            return  # every fit is done (one seed): nothing left worth estimating
        left = self.seconds_left()
        if left is None:
            return
        self.estimate = Estimate(left, self.elapsed(), self.finish_time.basis)
        finish = (datetime.now() + timedelta(seconds=left)).strftime("%H:%M")
        self.display.line(f"estimate {self.name}: about {duration(left)} left, finishing around {finish} "
                          f"({duration(self.elapsed())} so far)")  # fmt: skip

    def _check_hours(self) -> None:
        """Warn once when the training still to do may take hours, naming the settings that cut it."""
        left = self.training_left(known_only=True)
        if self.warned or left is None or left < HOUR:
            return
        self.warned = True
        slow = max(self.groups, key=lambda g: statistics.median(g.epoch_seconds) if g.epoch_seconds else 0.0)
        per_epoch = statistics.median(slow.epoch_seconds) if slow.epoch_seconds else float("nan")
        self.display.line(
            f"warning: {self.name} may take {duration(left)} more to train on this machine ({slow.label}: "
            f"{per_epoch:.1f} s per epoch, up to {slow.epochs} epochs x {slow.fits} fits). To cut it: fewer "
            "train.seeds while exploring, train.early_stopping (patience) or fewer train.epochs, fewer train.grid "
            "members, and for attentive heads a smaller features.token_grid")

    def finish(self) -> dict[str, Any]:
        """At the end of the run, for metrics.json: seconds per phase, and the estimate with what the rest of the
        run actually took (when one was made)."""
        self.phase("")
        out: dict[str, Any] = {"phases": {k: round(v, 2) for k, v in self.phases.items() if k}}
        if self.estimate is not None:
            self.estimate.actual_left = self.elapsed() - self.estimate.made_at
            out["estimate"] = self.estimate.to_dict()
        return out


def finish_units(task_type: str, heads: int) -> float:
    """A run's evaluation and report in figure units: every head evaluated in turn, their figures drawn side by
    side, a head per core (``report.html`` through ``forks.fork_map``)."""
    return heads * EVALUATION_UNITS[task_type] + -(-heads // min(heads, cores())) * FIGURES[task_type]


def finish_estimate(runs_dir: Path, task_type: str, heads: int, clock: Callable[[], float]) -> Finish:
    """Seconds the evaluation and the report will take: :func:`finish_units` of this run, each unit as long as in
    the latest finished run under ``runs_dir`` that recorded its times (its own units: its task and heads); else
    as long as this machine takes to draw one report figure now (timed by ``clock``, the run's clock: a load that
    makes the run slow makes the figure slow too)."""
    units = finish_units(task_type, heads)
    runs = sorted(runs_dir.glob("*/*/metrics.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in runs:
        try:
            m = json.loads(path.read_text())
            phases = m["timing"]["phases"]
            unit = (phases["evaluate"] + phases["report"]) / finish_units(m["task"]["type"], len(m["heads"]))
            return Finish(units * unit, f"{units:.3g} figure units, each {unit:.2f} s as in {path.parent} "
                                        f"({m['task']['type']}, {len(m['heads'])} heads)")  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue  # an older run (no timing) or one being written
    from fmprobe.report.plots import reference_figure_seconds  # matplotlib: not for `fmprobe extract`

    figure = reference_figure_seconds(clock)
    return Finish(units * figure, f"{units:.3g} figure units, one report figure drawn in {figure:.2f} s before "
                                  "the run")  # fmt: skip


def extraction_progress(label: str, display: Progress | None = None) -> Callable[[int, int], None]:
    """Progress of an extraction on its own (``fmprobe extract``)."""
    return RunClock(display if display is not None else Progress(), label).extraction(label)
