"""`fmprobe gate GATES.yaml`: go / no-go criteria applied to every candidate (run x head), decided with the CI.

A gates file::

    experiment: chest-xray        # optional: only this experiment's runs are candidates
    reject_flags: error           # error (any error-severity sanity flag rejects) | none | [flag names]
    criteria:
      - name: discrimination
        metric: auroc             # a metric of metrics.json, ece, seg/miou (segmentation decoder), or
                                  # trainable_params, total_params, wall_seconds
        split: test               # test (decided with the CI) | val (mean over seeds, no CI)
        target: 0.90              # optional
        acceptable: 0.80
        fail: 0.70                # optional
        must_pass: true           # false: should-pass, it only counts in the score
        weight: 2

Level of a criterion (for a higher-is-better metric; mirrored when lower is better). ``lo, hi`` is the
test CI; where there is none (val, ece, trainable_params, total_params, wall_seconds) both are the point:

- ``target``        lo >= target                     (confidently at target)
- ``pass``          lo >= acceptable                 (confidently acceptable)
- ``fail``          hi < acceptable, or point < fail (confidently not acceptable, or clearly poor)
- ``inconclusive``  otherwise: the CI straddles the acceptable level

A candidate flagged ``few_groups`` has a test CI over too few groups (patients, videos) to be trusted: every
test-CI level of it is ``inconclusive`` (what the CI alone would say is kept in ``Level.note``), so it is never
accepted on that CI.

Verdict of a candidate: ``reject`` if a must-pass criterion fails or a rejecting flag is raised;
``inconclusive`` if a must-pass criterion is inconclusive (more test data or seeds would decide it);
``accept`` otherwise. Score: the weighted mean over all criteria of target 1, pass 2/3, inconclusive 1/3,
fail 0. Recommendation: the accepted candidate with the highest score. Accepted candidates sharing the highest
score whose test CIs of the deciding criterion (the first one) overlap are a tie, reported as one: no candidate
is recommended over the others (``fmprobe compare`` or more data can separate them); if none is accepted, say why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError, model_validator

from fmprobe.config import Strict, _format_errors, read_yaml
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.experiments.index import candidates as load_candidates
from fmprobe.experiments.index import metric_table
from fmprobe.experiments.leaderboard import RUN_QUANTITIES, better_high

POINTS = {"target": 1.0, "pass": 2 / 3, "inconclusive": 1 / 3, "fail": 0.0}
FEW_GROUPS = "few_groups"  # the flag saying a test CI rests on too few groups to be trusted


class Criterion(Strict):
    name: str | None = None  # defaults to the metric
    metric: str
    split: Literal["test", "val"] = "test"
    target: float | None = None
    acceptable: float
    fail: float | None = None
    must_pass: bool = True
    weight: float = Field(default=1.0, ge=0)  # 0: judged and shown, not scored
    direction: Literal["auto", "higher", "lower"] = "auto"
    # extraction points: the criterion passes only where the point also beats each control (its paired difference
    # ``<metric>-vs-<control>``) by ``margin``, decided with the difference's CI
    controls: list[str] = Field(default_factory=list)
    margin: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "Criterion":
        if self.name is None:
            self.name = self.metric
        high = self.higher
        sign = 1 if high else -1
        word = "above" if high else "below"
        if self.target is not None and sign * (self.target - self.acceptable) < 0:
            raise ValueError(f"{self.name}: target {self.target} must be {word} acceptable {self.acceptable} "
                             f"({self.metric} is {'higher' if high else 'lower'}-is-better)")
        if self.fail is not None and sign * (self.acceptable - self.fail) < 0:
            raise ValueError(f"{self.name}: acceptable {self.acceptable} must be {word} fail {self.fail} "
                             f"({self.metric} is {'higher' if high else 'lower'}-is-better)")
        if self.margin and not self.controls:
            raise ValueError(f"{self.name}: margin {self.margin} is what the point must beat its controls by; "
                             "name the controls (e.g. controls: [pixel, random-weights])")  # fmt: skip
        return self

    @property
    def higher(self) -> bool:
        return better_high(self.metric) if self.direction == "auto" else self.direction == "higher"


class OutcomeRule(Strict):
    """The study's outcome table over several models (each at its best point), read from one criterion: one model
    passes every must-pass -> proceed; several -> the ``select`` best by weighted score; none, but one passes
    ``criterion`` -> investigate; none beats ``hybrid_below`` on it -> pivot to a hybrid; none beats
    ``major_pivot_below`` -> major pivot (see experiments.decision)."""

    criterion: str  # the criterion the pivots read (the study: spatial IoU)
    hybrid_below: float
    major_pivot_below: float
    select: int = Field(default=2, ge=1)


class GatesSpec(Strict):
    experiment: str | None = None
    reject_flags: Literal["error", "none"] | list[str] = "error"
    criteria: list[Criterion] = Field(min_length=1)
    outcome: OutcomeRule | None = None

    @model_validator(mode="after")
    def _check(self) -> "GatesSpec":
        names = [c.name for c in self.criteria]
        if len(set(names)) != len(names):
            raise ValueError(f"criteria need distinct names, got {names}; set 'name' on each")
        if self.outcome is not None and self.outcome.criterion not in names:
            raise ValueError(f"outcome.criterion '{self.outcome.criterion}' is not a criterion ({', '.join(names)})")
        if not sum(c.weight for c in self.criteria) > 0:
            raise ValueError("every criterion has weight 0; give at least one a weight > 0 for the score")
        return self


@dataclass
class Level:
    level: str  # target | pass | inconclusive | fail
    point: float
    lo: float
    hi: float
    note: str = ""  # why the level is not what the interval alone says (few_groups)
    beats: dict[str, dict[str, Any]] = field(default_factory=dict)  # control -> level, point, lo, hi of the difference


@dataclass
class Verdict:
    run_dir: str
    experiment: str
    run_id: str
    head: str
    verdict: str  # accept | inconclusive | reject
    score: float
    levels: dict[str, Level]
    reasons: list[str]
    tiebreak: float = float("nan")
    weighted: dict[str, float] = field(default_factory=dict)  # score, lo, hi: see weighted_score

    @property
    def label(self) -> str:
        return "/".join(part for part in (self.experiment, self.run_id, self.head) if part)


@dataclass
class GateReport:
    spec: GatesSpec
    verdicts: list[Verdict]
    recommendation: str
    chosen: Verdict | None = None
    counts: dict[str, int] = field(default_factory=dict)
    tied: list[Verdict] = field(default_factory=list)  # accepted candidates no criterion separates

    def to_dict(self) -> dict[str, Any]:
        return {
            "recommendation": self.recommendation,
            "chosen": self.chosen.label if self.chosen else None,
            "tied": [v.label for v in self.tied],
            "counts": self.counts,
            "criteria": [c.model_dump() for c in self.spec.criteria],
            "verdicts": [{"candidate": v.label, "run_dir": v.run_dir, "verdict": v.verdict, "score": v.score,
                          "weighted": v.weighted, "levels": {k: vars(lv) for k, lv in v.levels.items()},
                          "reasons": v.reasons}
                         for v in self.verdicts],
        }


def load_gates(path: str | Path) -> GatesSpec:
    path = Path(path)
    data = read_yaml(path, "gates") or {}
    try:
        return GatesSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, f"gates '{path}'")) from None


def criterion_level(c: Criterion, point: float, lo: float, hi: float) -> Level:
    """The level of one criterion from the point estimate and its interval (see the module docstring)."""
    if any(v != v for v in (lo, hi)):  # no CI could be computed: the point decides
        lo = hi = point
    sign = 1.0 if c.higher else -1.0
    # flipped to higher-is-better: the pessimistic end is lo for higher, hi for lower
    worst, best, p = (lo, hi, point) if c.higher else (-hi, -lo, -point)
    if point != point:
        level = "fail"
    elif c.target is not None and worst >= sign * c.target:
        level = "target"
    elif worst >= sign * c.acceptable:
        level = "pass"
    elif best < sign * c.acceptable or (c.fail is not None and p < sign * c.fail):
        level = "fail"
    else:
        level = "inconclusive"
    return Level(level, point, lo, hi)


RANK = {"fail": 0, "inconclusive": 1, "pass": 2, "target": 3}


def utility(c: Criterion, value: float) -> float:
    """A criterion's value on [0, 1]: 0 at ``fail``, 1 at ``target``, linear between, clipped (mirrored when lower is
    better); without them ``acceptable`` stands in, so a criterion with neither is a step at ``acceptable``."""
    if value != value:
        return 0.0
    low = c.fail if c.fail is not None else c.acceptable
    high = c.target if c.target is not None else c.acceptable
    sign = 1.0 if c.higher else -1.0
    if low == high:
        return float(sign * (value - high) >= 0)
    return float(np.clip((value - low) / (high - low), 0.0, 1.0))


def weighted_score(spec: GatesSpec, levels: dict[str, Level]) -> dict[str, float]:
    """The weighted mean of the criteria's utilities (the study's weighted score), with the range it takes when every
    criterion moves within its own CI: ``lo`` from each pessimistic end, ``hi`` from each optimistic end. That range
    covers the score whenever every criterion's interval covers its value (so at least 1 - sum of their alphas)."""
    total = sum(c.weight for c in spec.criteria)
    ends = {"score": [], "lo": [], "hi": []}
    for c in spec.criteria:
        lv = levels[c.name]
        worst, best = (lv.lo, lv.hi) if c.higher else (lv.hi, lv.lo)
        for key, value in (("score", lv.point), ("lo", worst), ("hi", best)):
            ends[key].append(c.weight * utility(c, value))
    return {key: float(sum(v) / total) for key, v in ends.items()}


