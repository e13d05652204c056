"""`fmprobe layers CONFIG`: which depth of the backbone holds the task best (layer-wise probing).

The experiment is run once, as a normal run, with every requested layer extracted in one pass and one
head per (layer, head type): same splits, seeds, selection on validation, bootstrap CIs and flags as
`fmprobe run`. The run directory then also gets ``layers.json``, ``layers.csv``, ``layers.png`` (test
primary metric with its CI against depth, one line per head type) and ``layers.html``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fmprobe.atomic import atomic_path, write_json, write_text
from fmprobe.config import FITTED_HEADS, TRAINED_HEADS, Experiment, HeadConfig
from fmprobe.diagnostics import plots
from fmprobe.errors import ConfigError
from fmprobe.experiments.params import backbone_blocks
from fmprobe.experiments.run import run_experiment
from fmprobe.report.templating import render
from fmprobe.report.terminal import fmt

HEAD_TYPES = TRAINED_HEADS + FITTED_HEADS


def parse_layers(text: str) -> list[int | str]:
    """``"0,3,-1,visual.merger"`` -> ``[0, 3, -1, "visual.merger"]`` (digits become ints, paths stay strings)."""
    out: list[int | str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise ConfigError(f"--layers '{text}' has an empty entry; give e.g. 0,3,6,-1")
        out.append(int(part) if part.lstrip("-").isdigit() else part)
    return out


def head_name(head_type: str, layer: int | str) -> str:
    return f"{head_type}@{layer}"


def layer_experiment(exp: Experiment, layers: list[int | str], head_types: list[str]) -> Experiment:
    """``exp`` with all ``layers`` extracted and one head per (layer, head type).

    Each head copies the settings of the config's first head of its type (pooling, width, heads...), or the
    defaults when the config has none; only its layer and name change.
    """
    if len(layers) < 2:
        raise ConfigError(f"a layer sweep needs at least two layers, got {layers}; pass e.g. --layers 0,3,6,-1")
    if len({str(x) for x in layers}) != len(layers):
        raise ConfigError(f"--layers lists a layer twice: {layers}")
    bad = [t for t in head_types if t not in HEAD_TYPES]
    if bad or not head_types:
        raise ConfigError(f"--heads must list head types from {', '.join(HEAD_TYPES)}; got {head_types}")
    heads = []
    for head_type in head_types:
        template = next((h for h in exp.heads if h.type == head_type), None)
        if template is None:
            template = HeadConfig(type=head_type, pooling="attentive" if head_type == "attentive" else "mean")
        for layer in layers:
            heads.append(template.model_copy(update={"layer": layer, "name": head_name(head_type, layer)}))
    features = exp.features
    if "attentive" in head_types:
        features = features.model_copy(update={"store_tokens": True})
    return exp.model_copy(update={"name": f"{exp.name}-layers", "heads": heads, "features": features,
                                  "model": exp.model.model_copy(update={"layers": list(layers)})})


def layer_depth(layer: int | str, blocks: int | None) -> float | None:
    """Where a layer sits among the backbone's blocks: ``i`` at i, ``-k`` at blocks - k (so -1 of 12 blocks is at
    11: the last block's output, after the final norm); None for a module path or an unknown depth."""
    if isinstance(layer, str):
        layer = int(layer) if layer.lstrip("-").isdigit() else layer
    if isinstance(layer, str) or (layer < 0 and blocks is None):
        return None
    return float(layer if layer >= 0 else blocks + layer)


def depth_positions(layers: list[int | str], blocks: int | None) -> list[float] | None:
    """x positions of the layers at their true depth (a negative index a fifth of a block right of the same block
    given as a positive one, as it is read after the final norm); None when one has no depth."""
    depths = [layer_depth(x, blocks) for x in layers]
    if any(d is None for d in depths):
        return None
    taken = {d for d, x in zip(depths, layers) if int(x) >= 0}
    return [d + 0.2 if int(x) < 0 and d in taken else d for d, x in zip(depths, layers)]  # type: ignore[operator]


def layer_table(metrics: dict[str, Any], layers: list[int | str], head_types: list[str],
                blocks: int | None = None) -> pd.DataFrame:  # fmt: skip
    """One row per (head type, layer): its depth, test mean, sd and CI of the primary metric, and its validation
    mean."""
    primary = metrics["task"]["primary_metric"]
    rows = []
    for head_type in head_types:
        for depth, layer in enumerate(layers):
            h = metrics["heads"][head_name(head_type, layer)]
            ci = h["test_ci"][primary]
            rows.append({
                "head_type": head_type, "layer": str(layer), "position": depth, "depth": layer_depth(layer, blocks),
                "metric": primary,
                "test_mean": h["splits"]["test"]["mean"][primary], "test_sd": h["splits"]["test"]["sd"][primary],
                "ci_low": ci[0], "ci_high": ci[1], "val_mean": h["splits"]["val"]["mean"][primary],
                "flags": ",".join(sorted({f["name"] for f in h["flags"] if f["severity"] != "info"})),
            })
    return pd.DataFrame(rows)


def layers_command(
    exp: Experiment, layers: list[int | str] | None = None, head_types: list[str] | None = None, *,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the sweep and write its table, figure and page into the run directory; returns ``layers.json``."""
    layers = list(layers) if layers else list(exp.model.layers)
    head_types = list(head_types) if head_types else list(dict.fromkeys(h.type for h in exp.heads))
    sweep = layer_experiment(exp, layers, head_types)
    result = run_experiment(sweep, progress=progress)
    metrics, run_dir = result.metrics, result.run_dir
    blocks = backbone_blocks(sweep)
    table = layer_table(metrics, layers, head_types, blocks)
    primary = metrics["task"]["primary_metric"]
    series = {
        t: (g["test_mean"].tolist(), g["ci_low"].tolist(), g["ci_high"].tolist())
        for t, g in table.groupby("head_type", sort=False)
    }
    positions = depth_positions(layers, blocks)
    xlabel = (f"block (0 = first of {blocks}; a negative index counts from the end, -1 = the output after the final "
              "norm)" if positions is not None else "extraction point, in the order given")  # fmt: skip
    figure = plots.depth_curves([str(x) for x in layers], series, metric=primary, dest=run_dir / "layers.png",
                                baseline=metrics["baseline"]["test"].get(primary), positions=positions, xlabel=xlabel,
                                title=f"{exp.name}: test {primary} by layer ({int(metrics['ci_level'] * 100)}% CI)")
    with atomic_path(run_dir / "layers.csv") as tmp:
        table.to_csv(tmp, index=False)
    best = metrics["selection"]["best_head"]
    summary = {
        "experiment": exp.name, "run_dir": str(run_dir), "metric": primary, "layers": [str(x) for x in layers],
        "head_types": head_types, "baseline": metrics["baseline"]["test"].get(primary),
        "best_on_validation": {"head": best, "layer": str(metrics["heads"][best]["layer"]),
                               "type": metrics["heads"][best]["type"]},
        "rows": table.to_dict(orient="records"), "figure": figure.name, "blocks": blocks,
    }
    write_json(run_dir / "layers.json", summary)
    write_text(run_dir / "layers.html", _page(summary, table, plots.png_base64(figure)))
    return summary


def _page(summary: dict[str, Any], table: pd.DataFrame, image: str) -> str:
    return render("layers.html", s=summary, columns=list(table.columns), rows=table.itertuples(index=False),
                  image=image, fmt=fmt)
