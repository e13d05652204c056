"""`fmprobe attention`: a config's backbone, a frozen run's attentive probes, or an adapted run's backbone before
and after adaptation (with its probes on the adapted tokens); one entry point choosing among the three."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmprobe.config import load_config
from fmprobe.diagnostics.adapted_attention import adapted_attention, is_adapted_run
from fmprobe.diagnostics.attention_report import Tick, backbone_attention, pooler_attention
from fmprobe.errors import ConfigError


def attention_command(
    config: str | Path | None = None, *, run: str | Path | None = None, samples: int = 8, out: str | Path | None = None,
    progress: Tick | None = None,
) -> dict[str, Any]:
    """Backbone attention of CONFIG, or the attention of RUN; exactly one of them. ``progress(done, total)`` counts
    samples (backbone) or the run's heads."""
    if (config is None) == (run is None):
        raise ConfigError("give either an experiment CONFIG (backbone attention) or --run RUN_DIR (attentive probes)")
    if run is not None:
        if is_adapted_run(run):  # the backbone moved: rebuilt per seed, attention before and after
            return adapted_attention(run, samples=samples, out=out, progress=progress)
        return pooler_attention(run, out=out, progress=progress)
    return backbone_attention(load_config(config), samples=samples, out=out or "fmprobe-attention", progress=progress)