def control_level(c: Criterion, diff: float, lo: float, hi: float) -> Level:
    """Does the point beat a control by ``c.margin``? ``pass`` when the difference's pessimistic CI end clears the
    margin, ``fail`` when its optimistic end does not, ``inconclusive`` otherwise (no CI: the point decides)."""
    if any(v != v for v in (lo, hi)):
        lo = hi = diff
    worst, best = (lo, hi) if c.higher else (-hi, -lo)  # flipped to higher-is-better
    level = "fail" if diff != diff or best <= c.margin else "pass" if worst > c.margin else "inconclusive"
    return Level(level, diff, lo, hi)


def _rejecting_flags(spec: GatesSpec, flags: list[str], error_flags: int) -> list[str]:
    if spec.reject_flags == "none":
        return []
    if spec.reject_flags == "error":
        return [f"{error_flags} error-severity sanity flag(s): {', '.join(flags)}"] if error_flags else []
    hit = [f for f in flags if f in spec.reject_flags]
    return [f"flag(s) {', '.join(hit)}"] if hit else []


def evaluate_gates(spec: GatesSpec, runs_dir: str | Path, *, run_dirs: Iterable[str | Path] | None = None) -> GateReport:
    """A verdict for every (run, head) under ``runs_dir`` (or among ``run_dirs``) and one recommendation."""
    with_controls = [c.name for c in spec.criteria if c.controls]
    if with_controls:
        raise ConfigError(f"criteria {with_controls} name controls, which are measured per extraction point; "
                          "use them with gate-points (fmprobe spatial --controls ...)")  # fmt: skip
    cands = load_candidates(runs_dir, experiment=spec.experiment, run_dirs=run_dirs)
    if cands.empty:
        raise FmprobeError(f"no candidate to gate under {runs_dir}")
    return judge(spec, cands, metric_table(runs_dir, cands["run_dir"].unique()))


