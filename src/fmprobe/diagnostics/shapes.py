"""Synthetic coloured shapes with exact boxes and masks: ground truth for the spatial probes.

Images hold 1..max_objects circles, squares and triangles in named colours on a dark, lightly noisy grey
background; clips move each object linearly at constant velocity, bouncing off the borders. Every sample is
drawn from its own generator seeded by ``(seed, index)``, so a dataset is deterministic and the first k
samples of a bigger dataset are the same k samples.

Conventions: boxes are ``(x0, y0, x1, y1)`` in pixels with x1/y1 exclusive (the box of a mask is
``(min col, min row, max col + 1, max row + 1)``); annotations always carry a frame axis F (1 for images).
Masks are amodal: an object's whole silhouette, also where a later-drawn object covers it (objects never
overlap in still images; they may cross in clips). Every object lies fully inside the frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fmprobe.atomic import write_text
from fmprobe.errors import FmprobeError

SHAPES = ("circle", "square", "triangle")
# bright colours (channel sum >= 300) on a dark background (<= 3 * 75), so foreground is easy to tell apart
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 50, 50),
    "green": (50, 200, 60),
    "blue": (60, 90, 240),
    "yellow": (230, 220, 50),
    "cyan": (50, 210, 220),
    "magenta": (220, 60, 210),
}
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class SampleObjects:
    """The objects of one image or clip (K objects, F frames)."""

    shapes: tuple[str, ...]  # K names from SHAPES
    colours: tuple[str, ...]  # K names from COLOURS
    boxes: np.ndarray  # [F, K, 4] float32 (x0, y0, x1, y1) pixels, x1/y1 exclusive
    masks: np.ndarray  # [F, K, H, W] bool, amodal


@dataclass(frozen=True)
class ShapesData:
    images: np.ndarray  # uint8 [n, 3, H, W], or [n, T, 3, H, W] for clips
    objects: list[SampleObjects]


def make_shapes(
    n: int,
    *,
    size: int = 112,
    max_objects: int = 3,
    seed: int = 0,
    video_frames: int | None = None,
    radius: tuple[float, float] = (0.1, 0.2),
    noise: float = 6.0,
) -> ShapesData:
    """``n`` images (or clips of ``video_frames`` frames) of ``size`` x ``size`` pixels.

    ``radius`` is the range of an object's half-extent as a fraction of ``size``; ``noise`` the standard
    deviation (grey levels) of the background noise.
    """
    if n < 1 or size < 8 or max_objects < 1:
        raise FmprobeError(f"make_shapes needs n >= 1, size >= 8, max_objects >= 1; got {n}, {size}, {max_objects}")
    if video_frames is not None and video_frames < 1:
        raise FmprobeError(f"video_frames must be >= 1 or None, got {video_frames}")
    if not 0 < radius[0] <= radius[1] < 0.5:
        raise FmprobeError(f"radius must satisfy 0 < low <= high < 0.5 (fractions of the size), got {radius}")
    images, objects = [], []
    for i in range(n):
        pixels, objs = _sample(np.random.default_rng([seed, i]), size, max_objects, video_frames, radius, noise, i)
        images.append(pixels if video_frames is not None else pixels[0])
        objects.append(objs)
    return ShapesData(images=np.stack(images), objects=objects)


def _sample(
    rng: np.random.Generator,
    size: int,
    max_objects: int,
    frames: int | None,
    radius: tuple[float, float],
    noise: float,
    index: int,
) -> tuple[np.ndarray, SampleObjects]:
    """``[F, 3, H, W]`` uint8 frames and the objects of one sample."""
    k = int(rng.integers(1, max_objects + 1))
    radii = rng.uniform(radius[0], radius[1], size=k) * size
    centres = _place(rng, radii, size, k, index)
    shapes = tuple(SHAPES[j] for j in rng.integers(0, len(SHAPES), size=k))
    colours = tuple(list(COLOURS)[j] for j in rng.integers(0, len(COLOURS), size=k))
    n_frames = frames or 1
    angle = rng.uniform(0, 2 * np.pi, size=k)
    speed = rng.uniform(0.01, 0.03, size=k) * size  # pixels per frame
    velocity = np.stack([np.cos(angle), np.sin(angle)], axis=1) * speed[:, None]
    background = rng.uniform(10, 60)

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    out = np.empty((n_frames, 3, size, size), dtype=np.uint8)
    masks = np.zeros((n_frames, k, size, size), dtype=bool)
    boxes = np.zeros((n_frames, k, 4), dtype=np.float32)
    pos = centres.copy()
    for f in range(n_frames):
        canvas = background + rng.normal(0, noise, size=(3, size, size))
        for j in range(k):
            mask = _silhouette(shapes[j], pos[j], radii[j], xs, ys)
            canvas[:, mask] = np.asarray(COLOURS[colours[j]], dtype=np.float64)[:, None]
            masks[f, j] = mask
            boxes[f, j] = mask_box(mask)
        out[f] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        pos, velocity = _bounce(pos + velocity, velocity, radii, size)
    return out, SampleObjects(shapes=shapes, colours=colours, boxes=boxes, masks=masks)


def _place(rng: np.random.Generator, radii: np.ndarray, size: int, k: int, index: int) -> np.ndarray:
    """Centres ``[k, 2]`` (x, y) with every object inside the image and no two bounding squares touching.

    Objects are placed one by one by rejection sampling; a layout where one no longer fits starts over.
    """
    for _ in range(_PLACEMENT_TRIES):
        centres = np.zeros((k, 2))
        for j in range(k):
            tries = rng.uniform(radii[j] + 1, size - radii[j] - 1, size=(_PLACEMENT_TRIES, 2))
            gap = np.abs(tries[:, None] - centres[None, :j]).max(axis=2) - radii[None, :j] - radii[j]
            ok = np.flatnonzero(np.all(gap > 1, axis=1))
            if ok.size == 0:
                break
            centres[j] = tries[ok[0]]
        else:
            return centres
    raise FmprobeError(
        f"sample {index}: could not place {k} non-overlapping objects in {size}x{size} pixels; "
        f"lower max_objects or the radius range"
    )


def _silhouette(shape: str, centre: np.ndarray, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # triangle pointing up: apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
    return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def _bounce(pos: np.ndarray, velocity: np.ndarray, radii: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reflect positions that left ``[r, size - r]`` back inside and reverse that velocity component."""
    lo, hi = radii[:, None] + 0.5, size - radii[:, None] - 0.5
    pos, velocity = pos.copy(), velocity.copy()
    below, above = pos < lo, pos > hi
    pos = np.where(below, 2 * lo - pos, np.where(above, 2 * hi - pos, pos))
    velocity = np.where(below | above, -velocity, velocity)
    return np.clip(pos, lo, hi), velocity


