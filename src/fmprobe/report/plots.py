"""Figures for the report, returned as base64 PNG so the HTML file is self-contained."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _to_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def training_curves(curves: pd.DataFrame, head: str, metric: str) -> str:
    """Train/val loss and the validation primary metric per epoch, one line per seed."""
    sub = curves[curves["head"] == head]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for seed, g in sub.groupby("seed"):
        axes[0].plot(g["epoch"], g["train_loss"], label=f"train s{seed}", alpha=0.8)
        axes[0].plot(g["epoch"], g["val_loss"], "--", label=f"val s{seed}", alpha=0.8)
        col = f"val_{metric}"
        if col in g:
            axes[1].plot(g["epoch"], g[col], label=f"seed {seed}")
        tcol = f"train_{metric}"
        if tcol in g:
            axes[1].plot(g["epoch"], g[tcol], ":", alpha=0.6, label=f"train s{seed}")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=6)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel(metric)
    axes[1].legend(fontsize=6)
    fig.suptitle(f"{head}: training curves", fontsize=10)
    return _to_base64(fig)


def metric_bars(names: list[str], values: list[float], lows: list[float], highs: list[float],
                baseline: list[float | None], title: str) -> str:
    """Per-class (or per-target) values with CI whiskers and the baseline as a tick."""
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names) + 2), 3))
    x = range(len(names))
    err = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
    ax.bar(x, values, yerr=err, capsize=4, color="#4c78a8")
    for i, b in enumerate(baseline):
        if b is not None:
            ax.plot([i - 0.4, i + 0.4], [b, b], color="#e45756", lw=2, label="baseline" if i == 0 else None)
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    if any(b is not None for b in baseline):
        ax.legend(fontsize=7)
    return _to_base64(fig)
