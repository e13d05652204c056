"""Figures for the report, returned as base64 PNG so the HTML file is self-contained."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _to_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


SPLIT_STYLES = {"train": ":", "val": "-"}  # one line style per split, one colour per seed, in every curve panel


def _seed_colours(seeds: list) -> dict:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {seed: cycle[i % len(cycle)] for i, seed in enumerate(seeds)}


def _seed_split_legend(ax, colours: dict, splits: list[str]) -> None:  # noqa: ANN001 (matplotlib Axes)
    """One legend per panel: a colour per seed, a line style per split."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=f"seed {seed}") for seed, c in colours.items()]
    handles += [Line2D([], [], color="#444", ls=SPLIT_STYLES[s], label=s) for s in splits]
    ax.legend(handles=handles, fontsize=7, ncol=2)


def training_curves(curves: pd.DataFrame, head: str, metric: str) -> str:
    """Loss (left) and the primary metric (right) per epoch: one colour per seed, train dotted, val solid."""
    sub = curves[curves["head"] == head]
    colours = _seed_colours(sorted(sub["seed"].unique()))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    shown: list[set[str]] = [set(), set()]
    for (seed, _fold), g in sub.groupby(["seed", "fold"] if "fold" in sub else ["seed", "seed"]):
        for i, columns in enumerate((("train_loss", "val_loss"), (f"train_{metric}", f"val_{metric}"))):
            for split, col in zip(("train", "val"), columns):
                if col in g and g[col].notna().any():
                    axes[i].plot(g["epoch"], g[col], SPLIT_STYLES[split], color=colours[seed], alpha=0.85, lw=1.2)
                    shown[i].add(split)
    for ax, ylabel, splits in zip(axes, ("loss", metric), shown):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        _seed_split_legend(ax, colours, [s for s in SPLIT_STYLES if s in splits])
    fig.suptitle(f"{head}: training curves", fontsize=10)
    return _to_base64(fig)


def reference_figure_seconds(clock: Callable[[], float]) -> float:
    """Seconds this machine takes, now, to draw and encode one report figure (training curves of 3 seeds x 40
    epochs, by ``clock``): the unit in which a run's evaluation and report are costed before any run has
    measured them."""
    curves = pd.DataFrame([{"head": "h", "fold": -1, "seed": seed, "epoch": e, "train_loss": 1 / e,
                            "val_loss": 1.1 / e, "train_m": 1 - 1 / e, "val_m": 0.9 - 1 / e}
                           for seed in range(3) for e in range(1, 41)])  # fmt: skip
    start = clock()
    training_curves(curves, "h", "m")
    return clock() - start


def per_class_bars(groups: list[tuple[str, list[str], list[float], list[float], list[float], list[float | None]]],
                   title: str) -> str:  # fmt: skip
    """One panel per metric (``(metric, names, values, CI lows, CI highs, baselines)``): a bar per class or target
    with its CI whiskers, the baseline as a red tick."""
    width = sum(max(2.4, 0.55 * len(names) + 1.2) for _, names, *_ in groups)
    fig, axes = plt.subplots(1, len(groups), figsize=(min(max(width, 4.0), 11.0), 3.2), squeeze=False)
    for ax, (metric, names, values, lows, highs, baseline) in zip(axes[0], groups):
        x = range(len(names))
        # Percentile bounds can sit a rounding error past the point estimate: whiskers never go negative.
        err = [[max(0.0, v - lo) for v, lo in zip(values, lows)], [max(0.0, hi - v) for v, hi in zip(values, highs)]]
        ax.bar(x, values, yerr=err, capsize=3, color="#4c78a8")
        for i, b in enumerate(baseline):
            if b is not None and b == b:
                ax.plot([i - 0.4, i + 0.4], [b, b], color="#e45756", lw=2, label="baseline" if i == 0 else None)
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        if any(b is not None and b == b for b in baseline):
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _to_base64(fig)


