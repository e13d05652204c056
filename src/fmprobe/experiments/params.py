"""Trainable and total parameters of every head run, for metrics.json and the reports.

Frozen probes train the head alone: total = backbone + head. The backbone count is memoised next to the
feature cache's encoder identities (same key: model config + weight files + versions), so a fully cached
run does not load the model; when the count is not known yet the encoder is loaded once and handed to the
extraction, which would otherwise load it itself. Adapted runs take both counts from adaptation.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from fmprobe.atomic import write_json
from fmprobe.backbones.base import Encoder
from fmprobe.config import Experiment
from fmprobe.evaluate.results import ProbeResults
from fmprobe.features.keys import identity_path
from fmprobe.features.remote import local_cache_dir


def _memo(exp: Experiment) -> Path:
    return identity_path(exp.model, local_cache_dir(exp.features.cache_dir)).with_suffix(".params.json")


def _count(exp: Experiment) -> tuple[dict[str, int | None], Encoder]:
    """Load the encoder once and memoise its parameter and block counts."""
    from fmprobe.backbones.registry import load_encoder

    encoder = load_encoder(exp.model)
    counts = {"backbone_params": sum(p.numel() for p in encoder.parameters()), "blocks": encoder.num_blocks}
    write_json(_memo(exp), counts)
    return counts, encoder


def backbone_parameters(exp: Experiment) -> tuple[int | None, Encoder | None]:
    """(parameters of the backbone ``load_encoder`` builds, the encoder if it had to be loaded to count them);
    (None, None) for adapted runs, whose counts come from adaptation.json."""
    if exp.adapt.strategy != "frozen":
        return None, None
    memo = _memo(exp)
    if memo.is_file():
        return int(json.loads(memo.read_text())["backbone_params"]), None
    counts, encoder = _count(exp)
    return counts["backbone_params"], encoder


def backbone_blocks(exp: Experiment) -> int | None:
    """The backbone's transformer blocks (so that layer -1 is drawn at its true depth), memoised like the
    parameter count; None for a family without such a count."""
    memo = _memo(exp)
    if memo.is_file():
        counts = json.loads(memo.read_text())
        if "blocks" in counts:  # memos written before the block count was recorded lack it
            return counts["blocks"]
    return _count(exp)[0]["blocks"]


def record_parameters(exp: Experiment, results: ProbeResults, run_dir: Path, backbone: int | None) -> None:
    """Set ``total_params`` on every run (``trainable_params`` is set where the run is trained)."""
    if exp.adapt.strategy == "frozen":
        assert backbone is not None
        for run in results.runs:
            run.total_params = backbone + run.trainable_params
        return
    report = json.loads((run_dir / "adaptation.json").read_text())
    for run in results.runs:
        run.total_params = int(report["heads"][run.head][str(run.seed)]["total_params"])
