"""`fmprobe speed`: how much slower is each model (at each extraction point) than the baseline VLM, measured in one
run on one machine? The VLM study's inference-speed criterion (< 2x Qwen2.5-VL should pass, < 3x to proceed).

What is timed: fmprobe's encoder call that returns the point's tokens (``encode(images, [point])``: the model's own
image processing, the tower, and the language model for LM points) on a batch of shapes images at the model's input
size, on the config's ``features.device`` in its ``model.dtype``, after ``warmup`` untimed calls; ``repeats`` timed
calls each. Models are loaded one at a time (real VLMs do not fit side by side); the baseline is timed first and again
last, so drift of the machine between the two shows (``baseline.drift``: the ratio of the two medians) and both enter
its median. The ratio is median seconds (model, point) / median seconds (baseline, baseline point), its CI a bootstrap
of the ratio of medians resampling each side's repeats.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmprobe.atomic import write_json
from fmprobe.backbones.base import Encoder
from fmprobe.diagnostics.shapes import make_shapes
from fmprobe.errors import ConfigError
from fmprobe.evaluate.bootstrap import interval


def _seconds(encoder: Encoder, pixels: torch.Tensor, point: int | str, warmup: int, repeats: int) -> list[float]:
    device = next(encoder.parameters()).device
    x = pixels.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            encoder.encode(x, [point])
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def _batch(encoder: Encoder, batch: int, seed: int) -> torch.Tensor:
    spec = encoder.input_spec
    images = torch.from_numpy(make_shapes(batch, size=spec.image_size[0], seed=seed).images).float() / 255
    return (images - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)


def ratio_interval(model: Sequence[float], baseline: Sequence[float], *, n_resamples: int = 1000, ci: float = 0.95,
                   seed: int = 0) -> list[float]:  # fmt: skip
    """CI of median(model) / median(baseline), each side's repeats resampled on their own; fmprobe's one interval
    (``evaluate.bootstrap.interval``) over the fewer repeats of the two."""
    rng = np.random.default_rng(seed)
    m, b = np.asarray(model), np.asarray(baseline)
    ratios = (np.median(m[rng.integers(0, len(m), (n_resamples, len(m)))], axis=1)
              / np.median(b[rng.integers(0, len(b), (n_resamples, len(b)))], axis=1))  # fmt: skip
    point = float(np.median(m) / np.median(b))
    return list(interval(ratios, point, ci=ci, units=min(len(m), len(b)))[1:])


def speed_command(models: Sequence[str], baseline: str, baseline_point: int | str, *, batch: int = 2,
                  repeats: int = 5, warmup: int = 1, seed: int = 0, bootstrap: int = 1000, ci: float = 0.95,
                  out: str | Path = "fmprobe-speed") -> dict[str, Any]:  # fmt: skip
    """Time the baseline, every point of every model config, the baseline again; write ``speed.json``; return it."""
    from fmprobe.diagnostics.spatial_run import build_encoder

    if batch < 1 or repeats < 2 or warmup < 0:
        raise ConfigError(f"need --batch >= 1, --repeats >= 2, --warmup >= 0; got {batch}, {repeats}, {warmup}")

    def timed(config: str, points: list | None) -> tuple[str, dict[str, list[float]], str]:
        encoder, layers, label = build_encoder(config, points, None)
        pixels = _batch(encoder, batch, seed)
        times = {str(p): _seconds(encoder, pixels, p, warmup, repeats) for p in layers}
        return label, times, str(next(encoder.parameters()).device)

    label, first, device = timed(baseline, [baseline_point])
    results = []
    for config in models:
        model, times, model_device = timed(config, None)
        results += [{"model": model, "point": p, "device": model_device, "seconds": s} for p, s in times.items()]
    _, last, _ = timed(baseline, [baseline_point])
    reference = first[str(baseline_point)] + last[str(baseline_point)]
    base_median = float(np.median(reference))
    for r in results:
        r["seconds_per_image"] = float(np.median(r["seconds"])) / batch
        r["ratio"] = float(np.median(r["seconds"])) / base_median
        r["ci"] = ratio_interval(r["seconds"], reference, n_resamples=bootstrap, ci=ci, seed=seed)
    result = {"baseline": {"model": label, "point": str(baseline_point), "device": device,
                           "seconds_before": first[str(baseline_point)], "seconds_after": last[str(baseline_point)],
                           "seconds_per_image": base_median / batch,
                           "drift": float(np.median(last[str(baseline_point)]) / np.median(first[str(baseline_point)]))},
              "batch": batch, "repeats": repeats, "warmup": warmup, "ci_level": ci, "results": results}  # fmt: skip
    write_json(Path(out) / "speed.json", result)
    return result
