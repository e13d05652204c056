"""HTML reports: the run report's calibration and confusion figures, the sweep report, and both rendered
in headless Chromium without console errors or broken images."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from run_factories import base_config, fake_run

from fmprobe.config import parse_config
from fmprobe.experiments.gates import GatesSpec, evaluate_gates
from fmprobe.experiments.leaderboard import build_leaderboard
from fmprobe.experiments.run import run_experiment
from fmprobe.report.sweep import write_board_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000"]
# Appended to a copy of the report: counts images that failed to decode once the page has loaded.
PROBE = ("<script>window.addEventListener('load',()=>{document.body.setAttribute('data-broken-images',"
         "[...document.images].filter(i=>!i.complete||i.naturalWidth===0).length);});</script>")


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
        assert re.search(rf'<img id="{figure}"[^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{{500,}}"', html)
    assert "top-label confidence" in html


def test_board_report_shows_leaderboard_gates_and_recommendation(board_report):
    html = board_report.read_text()
    assert "Recommendation:" in html and "adopt exp/r1/lin" in html
    assert html.index(">exp/r1<") < html.index(">exp/r2<")  # ranked on validation
    assert 'class="l v-reject">reject' in html and "below_baseline" in html
    assert '<th class="l">split</th>' in html and '<td class="l">exp/r1/lin</td>' in html  # criteria, verdicts
    assert "http://" not in html and "https://" not in html  # self-contained


def _render(report: Path, tmp_path: Path) -> tuple[str, str]:
    page = tmp_path / f"probe-{report.name}"
    page.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, out.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium) — cannot render")
def test_reports_render_in_headless_chromium(multiclass_run, board_report, tmp_path):
    for report, expected, images in (
        (multiclass_run / "report.html", ["Confusion matrix", "Calibration", "Results on test"], 3),
        (board_report, ["Leaderboard", "Gates", "Recommendation"], 1),
    ):
        dom, log = _render(report, tmp_path)
        assert all(text in dom for text in expected)
        assert 'data-broken-images="0"' in dom, "an embedded figure did not decode"
        assert dom.count("<img") >= images
        console = [line for line in log.splitlines() if ":CONSOLE" in line]
        assert not console, console


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
