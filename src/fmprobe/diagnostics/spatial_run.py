"""`fmprobe spatial`: do a model's patch tokens know where objects are? Spatial probes per extraction point.

The built-in shapes data (diagnostics/shapes.py: circles, squares, triangles on noise, exact boxes and masks)
is drawn at the encoder's input size, so annotations are in its pixels; clips (moving shapes) for video
encoders, and for image encoders with ``frames`` (each frame encoded as an image, tokens stacked along t).
Every extraction point is encoded in one pass and probed with diagnostics.spatial.run_spatial_probes (box IoU
of the largest object, patch-mask IoU, class-agnostic AP@0.5, with the priors a probe gets from the layout
alone); ``bootstrap`` > 0 adds percentile CIs over the test samples (diagnostics.spatial_ci). Every point is scored
on the same test shapes, and each row keeps its per-image box and mask IoU (``per_image``), so two points can be
compared pairwise (diagnostics.spatial_pairs).

``--encoder``: ``pixel`` (flattened pixel patches: the floor to beat), ``random`` (noise tokens: chance), an
experiment YAML (its ``model`` section; the model runs on its ``features.device``), or a model directory / hub id.
Extraction points are ``model.layers`` entries: block indices, module paths (``visual.merger``), language-model
layers of a VLM (``model.language_model.layers.0``), with a view for tiled VLMs (``-2@tiles``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmprobe.atomic import write_json
from fmprobe.backbones.base import Encoder, InputSpec, spatial_grid
from fmprobe.config import ModelConfig, load_config
from fmprobe.devices import config_device
from fmprobe.diagnostics.shapes import make_shapes
from fmprobe.diagnostics.spatial import STEPS, run_spatial_probes
from fmprobe.diagnostics.random_weights import CONTROL, randomise_weights
from fmprobe.diagnostics.spatial_ci import paired_differences, ratio_interval, spatial_intervals
from fmprobe.diagnostics.spatial_pairs import PAIRED_METRICS
from fmprobe.errors import ConfigError

CONTROLS = ("pixel", CONTROL, "random")
CONTROL_SIZE = 112
CONTROL_PATCH = 16
VIDEO_FRAMES = 8  # clip length for a video encoder that accepts any
BATCH = 8


def build_encoder(encoder: str, layers: list[int | str] | None, image_size: int | None) -> tuple[Encoder, list, str]:
    """The encoder ``--encoder`` names (on the config's features.device), the extraction points to probe, and the
    model's label in comparisons: the experiment's name for a config (two configs may share a checkpoint), else the
    encoder's name."""
    from fmprobe.backbones.controls import PixelPatchEncoder, RandomTokenEncoder

    if encoder in ("pixel", "random"):
        size = image_size or CONTROL_SIZE
        control = PixelPatchEncoder(CONTROL_PATCH, size) if encoder == "pixel" else RandomTokenEncoder(
            patch=CONTROL_PATCH, image_size=size)
        if layers and any(str(x) not in ("-1", "0") for x in layers):
            raise ConfigError(f"the {encoder} control has one extraction point (-1); got --layers {layers}")
        return control, [-1], control.name
    from fmprobe.backbones.registry import load_encoder

    device, label = "cpu", None
    if encoder.endswith((".yaml", ".yml")):
        exp = load_config(encoder)
        model, device, label = exp.model, exp.features.device, exp.name
    else:
        model = ModelConfig(name=encoder)
    updates: dict[str, Any] = {}
    if layers:
        updates["layers"] = list(layers)
    if image_size:
        updates["image_size"] = image_size
    model = ModelConfig.model_validate({**model.model_dump(), **updates})
    loaded = load_encoder(model).to(config_device(device, "features.device"))
    return loaded, list(model.layers), label or loaded.name


def encode_all(encoder: Encoder, images: np.ndarray, layers: list) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """uint8 ``[n, 3, H, W]`` images (``[n, T, 3, H, W]`` clips) -> float32 tokens ``[n, N, D]`` and grid per point.

    An image encoder given clips encodes every frame as an image and stacks the frames' tokens along t."""
    spec = encoder.input_spec
    if spec.kind == "image" and images.ndim == 5:
        n, frames = images.shape[:2]
        tokens, grids = encode_all(encoder, images.reshape(n * frames, *images.shape[2:]), layers)
        return ({k: v.reshape(n, frames * v.shape[1], v.shape[2]) for k, v in tokens.items()},
                {k: (frames * g[0], g[1], g[2]) for k, g in grids.items()})  # fmt: skip
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    tokens: dict[str, list[np.ndarray]] = {str(x): [] for x in layers}
    grids: dict[str, tuple] = {}
    encoder.eval()
    device = next(encoder.parameters(), torch.empty(0)).device  # the controls have no parameters: CPU
    for start in range(0, len(images), BATCH):
        x = ((torch.from_numpy(images[start : start + BATCH]).float() / 255 - mean) / std).to(device)
        with torch.inference_mode():
            out = encoder.encode(x, layers)
        for key in tokens:
            tokens[key].append(out.tokens[key].float().cpu().numpy())
            grids[key] = spatial_grid(out.grid[key], key, "spatial probes and reconstruction")
    return {k: np.concatenate(v) for k, v in tokens.items()}, grids


def spatial_command(
    encoder: str = "pixel", *, layers: list[int | str] | None = None, n_train: int = 96, n_test: int = 32,
    image_size: int | None = None, steps: int = STEPS, seed: int = 0, out: str | Path = "fmprobe-spatial",
    frames: int | None = None, bootstrap: int = 1000, ci: float = 0.95, controls: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Probe every extraction point; write ``spatial.json`` to ``out``; return it.

    ``frames``: moving shapes, clips of this many frames (a video encoder's own clip length by default).
    ``bootstrap``: resamples of the test samples for each score's CI (0: no CI).
    ``controls``: probed on the same shapes — ``pixel`` (flattened pixel patches of the model's patch size),
    ``random-weights`` (the model with its weights redrawn, at every point) or ``random`` (noise tokens); each point
    gets ``vs[control]``: its score minus the control's (the same point for random-weights) with a paired CI.
    ``progress(done, total)`` after each probed point (the model's and the controls')."""
    if n_train < 2 or n_test < 1:
        raise ConfigError(f"need at least 2 training and 1 test images, got --n-train {n_train} --n-test {n_test}")
    if bootstrap < 0 or (frames is not None and frames < 1):
        raise ConfigError(f"--bootstrap must be >= 0 and --frames >= 1, got {bootstrap} and {frames}")
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ConfigError(f"unknown control(s) {unknown}; choose from {', '.join(CONTROLS)}")
    if controls and not bootstrap:
        raise ConfigError("controls are compared with paired bootstrap CIs; give --bootstrap > 0")
    if CONTROL in controls and encoder in ("pixel", "random"):
        raise ConfigError(f"the {CONTROL} control redraws a model's weights; --encoder {encoder} has none")
    model, points, label = build_encoder(encoder, layers, image_size)
    name, spec = model.name, model.input_spec
    if spec.image_size[0] != spec.image_size[1]:
        raise ConfigError(f"{name} takes {spec.image_size} input; the shapes data is square")
    size = spec.image_size[0]
    if spec.kind == "video":
        if frames is not None and spec.num_frames and frames != spec.num_frames:
            raise ConfigError(f"{name} takes clips of {spec.num_frames} frames; got --frames {frames}")
        frames = frames or spec.num_frames or VIDEO_FRAMES
    data = make_shapes(n_train + n_test, size=size, seed=seed, video_frames=frames)

    total = len(points) * (1 + controls.count(CONTROL)) + sum(c != CONTROL for c in controls)
    probed_points = 0

    def probe(encoder_: Encoder, keys: list) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Per point: its result row and its full per-image scores."""
        nonlocal probed_points
        tokens, grids = encode_all(encoder_, data.images, keys)
        done = []
        for key in tokens:
            r = run_spatial_probes(tokens[key][:n_train], grids[key], data.objects[:n_train], tokens[key][n_train:],
                                   data.objects[n_train:], size, seed=seed, steps=steps)
            per_image = r.pop("per_image")
            if bootstrap:
                r["ci"] = spatial_intervals(per_image, grids[key][0], n_resamples=bootstrap, ci=ci, seed=seed)
                if "direction_accuracy" in r:
                    r["ci"]["direction_accuracy"] = ratio_interval(r["direction_hits"], r["direction_moved"],
                                                                   n_resamples=bootstrap, ci=ci, seed=seed)
            r["per_image"] = {m: per_image[m] for m in PAIRED_METRICS}  # for paired comparisons of points
            done.append(({"layer": key, "grid": list(grids[key]), "dim": int(tokens[key].shape[-1]), **r}, per_image))
            probed_points += 1
            if progress is not None:
                progress(probed_points, total)
        return done

    measured = probe(model, points)
    control_rows = []
    for control in controls:
        if control == CONTROL:
            randomise_weights(model, seed)  # in place: the trained model's tokens are already probed
            probed = probe(model, points)
        else:
            probed = probe(_control_encoder(control, spec, size), [-1])
        for (row, per_image), (_, own) in zip(measured, probed if control == CONTROL else probed * len(measured)):
            row.setdefault("vs", {})[control] = paired_differences(per_image, own, row["grid"][0], n_resamples=bootstrap,
                                                                   ci=ci, seed=seed)  # fmt: skip
        control_rows += [{"control": control, **row} for row, _ in probed]
    result = {"encoder": name, "model": label,
              "image_size": size, "frames": frames, "n_train": n_train, "n_test": n_test, "steps": steps, "seed": seed,
              "bootstrap": bootstrap, "ci_level": ci if bootstrap else None, "results": [r for r, _ in measured],
              "controls": control_rows}  # fmt: skip
    write_json(Path(out) / "spatial.json", result)
    return result


def _control_encoder(control: str, spec: InputSpec, size: int) -> Encoder:
    """Pixel patches of the model's own patch size (its tower's grid), or noise tokens, at the model's input size."""
    from fmprobe.backbones.controls import PixelPatchEncoder, RandomTokenEncoder

    if size % spec.patch_size:
        raise ConfigError(f"the {control} control cuts {size}-px images into the model's {spec.patch_size}-px patches, "
                          "which do not tile them")  # fmt: skip
    if control == "pixel":
        return PixelPatchEncoder(spec.patch_size, size)
    return RandomTokenEncoder(patch=spec.patch_size, image_size=size)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the results, one row per extraction point."""
    head = f"{'layer':<34} {'grid':>9} {'dim':>5} {'box IoU (prior)':>16} {'mask IoU (prior)':>17} {'AP@0.5':>7}"
    lines = [f"{result['encoder']} · {result['image_size']} px · {result['n_train']} train / {result['n_test']} test",
             head, "-" * len(head)]
    for r in result["results"]:
        grid = "x".join(str(g) for g in r["grid"])
        lines.append(f"{r['layer']:<34} {grid:>9} {r['dim']:>5} {r['box_iou']:>7.3f} ({r['box_iou_prior']:.3f}) "
                     f"{r['mask_iou']:>8.3f} ({r['mask_iou_prior']:.3f}) {r['map50']:>7.3f}")
    return "\n".join(lines)
