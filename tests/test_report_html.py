"""HTML reports: the run report's calibration and confusion figures, the sweep report, and both rendered
in headless Chromium without console errors or broken images."""

from __future__ import annotations

import re

import pytest
from chromium import needs_chromium, render
from run_factories import base_config, fake_run

from fmprobe.config import parse_config
from fmprobe.experiments.gates import GatesSpec, evaluate_gates
from fmprobe.experiments.leaderboard import build_leaderboard
from fmprobe.experiments.run import run_experiment
from fmprobe.report.sweep import write_board_report

@pytest.fixture(scope="module")
def multiclass_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mc")
    return run_experiment(parse_config(base_config(folder, "multiclass")), progress=False).run_dir


@pytest.fixture(scope="module")
def board_report(tmp_path_factory):
    runs = tmp_path_factory.mktemp("board") / "runs"
    fake_run(runs, "r1", {"lin": {"val": 0.9, "test": 0.92, "ci": (0.88, 0.95)}}, lr=0.1)
    fake_run(runs, "r2", {"lin": {"val": 0.8, "test": 0.7, "ci": (0.6, 0.8), "flags": [("below_baseline", "error")]}})
    gates = evaluate_gates(GatesSpec.model_validate({"criteria": [{"metric": "auroc", "acceptable": 0.85}]}), runs)
    return write_board_report(runs / "board.html", [build_leaderboard(runs)], gates, title="board test")


def test_multiclass_run_report_has_confusion_and_reliability(multiclass_run):
    html = (multiclass_run / "report.html").read_text()
    for figure in ("confusion", "reliability"):
        assert re.search(rf'<img class="{figure}"[^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{{500,}}"', html)
    assert "top-label confidence" in html


def test_board_report_shows_leaderboard_gates_and_recommendation(board_report):
    html = board_report.read_text()
    assert "Recommendation:" in html and "adopt exp/r1/lin" in html
    assert html.index(">exp/r1<") < html.index(">exp/r2<")  # ranked on validation
    assert 'class="l v-reject">reject' in html and "below_baseline" in html
    assert '<th class="l">split</th>' in html and '<td class="l">exp/r1/lin</td>' in html  # criteria, verdicts
    assert "http://" not in html and "https://" not in html  # self-contained


@needs_chromium
def test_reports_render_in_headless_chromium(multiclass_run, board_report, tmp_path):
    for report, expected, images in (
        (multiclass_run / "report.html", ["Each head on test", "equal-count bins", "Results on test"], 3),
        (board_report, ["Leaderboard", "Gates", "Recommendation"], 1),
    ):
        page = render(report, tmp_path, 1400)
        page.check_layout(1400)  # the multiclass subgroup table (a column per predicted class) included
        assert all(text in page.dom for text in expected)
        assert page.dom.count("<img") >= images


def test_multilabel_run_report_shows_detection_where_one_label_alone_is_met(tmp_path):
    import pandas as pd

    config = base_config(tmp_path, "binary")
    manifest = pd.read_csv(config["data"]["manifest"])
    manifest["z"] = (manifest.index // 4) % 2  # a second label, met alone on some rows, beside y on others
    manifest.to_csv(config["data"]["manifest"], index=False)
    config["task"] = {"type": "multilabel", "targets": ["y", "z"]}
    run_dir = run_experiment(parse_config(config), progress=False).run_dir
    html = (run_dir / "report.html").read_text()
    table = re.search(r'<table id="single-label-detection">(.*?)</table>', html, re.S)
    assert table and "only y" in table.group(1) and "only z" in table.group(1)
    assert re.search(r"\d+/\d+</td><td>[\d.]+ \[[\d.]+, [\d.]+\]", table.group(1))


def test_a_reports_heads_are_drawn_side_by_side_into_the_page_one_process_draws(tmp_path, monkeypatch):
    """Each head's figures are drawn in its own forked copy of the process (one per core); the page is byte for
    byte the one drawn in this process alone."""
    import json
    import os

    import pandas as pd

    import fmprobe.report.html as html
    from fmprobe import forks

    config = base_config(tmp_path, "multiclass")
    config["heads"].append({"type": "mlp", "name": "wide", "hidden": 8})
    exp = parse_config(config)
    run_dir = run_experiment(exp, progress=False).run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    curves, predictions = (pd.read_parquet(run_dir / f"{table}.parquet") for table in ("curves", "predictions"))
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    real = html.head_figures

    def recording(*args):
        (drawn / f"{args[-1]}.{os.getpid()}").touch()
        return real(*args)

    monkeypatch.setattr(html, "head_figures", recording)
    monkeypatch.setattr(forks, "cores", lambda: 2)
    side_by_side = html.render_run_report(exp, metrics, curves, "r", predictions)
    assert sorted(p.stem for p in drawn.iterdir()) == ["linear", "wide"]
    assert len({p.suffix for p in drawn.iterdir()}) == 2
    monkeypatch.setattr(forks, "cores", lambda: 1)
    assert html.render_run_report(exp, metrics, curves, "r", predictions) == side_by_side