def judge(spec: GatesSpec, cands: pd.DataFrame, values: pd.DataFrame) -> GateReport:
    """Verdicts and the recommendation for candidates given as tables (runs, or any other source of metrics).

    ``cands``: one row per candidate with ``run_dir``, ``experiment``, ``run_id``, ``head``, ``flags`` (list of
    names), ``error_flags`` and the ``RUN_QUANTITIES``; ``values``: one row per (run_dir, head, split, metric)
    with ``mean``, ``ci_lo``, ``ci_hi`` (None/NaN where there is no CI).
    """
    values = values.set_index(["run_dir", "head", "split", "metric"])
    verdicts = []
    for c in cands.itertuples(index=False):
        levels: dict[str, Level] = {}
        control_reasons = []
        for crit in spec.criteria:
            point, lo, hi = _value(crit, c, values)
            levels[crit.name] = criterion_level(crit, point, lo, hi)
            for control in crit.controls:
                diff = _value(crit.model_copy(update={"metric": f"{crit.metric}-vs-{control}"}), c, values)
                beat = control_level(crit, *diff)
                levels[crit.name].beats[control] = {k: getattr(beat, k) for k in ('level', 'point', 'lo', 'hi')}
                if RANK[beat.level] < RANK[levels[crit.name].level]:
                    levels[crit.name].level = beat.level
                if beat.level != "pass":
                    control_reasons.append(f"'{crit.name}' {'does not beat' if beat.level == 'fail' else 'not surely above'}"
                                           f" {control} by {crit.margin:g} (difference {diff[0]:.3f} "
                                           f"[{diff[1]:.3f}, {diff[2]:.3f}])")  # fmt: skip
            if FEW_GROUPS in c.flags and crit.split == "test" and crit.metric not in RUN_QUANTITIES:
                level = levels[crit.name]
                level.note = f"{level.level} by a CI over too few test groups ({FEW_GROUPS}): not trusted"
                level.level = "inconclusive"
        reasons = _rejecting_flags(spec, c.flags, c.error_flags) + control_reasons
        must = [crit for crit in spec.criteria if crit.must_pass]
        failed = [crit.name for crit in must if levels[crit.name].level == "fail"]
        open_ = [crit.name for crit in must if levels[crit.name].level == "inconclusive"]
        reasons += [f"must-pass '{n}' failed" for n in failed]
        reasons += [f"must-pass '{n}' inconclusive ({levels[n].note or 'CI straddles acceptable'})" for n in open_]
        reasons += [f"should-pass '{crit.name}' {levels[crit.name].level}" for crit in spec.criteria
                    if not crit.must_pass and levels[crit.name].level in ("fail", "inconclusive")]
        verdict = "reject" if failed or _rejecting_flags(spec, c.flags, c.error_flags) else (
            "inconclusive" if open_ else "accept")
        total = sum(crit.weight for crit in spec.criteria)
        score = sum(crit.weight * POINTS[levels[crit.name].level] for crit in spec.criteria) / total
        first = spec.criteria[0]
        tie = _lookup(values, (c.run_dir, c.head, "val", first.metric))
        verdicts.append(Verdict(c.run_dir, c.experiment, c.run_id, c.head, verdict, score, levels, reasons,
                                tiebreak=(tie if first.higher else -tie) if tie == tie else -np.inf,
                                weighted=weighted_score(spec, levels)))  # fmt: skip
    order = {"accept": 0, "inconclusive": 1, "reject": 2}
    verdicts.sort(key=lambda v: (order[v.verdict], -v.score, -v.tiebreak, v.label))
    counts = {k: sum(v.verdict == k for v in verdicts) for k in order}
    recommendation, chosen, tied = _recommend(verdicts, counts, spec.criteria[0])
    return GateReport(spec, verdicts, recommendation, chosen, counts=counts, tied=tied)


