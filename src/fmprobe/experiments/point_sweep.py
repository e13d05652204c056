"""`fmprobe spatial-sweep SWEEP`: the spatial study over several models and all their extraction points, one
resumable command, ending in the gates' decision matrix across models and points.

A sweep file (paths relative to it)::

    models: [qwen2_5_vl.yaml, llava_next.yaml, internvl2.yaml, cogvlm2.yaml]  # experiment YAMLs; model.layers = points
    gates: gates.yaml
    still: {n_train: 512, n_test: 256, steps: 300, bootstrap: 1000}        # fmprobe spatial on still shapes
    moving: {frames: 8, n_train: 128, n_test: 64, steps: 300, bootstrap: 1000}  # optional: moving shapes
    reference: vae.yaml                                                     # optional: fmprobe align MODEL reference
    align: {metrics: [linear_cka, rsa, knn_recall, linear_r2], bootstrap: 1000, reference_view: "-1:flat",
            heatmap: "-1:channels"}                                         # optional: the reference's layer:pooling
    controls: [pixel, random-weights]                                       # probed with each model (paired)
    reconstruct: {vae: vae.yaml, epochs: 50, ...}                           # optional: fmprobe reconstruct per model
    speed: {baseline: qwen2_5_vl.yaml, point: visual.merger}                # optional: fmprobe speed, one run
    pairs: [{model: llava_next.yaml, a: "-2@tiles", b: "-2@base"}]          # optional paired point comparisons
    tables: []                                                              # optional metric tables (CSV)
    out: out

Each step writes into ``out`` (``<model>/spatial-still``, ``<model>/spatial-moving``, ``<model>/align``,
``<model>/align-heatmap`` (the points against every channel of the reference: figures only), ``<model>/reconstruct``,
``speed``, ``pairs/<model>-<a>-vs-<b>``) with a ``step.json`` of its settings (the options and the
content of the YAMLs it read); a step whose ``step.json`` matches is skipped, so a killed sweep resumes and an
edited config reruns exactly what it changed. Then ``gate-points`` over everything writes ``out/gates``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from fmprobe.atomic import write_json
from fmprobe.config import Strict, _format_errors
from fmprobe.errors import ConfigError
from fmprobe.experiments.gates import GateReport

STEP_FILE = "step.json"


class SpatialOptions(Strict):
    n_train: int = Field(default=96, ge=2)
    n_test: int = Field(default=32, ge=1)
    steps: int = Field(default=300, ge=1)
    bootstrap: int = Field(default=1000, ge=0)
    seed: int = 0
    frames: int | None = Field(default=None, ge=1)


class AlignOptions(Strict):
    metrics: list[str] = Field(default_factory=lambda: ["linear_cka"])
    bootstrap: int = Field(default=1000, ge=0)
    reference_view: str | None = None  # LAYER[:POOLING] of the reference (e.g. "-1:flat": a VAE's latents, layout kept)
    heatmap: str | None = None  # LAYER:POOLING of a second, figures-only alignment (e.g. "-1:channels")


class ReconstructOptions(Strict):
    """fmprobe reconstruct's options (diagnostics.reconstruct_run), run on every model with the sweep's controls."""

    vae: str  # experiment YAML of the diffusers VAE (the generator's: LTX-Video's)
    n_train: int = Field(default=96, ge=2)
    n_val: int = Field(default=16, ge=2)
    n_test: int = Field(default=32, ge=2)
    adapter: Literal["mlp", "queries"] = "mlp"
    loss: Literal["pixels", "latents"] = "pixels"
    epochs: int = Field(default=50, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=8, ge=1)
    hidden: int = Field(default=512, ge=1)
    bootstrap: int = Field(default=1000, ge=1)
    seed: int = 0
    lpips_backbone: str | None = None  # torchvision AlexNet state dict (default: torch hub's cached file)


class SpeedOptions(Strict):
    """fmprobe speed: every model's points timed in one run against ``baseline`` (one of models) at ``point``."""

    baseline: str
    point: int | str
    batch: int = Field(default=2, ge=1)
    repeats: int = Field(default=5, ge=2)
    warmup: int = Field(default=1, ge=0)


class PairSpec(Strict):
    model: str  # one of models (the YAML path as written)
    a: str
    b: str


class PointSweep(Strict):
    models: list[str] = Field(min_length=1)
    gates: str
    still: SpatialOptions = Field(default_factory=SpatialOptions)
    moving: SpatialOptions | None = None
    reference: str | None = None
    align: AlignOptions = Field(default_factory=AlignOptions)
    controls: list[Literal["pixel", "random-weights", "random"]] = Field(default_factory=list)
    reconstruct: ReconstructOptions | None = None
    speed: SpeedOptions | None = None
    pairs: list[PairSpec] = Field(default_factory=list)
    tables: list[str] = Field(default_factory=list)
    out: str = "out"