def mask_box(mask: np.ndarray) -> np.ndarray:
    """``(x0, y0, x1, y1)`` of a non-empty ``[H, W]`` mask, x1/y1 exclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise FmprobeError("mask_box: the mask is empty, so it has no bounding box")
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


# ---------------------------------------------------------------------------------------------- files


def write_shapes_dataset(
    out_dir: str | Path,
    n: int,
    *,
    size: int = 112,
    max_objects: int = 3,
    seed: int = 0,
    video_frames: int | None = None,
) -> Path:
    """Write the samples as PNG images (or folders of PNG frames), annotations as ``.npz``, and ``manifest.csv``.

    Manifest columns: ``sample_id``, ``path`` (image file or frame folder), ``annotations`` (npz file, read
    back with :func:`load_objects`), ``group`` (= sample_id; samples are independent), ``num_objects``,
    ``has_circle`` / ``has_square`` / ``has_triangle`` (0/1, a multilabel task) and ``largest_shape`` (the shape
    of the object with the largest mask in the first frame, a multiclass task). Returns the manifest path.
    """
    out_dir = Path(out_dir)
    data = make_shapes(n, size=size, max_objects=max_objects, seed=seed, video_frames=video_frames)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (pixels, objs) in enumerate(zip(data.images, data.objects)):
        sample_id = f"shapes{i:05d}"
        if video_frames is None:
            path = f"images/{sample_id}.png"
            _save_png(pixels, out_dir / path)
        else:
            path = f"frames/{sample_id}"
            for f, frame in enumerate(pixels):
                _save_png(frame, out_dir / path / f"{f:04d}.png")
        annotations = f"annotations/{sample_id}.npz"
        np.savez_compressed(
            out_dir / annotations,
            boxes=objs.boxes,
            masks=np.packbits(objs.masks, axis=-1),
            width=np.int64(size),
            shapes=np.array(objs.shapes),
            colours=np.array(objs.colours),
        )
        areas = objs.masks[0].sum(axis=(1, 2))
        rows.append(
            {
                "sample_id": sample_id,
                "path": path,
                "annotations": annotations,
                "group": sample_id,
                "num_objects": len(objs.shapes),
                **{f"has_{s}": float(s in objs.shapes) for s in SHAPES},
                "largest_shape": objs.shapes[int(np.argmax(areas))],
            }
        )
    manifest = out_dir / "manifest.csv"
    tmp = manifest.with_suffix(".tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)
    tmp.replace(manifest)
    write_text(
        out_dir / "shapes.json",
        json.dumps({"n": n, "size": size, "max_objects": max_objects, "seed": seed, "video_frames": video_frames})
    )
    return manifest


def _save_png(chw: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)), mode="RGB").save(path)


def load_objects(path: str | Path) -> SampleObjects:
    """The annotations :func:`write_shapes_dataset` wrote for one sample."""
    try:
        with np.load(path, allow_pickle=False) as z:
            width = int(z["width"])
            masks = np.unpackbits(z["masks"], axis=-1, count=width).astype(bool)
            return SampleObjects(
                shapes=tuple(str(s) for s in z["shapes"]),
                colours=tuple(str(c) for c in z["colours"]),
                boxes=z["boxes"].astype(np.float32),
                masks=masks,
            )
    except (OSError, KeyError, ValueError) as err:
        raise FmprobeError(f"cannot read shapes annotations '{path}': {err}") from None
