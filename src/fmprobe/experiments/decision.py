"""The study's outcome table, fired over the decision matrix: which VLM to proceed with, or which pivot.

Each model stands at its best point (point_gates.model_summary). In order, the first rule that holds:

1. ``select``  — several models pass every must-pass criterion: the ``select`` best by weighted score go on;
2. ``proceed`` — exactly one does: switch to it;
3. ``undecided`` — none does, but some model's must-pass criteria are only inconclusive (a CI straddles a threshold):
   more test data decides before any pivot;
4. ``investigate`` — none passes every must-pass, but some pass the outcome criterion (the study: spatial IoU):
   adapter modifications may close the gap;
5. ``marginal`` — none passes it, but some model is surely above ``hybrid_below`` (the study's partial success, its
   section 10.4: accept marginal performance, or investigate);
6. ``pivot to hybrid`` — none is surely above ``hybrid_below``, some surely above ``major_pivot_below``;
7. ``major pivot`` — none is surely above ``major_pivot_below``.

"Surely above x" reads the criterion's pessimistic CI end, and a criterion with controls must also beat them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fmprobe.experiments.gates import GatesSpec


def _surely_beyond(level: dict[str, Any], threshold: float, higher: bool) -> bool:
    worst = level["lo"] if higher else level["hi"]
    beats = all(b["level"] == "pass" for b in level.get("beats", {}).values())
    return beats and (worst > threshold if higher else worst < threshold)


def decide(spec: GatesSpec, summary: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """``{outcome, models, text}`` of the rule that fires (None without an ``outcome`` in the gates file)."""
    rule = spec.outcome
    if rule is None:
        return None
    crit = next(c for c in spec.criteria if c.name == rule.criterion)
    accepted = sorted((s for s in summary if s["verdict"] == "accept"), key=lambda s: -s["weighted"]["score"])
    if len(accepted) > 1:
        chosen = [s["model"] for s in accepted[: rule.select]]
        return {"outcome": "select", "models": chosen,
                "text": f"{len(accepted)} models pass every must-pass criterion: continue with the {len(chosen)} best "
                        f"by weighted score, {' and '.join(chosen)}"}  # fmt: skip
    if accepted:
        model = accepted[0]["model"]
        return {"outcome": "proceed", "models": [model],
                "text": f"proceed: {model} (at {accepted[0]['point']}) is the one model passing every must-pass "
                        "criterion"}  # fmt: skip
    open_ = [s["model"] for s in summary if s["verdict"] == "inconclusive"]
    if open_:
        return {"outcome": "undecided", "models": open_,
                "text": f"undecided: {', '.join(open_)} fail no must-pass criterion but leave one inconclusive (its CI "
                        "straddles the threshold); more test shapes decide before any pivot"}  # fmt: skip
    passing = [s["model"] for s in summary if s["levels"][crit.name]["level"] in ("pass", "target")]
    if passing:
        return {"outcome": "investigate", "models": passing,
                "text": f"investigate: {', '.join(passing)} pass {crit.name} but fail another must-pass criterion; "
                        "adapter modifications may close the gap"}  # fmt: skip
    for outcome, threshold, text in (
        ("marginal", rule.hybrid_below, "marginal: {models} surely above {t:g} in {c} but not above its threshold "
                                        "(the study's partial success: accept marginal performance or investigate)"),
        ("pivot to hybrid", rule.major_pivot_below, "pivot to a hybrid architecture: no model is surely above {h:g} "
                                                     "in {c}; {models} surely above {t:g}"),
    ):  # fmt: skip
        models = [s["model"] for s in summary if _surely_beyond(s["levels"][crit.name], threshold, crit.higher)]
        if models:
            return {"outcome": outcome, "models": models,
                    "text": text.format(models=", ".join(models), t=threshold, c=crit.name, h=rule.hybrid_below)}
    return {"outcome": "major pivot", "models": [],
            "text": f"major pivot: no model is surely above {rule.major_pivot_below:g} in {crit.name}; rethink the "
                    "approach"}  # fmt: skip
