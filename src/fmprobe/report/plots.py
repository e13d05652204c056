"""Figures for the report, returned as base64 PNG so the HTML file is self-contained."""

from __future__ import annotations

import base64
import io
import math

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
    # Percentile bounds can sit a rounding error past the point estimate: whiskers never go negative.
    err = [[max(0.0, v - lo) for v, lo in zip(values, lows)], [max(0.0, hi - v) for v, hi in zip(values, highs)]]
    ax.bar(x, values, yerr=err, capsize=4, color="#4c78a8")
    for i, b in enumerate(baseline):
        if b is not None:
            ax.plot([i - 0.4, i + 0.4], [b, b], color="#e45756", lw=2, label="baseline" if i == 0 else None)
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    if any(b is not None for b in baseline):
        ax.legend(fontsize=7)
    return _to_base64(fig)


def reliability_diagram(calibration_by_seed: dict[str, dict], title: str) -> str:
    """Reliability curves (observed frequency vs mean predicted probability) per seed and curve, with the
    diagonal of perfect calibration; the legend carries each curve's ECE."""
    names = list(next(iter(calibration_by_seed.values()))["curves"])
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot([0, 1], [0, 1], ":", color="#888", lw=1)
        for seed, cal in calibration_by_seed.items():
            c = cal["curves"][name]
            ax.plot(c["prob_pred"], c["prob_true"], "o-", ms=3, alpha=0.8, label=f"seed {seed} (ECE {c['ece']:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _to_base64(fig)


def confusion_matrix_plot(matrix, class_names: list[str], title: str) -> str:  # noqa: ANN001 (array-like)
    """Row-normalised confusion matrix (true class per row) with the counts written in each cell."""
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    norm = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(3.2, 0.55 * len(class_names) + 1.8)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ticks = range(len(class_names))
    ax.set_xticks(list(ticks), class_names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(list(ticks), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_title(title, fontsize=10)
    return _to_base64(fig)


def forest_plot(labels: list[str], points: list[float], lows: list[float], highs: list[float],
                baselines: list[float | None], metric: str, levels: dict[str, float] | None = None) -> str:
    """One row per candidate: test point with its CI, the baseline as a red tick, gate levels as lines."""
    import numpy as np

    n = len(labels)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * n + 1.4))
    y = np.arange(n)[::-1]
    p = np.asarray(points, dtype=float)
    lo = np.where(np.isnan(lows), p, lows)
    hi = np.where(np.isnan(highs), p, highs)
    # a point on (or, by rounding, a hair beyond) a percentile CI end: a zero-length arm, not matplotlib's error
    ax.errorbar(p, y, xerr=np.maximum([p - lo, hi - p], 0), fmt="o", color="#4c78a8", capsize=3, ms=4)
    for yi, b in zip(y, baselines):
        if b is not None and b == b:
            ax.plot([b, b], [yi - 0.3, yi + 0.3], color="#e45756", lw=2)
    for name, value in (levels or {}).items():
        ax.axvline(value, ls="--", lw=1, color="#54a24b" if name == "target" else "#888")
        ax.text(value, n - 0.4, name, fontsize=7, rotation=90, va="bottom", ha="right")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel(f"test {metric} (point and CI; red: baseline)")
    ax.set_ylim(-0.7, n - 0.3 + (0.8 if levels else 0))
    return _to_base64(fig)


def label_curves(series: dict[str, tuple[list[float], list[float], list[float], list[float]]], *, protocol: str,
                 metric: str, baseline: float | None, target: float | None, title: str) -> str:
    """Label-efficiency curves: per series (a head, or a run's head), the mean over repeats against the label
    budget with its interval as a band; budgets that could not be drawn are gaps. ``series``: label -> (budgets,
    means, lows, highs); x is K per class (log 2) or the share of training groups (log)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, (x, mean, lo, hi) in series.items():
        line = ax.plot(x, mean, "o-", ms=4, label=label)[0]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    if baseline is not None and not math.isnan(baseline):
        ax.axhline(baseline, ls="--", lw=1, color="#e45756", label="baseline")
    if target is not None:
        ax.axhline(target, ls=":", lw=1.2, color="#54a24b", label=f"target {target:g}")
    ax.set_xscale("log", base=2 if protocol == "shots" else 10)
    budgets = sorted({v for x, *_ in series.values() for v in x})
    if budgets:
        ax.set_xticks(budgets, [f"{v:g}" if protocol == "shots" else f"{v:.0%}" for v in budgets], fontsize=8)
        ax.minorticks_off()
    ax.set_xlabel("labelled examples per class (K)" if protocol == "shots" else "share of training groups labelled")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _to_base64(fig)
