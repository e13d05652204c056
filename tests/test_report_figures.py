"""The report's figures, read back from matplotlib: training curves with one colour per seed and one line style
per split in both panels, and the regression figure (predicted against true with the identity line and R², and
the residuals)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fmprobe.report import plots


@pytest.fixture
def figures(monkeypatch):
    caught = []
    monkeypatch.setattr(plots, "_to_base64", lambda fig: caught.append(fig) or "")
    return caught


def test_training_curves_use_one_colour_per_seed_and_one_style_per_split(figures):
    rows = [{"head": "linear", "fold": -1, "seed": seed, "epoch": e, "train_loss": 1 / e + seed, "val_loss": 2 / e,
             "train_auroc": 0.5 + e / 20, "val_auroc": 0.5 + e / 30} for seed in (0, 1, 2) for e in range(1, 6)]
    other = [{**r, "head": "attentive"} for r in rows]
    plots.training_curves(pd.DataFrame(rows + other), "linear", "auroc")
    fig = figures[0]
    for ax in fig.axes:  # loss, then auroc
        lines = ax.get_lines()
        assert len(lines) == 3 * 2  # 3 seeds x (train, val): the other head's curves are not drawn
        styles = {}
        for line in lines:
            styles.setdefault(line.get_color(), []).append(line.get_linestyle())
        assert len(styles) == 3 and all(s == [":", "-"] for s in styles.values())  # a colour per seed: train, val
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["seed 0", "seed 1", "seed 2", "train", "val"]
    train_loss = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    assert [line.get_ydata()[0] for line in train_loss] == [1.0, 2.0, 3.0]  # seeds 0, 1, 2 in the legend's colours
    legend = fig.axes[0].get_legend().legend_handles[:3]
    assert [line.get_color() for line in train_loss] == [h.get_color() for h in legend]
    # the same seed has the same colour in both panels
    loss, metric = ([line.get_color() for line in ax.get_lines()] for ax in fig.axes)
    assert loss == metric


def test_regression_figure_plots_predictions_on_the_identity_line_with_r2_and_residuals(figures):
    rng = np.random.default_rng(0)
    y = rng.random((40, 2))
    pred = y + rng.normal(0, 0.1, (40, 2))
    plots.regression_figure(y, pred, ["gm", "wm"], [0.812, 0.5], "linear: regression on test")
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["gm: R² 0.812", "gm: residuals", "wm: R² 0.500", "wm: residuals"]
    for i in (0, 1):
        scatter, residuals = axes[2 * i].collections[0], axes[2 * i + 1].collections[0]
        assert np.allclose(scatter.get_offsets(), np.c_[y[:, i], pred[:, i]])
        assert np.allclose(residuals.get_offsets(), np.c_[y[:, i], pred[:, i] - y[:, i]])
        identity = axes[2 * i].get_lines()[0]
        assert np.array_equal(identity.get_xdata(), identity.get_ydata())  # y = x over the data's range
        assert identity.get_xdata()[0] <= min(y[:, i].min(), pred[:, i].min())