def _lookup(values: pd.DataFrame, key: tuple) -> float:
    if key not in values.index:
        return float("nan")
    return float(values.loc[key, "mean"])


def _value(crit: Criterion, cand: Any, values: pd.DataFrame) -> tuple[float, float, float]:
    if crit.metric in RUN_QUANTITIES:
        value = getattr(cand, crit.metric)
        if pd.isna(value):
            raise FmprobeError(f"criterion '{crit.name}': {cand.experiment}/{cand.run_id} head '{cand.head}' has no "
                               f"{crit.metric} recorded (its run was written by an fmprobe that did not record it); "
                               "rerun it, or restrict the candidates with 'experiment:'")  # fmt: skip
        v = float(value)
        return v, v, v
    key = (cand.run_dir, cand.head, crit.split, crit.metric)
    if key not in values.index:
        have = sorted({k[3] for k in values.index if k[0] == cand.run_dir and k[2] == crit.split})
        raise FmprobeError(
            f"criterion '{crit.name}': {cand.experiment}/{cand.run_id} head '{cand.head}' has no {crit.split} "
            f"metric '{crit.metric}' (it has: {', '.join(have)}, {', '.join(RUN_QUANTITIES)}); fix the metric "
            "name or restrict the candidates with 'experiment:'"
        )
    row = values.loc[key]
    lo = row["ci_lo"] if row["ci_lo"] is not None else np.nan
    hi = row["ci_hi"] if row["ci_hi"] is not None else np.nan
    return float(row["mean"]), float(lo), float(hi)