def load_point_sweep(path: str | Path) -> tuple[PointSweep, Path]:
    """The sweep and the folder its relative paths start from."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
        spec = PointSweep.model_validate(data)
    except OSError as err:
        raise ConfigError(f"cannot read sweep '{path}': {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep '{path}' is not valid YAML: {err}") from None
    except ValidationError as err:
        raise ConfigError(_format_errors(err, f"sweep '{path}'")) from None
    if spec.moving is not None and spec.moving.frames is None:
        raise ConfigError(f"sweep '{path}': moving needs frames (the clip length)")
    if spec.still.frames is not None:
        raise ConfigError(f"sweep '{path}': still shapes take no frames; put clips under moving")
    unknown = [p.model for p in spec.pairs if p.model not in spec.models]
    if unknown:
        raise ConfigError(f"sweep '{path}': pairs name models {unknown} that are not among models {spec.models}")
    if spec.speed is not None and spec.speed.baseline not in spec.models:
        raise ConfigError(f"sweep '{path}': speed.baseline '{spec.speed.baseline}' is not among models {spec.models}; "
                          "the baseline is timed in the same run as the others")  # fmt: skip
    views = [v for v in (spec.align.reference_view, spec.align.heatmap) if v is not None]
    if views and spec.reference is None:
        raise ConfigError(f"sweep '{path}': align.reference_view / align.heatmap choose the reference's layer and "
                          "pooling; name the reference")  # fmt: skip
    return spec, path.resolve().parent


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise ConfigError(f"cannot read '{path}': {err.strerror}") from None


def _step(out: Path, settings: dict[str, Any], run: Callable[[], Any], on_event: Callable[[str], None]) -> Path:
    """Run ``run`` unless ``out/step.json`` records the same settings; record them after it finished."""
    record = out / STEP_FILE
    if record.exists() and json.loads(record.read_text()) == settings:
        on_event(f"done earlier: {out}")
        return out
    on_event(f"running: {out}")
    run()
    write_json(record, settings)
    return out


def run_point_sweep(path: str | Path, *, on_event: Callable[[str], None] = lambda _m: None) -> GateReport:
    """Run every step of the sweep that is not done yet, then gate every (model, point); return the gate report."""
    from fmprobe.config import load_config
    from fmprobe.diagnostics.align_cli import align_command
    from fmprobe.diagnostics.reconstruct_run import reconstruct_command
    from fmprobe.diagnostics.spatial_pairs import pair_command
    from fmprobe.diagnostics.spatial_run import spatial_command
    from fmprobe.diagnostics.speed import speed_command
    from fmprobe.experiments.point_gates import points_command

    spec, base = load_point_sweep(path)
    out = base / spec.out
    configs = {m: base / m for m in spec.models}
    for config in configs.values():  # every config valid before anything runs
        load_config(config)
    folders = {m: Path(m).stem for m in spec.models}
    if len(set(folders.values())) != len(folders):
        raise ConfigError(f"models {spec.models} share a file name; their outputs would collide under {out}")
    spatial, aligns, heatmaps, recons, pairs = [], [], [], [], []
    kinds = [("still", spec.still)] + ([("moving", spec.moving)] if spec.moving else [])
    for m, config in configs.items():
        digest = _file_digest(config)
        for kind, options in kinds:
            folder = out / folders[m] / f"spatial-{kind}"
            settings = {"step": "spatial", "config": digest, "controls": spec.controls, **options.model_dump()}
            spatial.append(_step(folder, settings, lambda c=config, o=options, f=folder: spatial_command(
                str(c), **o.model_dump(), controls=spec.controls, out=f), on_event))  # fmt: skip
        if spec.reference is not None:
            reference = base / spec.reference
            settings = {"step": "align", "config": digest, "reference": _file_digest(reference),
                        **spec.align.model_dump()}  # fmt: skip
            views = [("align", spec.align.reference_view, spec.align.metrics, aligns)]
            if spec.align.heatmap is not None:
                views.append(("align-heatmap", spec.align.heatmap, ["linear_cka"], heatmaps))
            for name, view, metrics, found in views:
                side, folder = f"{reference}:{view}" if view else str(reference), out / folders[m] / name
                found.append(_step(folder, settings, lambda c=config, r=side, k=metrics, f=folder: align_command(
                    str(c), r, k, out=f, bootstrap=spec.align.bootstrap), on_event))  # fmt: skip
        if spec.reconstruct is not None:
            options = spec.reconstruct
            folder = out / folders[m] / "reconstruct"
            settings = {"step": "reconstruct", "config": digest, "vae": _file_digest(base / options.vae),
                        "controls": spec.controls, **options.model_dump()}  # fmt: skip
            recons.append(_step(folder, settings, lambda c=config, f=folder: reconstruct_command(
                str(c), str(base / options.vae), **options.model_dump(exclude={"vae", "lpips_backbone"}),
                lpips_backbone=_path(base, options.lpips_backbone), controls=spec.controls, out=f), on_event))
    speeds = []
    if spec.speed is not None:
        timing = spec.speed
        folder = out / "speed"
        settings = {"step": "speed", "configs": {m: _file_digest(c) for m, c in configs.items()},
                    **timing.model_dump()}  # fmt: skip
        speeds.append(_step(folder, settings, lambda: speed_command(
            [str(c) for c in configs.values()], str(configs[timing.baseline]), timing.point, batch=timing.batch,
            repeats=timing.repeats, warmup=timing.warmup, out=folder), on_event))  # fmt: skip
    for pair in spec.pairs:
        source = out / folders[pair.model] / "spatial-still"
        folder = out / "pairs" / f"{folders[pair.model]}-{_safe(pair.a)}-vs-{_safe(pair.b)}"
        settings = {"step": "pair", "spatial": _file_digest(source / "spatial.json"), "a": pair.a, "b": pair.b}
        pairs.append(_step(folder, settings, lambda s=source, p=pair, f=folder: pair_command(
            s, p.a, p.b, out=f), on_event))  # fmt: skip
    on_event(f"gating the points of {len(configs)} models: {out / 'gates'}")
    report = points_command(base / spec.gates, spatial, aligns, pairs=pairs, tables=[base / t for t in spec.tables],
                            reconstructions=recons, speeds=speeds, heatmaps=heatmaps, out=out / "gates")  # fmt: skip
    on_event(f"report: {out / 'gates' / 'report.html'}")
    return report


def _path(base: Path, path: str | None) -> Path | None:
    return None if path is None else base / Path(path).expanduser()


def _safe(point: str) -> str:
    """A point name as a folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in point)
