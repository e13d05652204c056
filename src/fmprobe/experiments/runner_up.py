"""Is the head selected on validation really better on test than the runner-up, or are they tied?

A paired bootstrap of the test difference (selected - runner-up) of their scores as every table shows them (the
mean over members of each member's metric, ``evaluate.summary.SCORE_DEFINITION``; as ``fmprobe compare``) on the
same resamples of the test samples (groups, when the run has groups), so sample difficulty cancels. The runner-up is
the head with the second-best validation mean; nothing here is chosen on test.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fmprobe.config import Experiment
from fmprobe.evaluate.bootstrap import MemberMean
from fmprobe.evaluate.compare import paired_bootstrap
from fmprobe.evaluate.results import ProbeResults, SplitData
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.experiments.compare_runs import THRESHOLD_FREE


def compare_runner_up(exp: Experiment, task: ResolvedTask, results: ProbeResults, split: SplitData,
                      metrics: dict[str, Any]) -> dict[str, Any] | None:  # fmt: skip
    """``selection.runner_up`` of metrics.json; None with a single head."""
    primary = task.primary
    val = {h: m["splits"]["val"]["mean"][primary] for h, m in metrics["heads"].items()}
    if len(val) < 2:
        return None
    best = metrics["selection"]["best_head"]
    sign = -1.0 if task.lower_is_better else 1.0
    second = max((h for h in val if h != best), key=lambda h: sign * val[h] if val[h] == val[h] else -np.inf)
    out: dict[str, Any] = {"head": second, "metric": primary}
    if primary not in THRESHOLD_FREE[task.type]:
        out["skipped"] = (f"{primary} depends on each head's tuned decision thresholds; compare on a threshold-free "
                          f"metric ({', '.join(THRESHOLD_FREE[task.type])}) with fmprobe compare")  # fmt: skip
        return out
    if exp.eval.bootstrap == 0:
        out["skipped"] = "eval.bootstrap is 0: no resamples to compare the heads on"
        return out

    def members(head: str) -> list[np.ndarray]:
        return [r.scores["test"] for r in results.runs if r.head == head]

    groups = split.groups["test"] if exp.data.group_column else None
    diff = paired_bootstrap(MemberMean((task.metric(None),)), split.targets["test"], members(best), members(second),
                            metric=primary, groups=groups, n_resamples=exp.eval.bootstrap, ci=exp.eval.ci)
    lo, hi = diff["lo"], diff["hi"]
    out.update(difference=diff["diff"], ci=[lo, hi], p_value=diff["p_value"],
               distinguishable=bool(lo > 0 or hi < 0),  # the CI of the difference excludes 0
               resampled="groups" if groups is not None else "samples")
    return out