def _recommend(verdicts: list[Verdict], counts: dict[str, int], deciding: Criterion
               ) -> tuple[str, Verdict | None, list[Verdict]]:  # fmt: skip
    accepted = [v for v in verdicts if v.verdict == "accept"]
    tally = f"{counts['accept']} accepted, {counts['inconclusive']} inconclusive, {counts['reject']} rejected"
    if accepted:
        best = accepted[0]
        tied = [v for v in accepted if v.score == best.score and _overlap(v.levels[deciding.name],
                                                                           best.levels[deciding.name])]
        if len(tied) > 1:
            shown = ", ".join(f"{v.label} [{v.levels[deciding.name].lo:.3g}, {v.levels[deciding.name].hi:.3g}]"
                              for v in tied)
            return (f"tie: {len(tied)} accepted candidates share the best score ({best.score:.2f}) and their CIs of "
                    f"'{deciding.name}' ({deciding.metric}) overlap: {shown}; none is shown better than the others — "
                    f"compare them (fmprobe compare) or add test data ({tally})"), None, tied
        return f"adopt {best.label} (score {best.score:.2f}; {tally})", best, []
    if counts["inconclusive"]:
        best = next(v for v in verdicts if v.verdict == "inconclusive")
        return (f"no decision yet: no candidate passes every must-pass criterion with its CI; "
                f"{best.label} is closest (score {best.score:.2f}) — more test data or seeds would narrow the CI "
                f"({tally})"), None, []
    return f"reject all: every candidate fails a must-pass criterion or raises a rejecting flag ({tally})", None, []


def _overlap(a: Level, b: Level) -> bool:
    """Whether two intervals share a value (without an interval a candidate is its point)."""
    return max(a.lo, b.lo) <= min(a.hi, b.hi)


def gate_command(gates: str | Path, runs_dir: str | Path, *, run_dirs: Iterable[str | Path] | None = None) -> GateReport:
    return evaluate_gates(load_gates(gates), runs_dir, run_dirs=run_dirs)


def print_gates(console, report: GateReport) -> None:  # noqa: ANN001 (rich Console)
    from fmprobe.report.terminal import fmt, new_table

    table = new_table(console, "gates · levels decided with the CI (lo/hi)")
    table.add_column("candidate")
    table.add_column("verdict")
    table.add_column("score")
    for crit in report.spec.criteria:
        table.add_column(f"{crit.name}{'' if crit.must_pass else ' (should)'}")
    table.add_column("reasons")
    colours = {"accept": "green", "inconclusive": "yellow", "reject": "red"}
    for v in report.verdicts:
        cells = [f"{lv.level}{'*' if lv.note else ''} {fmt(lv.point)} [{fmt(lv.lo)}, {fmt(lv.hi)}]"
                 for lv in v.levels.values()]
        table.add_row(v.label, f"[{colours[v.verdict]}]{v.verdict}[/]", f"{v.score:.2f}", *cells,
                      "; ".join(v.reasons) or "—")
    console.print(table)
    if any(lv.note for v in report.verdicts for lv in v.levels.values()):
        console.print(f"* not what the CI alone says: that CI rests on too few test groups ({FEW_GROUPS})")
    console.print(f"[bold]recommendation:[/] {report.recommendation}")
