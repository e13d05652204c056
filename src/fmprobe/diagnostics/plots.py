"""PNG figures of the diagnostics commands, each written atomically to the path it is given.

One function per figure kind: a labelled heatmap (layer x layer alignment, layer x head entropy), bars
(metrics of one pair), a metric-vs-depth curve with CI bands, and attention maps overlaid on the input.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmprobe.atomic import atomic_path  # noqa: E402

MAX_ANNOTATED_CELLS = 400  # above this a heatmap shows colours only; numbers would not be readable


def save(fig: plt.Figure, dest: str | Path) -> Path:
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return dest


def png_base64(path: str | Path) -> str:
    """A written PNG as base64, for embedding in a self-contained HTML page."""
    return base64.b64encode(Path(path).read_bytes()).decode()


def heatmap(
    matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str, xlabel: str, ylabel: str,
    dest: str | Path, vmin: float | None = None, vmax: float | None = None,
) -> Path:
    """A labelled heatmap, values printed in the cells when they fit."""
    m = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.5 * len(cols) + 2), max(3.0, 0.45 * len(rows) + 1.5)))
    image = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if m.size <= MAX_ANNOTATED_CELLS:
        mid = np.nanmean(m) if np.isfinite(m).any() else 0.0
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < mid else "black")
    return save(fig, dest)


def bars(names: Sequence[str], values: Sequence[float], *, title: str, dest: str | Path) -> Path:
    """One bar per named value, the value written above it."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 1.5), 3.2))
    x = np.arange(len(names))
    ax.bar(x, values, color="#4c78a8")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, list(names), rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="#888", lw=0.8)
    ax.set_title(title, fontsize=10)
    return save(fig, dest)


def depth_curves(
    layers: Sequence[str], series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]], *,
    metric: str, title: str, dest: str | Path, baseline: float | None = None,
    positions: Sequence[float] | None = None, xlabel: str = "extraction layer",
) -> Path:
    """``series``: name -> (values, CI lows, CI highs) per layer, drawn as lines with shaded CI bands. ``positions``:
    where each layer sits on the x-axis (its depth); evenly spaced, in the given order, without them."""
    x = np.arange(len(layers), dtype=float) if positions is None else np.asarray(positions, dtype=float)
    order = np.argsort(x, kind="stable")
    span = float(x.max() - x.min()) if len(x) else 0.0
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * min(len(layers), span + 1) + 2), 3.6))
    for name, (values, lows, highs) in series.items():
        v, lo, hi = (np.asarray(a, dtype=float)[order] for a in (values, lows, highs))
        line = ax.plot(x[order], v, marker="o", label=name)[0]
        ax.fill_between(x[order], lo, hi, color=line.get_color(), alpha=0.2)
    if baseline is not None:
        ax.axhline(baseline, color="#e45756", ls="--", lw=1, label="baseline")
    ax.set_xticks(x, [str(layer) for layer in layers], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, dest)


def attention_overlays(
    frames: np.ndarray, maps: dict[str, np.ndarray], *, title: str, dest: str | Path
) -> Path:
    """Rows: the frames, then each named map over them; ``frames`` ``[F, H, W, 3]`` in [0, 1], maps ``[F, h, w]``.

    Each map is stretched over its frame (nearest cell, no smoothing), so one cell is one token.
    """
    n = frames.shape[0]
    fig, axes = plt.subplots(1 + len(maps), n, figsize=(2.2 * n, 2.2 * (1 + len(maps))), squeeze=False)
    height, width = frames.shape[1:3]
    for f in range(n):
        axes[0, f].imshow(frames[f])
        axes[0, f].set_title(f"frame {f}" if n > 1 else "input", fontsize=8)
        for r, (name, m) in enumerate(maps.items(), start=1):
            axes[r, f].imshow(frames[f])
            axes[r, f].imshow(m[f], cmap="inferno", alpha=0.55, extent=(0, width, height, 0), interpolation="nearest")
            if f == 0:
                axes[r, f].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return save(fig, dest)


def probe_attention_maps(frames: np.ndarray, maps: np.ndarray, labels: Sequence[str], *, title: str,
                         dest: str | Path) -> Path:  # fmt: skip
    """Per sample, its input (top) and the attention map over it (bottom), all maps on one colour scale with one
    colourbar. ``frames`` ``[N, H, W, 3]`` in [0, 1]; ``maps`` ``[N, h, w]`` as multiples of uniform attention
    (1 = every token weighted alike), so a near-uniform map looks flat instead of being stretched to full contrast."""
    n = len(maps)
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n + 1.0, 5.4), squeeze=False)
    height, width = frames.shape[1:3]
    top = max(float(np.max(maps)), 1.0)
    image = None
    for i in range(n):
        axes[0, i].imshow(frames[i])
        axes[0, i].set_title(labels[i], fontsize=7)
        axes[1, i].imshow(frames[i])
        image = axes[1, i].imshow(maps[i], cmap="inferno", alpha=0.6, vmin=0.0, vmax=top, interpolation="nearest",
                                  extent=(0, width, height, 0))  # fmt: skip
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("attention", fontsize=8)
    fig.colorbar(image, ax=axes[1, :].tolist(), fraction=0.025, pad=0.02, label="attention x tokens (1 = uniform)")
    fig.suptitle(title, fontsize=9)
    return save(fig, dest)