def reliability_diagram(seed_mean: dict, per_seed: dict[str, dict], title: str) -> str:
    """Per curve (class, label or top label): the seed-mean reliability curve over equal-count bins, each point
    marked with its bin's count, the seeds' curves faint, and the diagonal of perfect calibration."""
    names = list(seed_mean["curves"])
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot([0, 1], [0, 1], ":", color="#888", lw=1)
        for seed, cal in per_seed.items():
            c = cal["curves"][name]
            ax.plot(c["prob_pred"], c["prob_true"], "-", color="#9ab", lw=0.8, alpha=0.7,
                    label="each seed" if seed == next(iter(per_seed)) else None)
        c = seed_mean["curves"][name]
        ax.plot(c["prob_pred"], c["prob_true"], "o-", color="#4c78a8", ms=4, label=f"seed mean (ECE {c['ece']:.3f})")
        for x, y, n in zip(c["prob_pred"], c["prob_true"], c["count"]):
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, -9), fontsize=6, color="#555")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _to_base64(fig)


def regression_figure(y_true: np.ndarray, y_pred: np.ndarray, targets: list[str], r2: list[float], title: str) -> str:
    """Per target: predicted against true with the identity line and R² (left), residuals against the true value
    (right). ``y_true``, ``y_pred``: ``[N, T]``, the prediction being the seed mean."""
    n = len(targets)
    fig, axes = plt.subplots(n, 2, figsize=(8.4, 3.3 * n), squeeze=False)
    for i, name in enumerate(targets):
        t, p = y_true[:, i], y_pred[:, i]
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        ax = axes[i, 0]
        ax.scatter(t, p, s=10, alpha=0.6, color="#4c78a8")
        ax.plot([lo, hi], [lo, hi], "--", color="#888", lw=1, label="identity")
        ax.set_xlabel(f"true {name}", fontsize=8)
        ax.set_ylabel(f"predicted {name}", fontsize=8)
        ax.set_title(f"{name}: R² {r2[i]:.3f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax = axes[i, 1]
        ax.scatter(t, p - t, s=10, alpha=0.6, color="#4c78a8")
        ax.axhline(0, color="#888", ls="--", lw=1)
        ax.set_xlabel(f"true {name}", fontsize=8)
        ax.set_ylabel("residual (predicted - true)", fontsize=8)
        ax.set_title(f"{name}: residuals", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _to_base64(fig)


def confusion_matrix_plot(matrix, class_names: list[str], title: str) -> str:  # noqa: ANN001 (array-like)
    """Row-normalised confusion matrix (true class per row) with the counts written in each cell."""
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
    """One row per candidate: test point with its CI, the baseline as a red tick, gate levels as lines. The axis
    spans the CIs and the levels, so intervals stay readable; a baseline off that range is written at the edge."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * n + 1.4))
    y = np.arange(n)[::-1]
    p = np.asarray(points, dtype=float)
    lo = np.where(np.isnan(lows), p, lows)
    hi = np.where(np.isnan(highs), p, highs)
    # a point on (or, by rounding, a hair beyond) a percentile CI end: a zero-length arm, not matplotlib's error
    ax.errorbar(p, y, xerr=np.maximum([p - lo, hi - p], 0), fmt="o", color="#4c78a8", capsize=3, ms=4)
    span = np.concatenate([lo, hi, list((levels or {}).values())])
    span = span[np.isfinite(span)]
    left, right = (float(span.min()), float(span.max())) if span.size else (0.0, 1.0)
    pad = max(0.08 * (right - left), 1e-3)
    left, right = left - pad, right + pad
    for yi, b in zip(y, baselines):
        if b is None or b != b:
            continue
        if left <= b <= right:
            ax.plot([b, b], [yi - 0.3, yi + 0.3], color="#e45756", lw=2)
        else:  # off the zoomed axis: say where it is
            edge, arrow, align = (left, "←", "left") if b < left else (right, "→", "right")
            ax.text(edge, yi, f"{arrow} baseline {b:.3g}" if b < left else f"baseline {b:.3g} {arrow}",
                    color="#e45756", fontsize=6, va="center", ha=align)
    for name, value in (levels or {}).items():
        ax.axvline(value, ls="--", lw=1, color="#54a24b" if name == "target" else "#888")
        ax.text(value, n - 0.4, name, fontsize=7, rotation=90, va="bottom", ha="right")
    ax.set_xlim(left, right)
    ax.grid(axis="x", color="#eee", lw=0.8)
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
