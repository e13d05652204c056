"""The pages a researcher reads, rendered in headless Chromium at 1400 px: run reports (multilabel, regression),
the leaderboard, the layers page and the runs index. Each must lay out without horizontal overflow, show its
elements, and show the numbers metrics.json holds."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from chromium import needs_chromium, render
from PIL import Image
from run_factories import fake_run, write_model

from fmprobe.config import parse_config
from fmprobe.experiments.compare_runs import compare_runs
from fmprobe.experiments.run import run_experiment
from fmprobe.report.terminal import fmt

WIDTH = 1400


def write_study(folder: Path, task: str) -> dict:
    """72 images in pairs (one group each) whose brightness level (0-3) carries the targets: two labels (its
    bits) for multilabel, the level itself for regression."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(72):
        level = (i // 2) % 4
        arr = np.clip(rng.normal(40 + 50 * level, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / "img" / f"{i:03d}.png")
        targets = {"bright": level & 1, "dark": 1 - (level >> 1)} if task == "multilabel" else {
            "level": level + rng.normal(0, 0.2)}
        rows.append({"sample_id": f"s{i:03d}", "path": f"img/{i:03d}.png", "group": f"g{i // 2:02d}", **targets})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return {
        "name": f"pages-{task}",
        "data": {"manifest": str(folder / "manifest.csv"), "split_column": None},
        "task": {"type": task, "targets": ["bright", "dark"] if task == "multilabel" else ["level"]},
        "model": {"name": str(write_model(folder / "model")), "layers": [-1]},
        "features": {"cache_dir": str(folder / "cache"), "batch_size": 36},
        "heads": [{"type": "linear", "pooling": "mean"}, {"type": "attentive", "pooling": "attentive", "num_heads": 2}],
        "train": {"epochs": 4, "batch_size": 16, "lr": 0.01, "seeds": [0, 1]},
        "split": {"mode": "generate", "fractions": [0.5, 0.2, 0.3]},
        "eval": {"bootstrap": 50},
        "runs_dir": str(folder / "runs"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pages")
    out = {}
    for task in ("multilabel", "regression"):
        cfg = write_study(folder / task, task)
        cfg["runs_dir"] = str(folder / "runs")  # both runs in one folder, for the runs index
        out[task] = run_experiment(parse_config(cfg), progress=False)
    return out


def cell_text(dom: str, row_attrs: str, cls: str) -> str:
    row = re.search(rf"<tr[^>]*{re.escape(row_attrs)}[^>]*>(.*?)</tr>", dom, re.S).group(1)
    return html.unescape(re.sub(r"<[^>]+>", "", re.search(rf'<td class="{cls}[^"]*">(.*?)</td>', row, re.S).group(1)))


@needs_chromium
@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_run_report_lays_out_at_1400px_and_shows_metrics_json(runs, task, tmp_path):
    result = runs[task]
    m = result.metrics
    page = render(result.run_dir / "report.html", tmp_path, WIDTH)
    page.check_layout(WIDTH)
    dom = page.dom
    best, primary = m["selection"]["best_head"], m["task"]["primary_metric"]
    # the verdict: selected head, its test score and CI, and the runner-up compared on the same samples
    verdict = re.search(r'<div class="verdict" id="verdict">(.*?)</div>', dom, re.S).group(1)
    lo, hi = m["heads"][best]["test_ci"][primary]
    mean = m["heads"][best]["splits"]["test"]["mean"][primary]
    assert f"{best} (selected on validation)" in verdict
    assert f"test {primary} {fmt(mean)} [{fmt(lo)}, {fmt(hi)}]" in verdict
    runner = m["selection"]["runner_up"]
    assert runner["head"] in verdict and f"{runner['difference']:+.4f}" in verdict
    # every headline row holds metrics.json's numbers
    for head, h in m["heads"].items():
        for metric in m["task"]["headline_metrics"]:
            attrs = f'data-head="{head}" data-metric="{metric}"'
            test = h["splits"]["test"]
            assert cell_text(dom, attrs, "test") == f"{fmt(test['mean'][metric])} ± {fmt(test['sd'][metric])}"
            ci = h["test_ci"][metric]
            assert cell_text(dom, attrs, "ci") == f"[{fmt(ci[0])}, {fmt(ci[1])}]"
        figures = re.search(rf'<section class="head-figures" id="figures-{head}">(.*?)</section>', dom, re.S).group(1)
        if task == "multilabel":  # per-label bars and calibration for every head, not only the selected one
            assert 'class="per-class"' in figures and 'class="reliability"' in figures
            cal = h["calibration_seed_mean"]
            caption = re.search(r'<figcaption class="ece">(.*?)</figcaption>', figures, re.S).group(1)
            assert f"<b>{fmt(cal['ece'])}</b>" in caption and f"[{fmt(cal['ci'][0])}, {fmt(cal['ci'][1])}]" in caption
            assert f"{cal['bins']} equal-count bins" in caption
        else:
            assert 'class="regression"' in figures and "per-class" not in figures
    # the configuration: collapsed, only what applied, the loss in words
    config = re.search(r'<details id="config">(.*?)</details>', dom, re.S).group(1)
    assert "strategy: frozen" in config and "lora" not in config and "frames_per_clip" not in config
    assert not re.search(r"\d\.\d{6,}", re.sub(r"<[^>]+>", "", dom.split('id="config"')[0]))  # no 16-digit weights
    if task == "regression":
        rows = re.findall(r'<tr data-metric="([^"]+)"', dom)
        assert "r2" in rows and not any(r.startswith("r2/") for r in rows)  # one target: no duplicate rows
        baseline = cell_text(dom, 'data-head="linear" data-metric="pearson_r"', "baseline")
        assert baseline.startswith("— (") and "nan" not in baseline  # why there is no baseline value


def test_an_ece_interval_above_its_estimate_is_explained(runs):
    from fmprobe.config import load_config
    from fmprobe.report.html import render_run_report

    result = runs["multilabel"]
    exp = load_config(result.run_dir / "config.resolved.yaml")
    curves = pd.read_parquet(result.run_dir / "curves.parquet")
    predictions = pd.read_parquet(result.run_dir / "predictions.parquet")
    m = json.loads(json.dumps(result.metrics))
    notes = []
    for shift in (-0.01, 0.01):  # the estimate inside its interval, then below it
        for h in m["heads"].values():
            cal = h["calibration_seed_mean"]
            cal["ci"] = [cal["ece"] + shift, cal["ece"] + 0.05]
        page = render_run_report(exp, m, curves, result.run_dir.name, predictions)
        notes.append(len(re.findall(r'<span class="ece-bias"> — the interval lies above the estimate', page)))
    assert notes == [0, len(m["heads"])]


def test_runner_up_comparison_is_fmprobes_paired_comparison(runs):
    for result in runs.values():
        m = result.metrics
        runner = m["selection"]["runner_up"]
        same = compare_runs(result.run_dir, result.run_dir, head_a=m["selection"]["best_head"],
                            head_b=runner["head"], n_resamples=m["bootstrap"]["resamples"])
        assert (runner["difference"], runner["ci"], runner["p_value"]) == (same["diff"], [same["lo"], same["hi"]],
                                                                           same["p_value"])  # fmt: skip
        assert runner["distinguishable"] == (same["lo"] > 0 or same["hi"] < 0)


@needs_chromium
def test_leaderboard_page_has_a_title_a_zoomed_forest_and_run_quantities_once(tmp_path):
    from fmprobe.experiments.leaderboard import build_leaderboard
    from fmprobe.report.sweep import write_board_report

    runs_dir = tmp_path / "runs"
    fake_run(runs_dir, "r1", {"lin": {"val": 0.9, "test": 0.92, "ci": (0.90, 0.94)},
                              "att": {"val": 0.88, "test": 0.91, "ci": (0.89, 0.93)}}, wall=12.5)
    fake_run(runs_dir, "r2", {"lin": {"val": 0.8, "test": 0.85, "ci": (0.83, 0.87)}}, lr=0.1, wall=30.0)
    board = build_leaderboard(runs_dir)
    page = render(write_board_report(runs_dir / "board.html", [board], title="Leaderboard of exp"), tmp_path, WIDTH)
    page.check_layout(WIDTH)
    dom = page.dom
    assert "<title>fmprobe · Leaderboard of exp</title>" in dom and "3 heads of 2 runs (exp)" in dom
    assert "wall" not in re.search(r'<table id="leaderboard">(.*?)</table>', dom, re.S).group(1)
    runs_table = re.search(r'<table id="runs">(.*?)</table>', dom, re.S).group(1)
    walls = dict(re.findall(r'data-run="([^"]+)">.*?<td class="wall">([^<]+)</td>', runs_table, re.S))
    assert walls == {"r1": "12.5", "r2": "30.0"}  # once per run, not per head


def test_forest_plot_axis_spans_the_intervals_not_the_baseline(monkeypatch):
    from fmprobe.report import plots

    figures = []
    monkeypatch.setattr(plots, "_to_base64", lambda fig: figures.append(fig) or "")
    plots.forest_plot(["a", "b"], [0.92, 0.91], [0.90, 0.89], [0.94, 0.93], [0.5, 0.5], "auroc")
    left, right = figures[0].axes[0].get_xlim()
    assert 0.85 < left < 0.89 and 0.94 < right < 0.98  # the 0.5 baseline is written at the edge, not plotted
    assert any("baseline 0.5" in t.get_text() for t in figures[0].axes[0].texts)


@needs_chromium
def test_layers_page_draws_each_layer_at_its_depth(tmp_path):
    from fmprobe.experiments.layers import depth_positions, layers_command

    assert depth_positions([0, 6, -1], 12) == [0.0, 6.0, 11.0]  # -1 of 12 blocks sits at 11, not after 6
    assert depth_positions([11, -1], 12) == [11.0, 11.2]  # the same block before and after the final norm
    assert depth_positions([0, "visual.merger"], 12) is None  # a module path has no depth: given order
    exp = parse_config(write_study(tmp_path / "study", "multilabel"))
    summary = layers_command(exp, [0, -1], ["linear"], progress=False)
    assert [row["depth"] for row in summary["rows"]] == [0.0, 1.0] and summary["blocks"] == 2
    page = render(Path(summary["run_dir"]) / "layers.html", tmp_path, WIDTH)
    page.check_layout(WIDTH)
    assert 'id="layers-figure"' in page.dom and "The backbone has\n2 blocks" in page.dom


@needs_chromium
def test_runs_index_lists_finished_failed_and_unfinished_runs(runs, tmp_path):
    from fmprobe.experiments.overview import runs_index_command

    runs_dir = runs["multilabel"].run_dir.parents[1]
    failed = runs_dir / "pages-broken" / "20990101-000000-aaaaaaaa"
    failed.mkdir(parents=True)
    (failed / "config.resolved.yaml").write_text("name: pages-broken\n")
    (failed / "status.json").write_text(json.dumps({"status": "failed", "error": "ReaderError: s001 unreadable"}))
    unfinished = runs_dir / "pages-broken" / "20990101-000001-bbbbbbbb"
    unfinished.mkdir()
    (unfinished / "config.resolved.yaml").write_text("name: pages-broken\n")
    page_path, counts = runs_index_command(runs_dir)
    assert counts == {"unfinished": 1, "failed": 1, "finished": 2}
    page = render(page_path, tmp_path, WIDTH)
    page.check_layout(WIDTH)
    dom = page.dom
    statuses = dict(re.findall(r'<tr data-run="([^"]+)" data-status="([^"]+)"', dom))
    assert statuses[failed.name] == "failed" and statuses[unfinished.name] == "unfinished"
    assert "ReaderError: s001 unreadable" in dom
    for result in runs.values():
        m, run_id = result.metrics, result.run_dir.name
        assert statuses[run_id] == "finished"
        h = m["heads"][m["selection"]["best_head"]]
        primary = m["task"]["primary_metric"]
        row = f'data-run="{run_id}"'
        assert cell_text(dom, row, "test") == f"{primary} {fmt(h['splits']['test']['mean'][primary])}"
        assert cell_text(dom, row, "ci") == f"[{fmt(h['test_ci'][primary][0])}, {fmt(h['test_ci'][primary][1])}]"
        assert f'href="{result.run_dir.parent.name}/{run_id}/report.html"' in dom


def test_probe_attention_maps_share_one_scale_with_a_colourbar_over_the_input(monkeypatch, tmp_path):
    from fmprobe.diagnostics import plots

    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, dest: figures.append(fig) or Path(dest))
    frames = np.random.default_rng(0).random((3, 32, 32, 3))
    maps = np.stack([np.full((4, 4), 1.0), np.eye(4) * 4.0, np.pad(np.full((1, 1), 16.0), ((0, 3), (0, 3)))])
    plots.probe_attention_maps(frames, maps, ["s1\ngrey_matter\nH = 1.000", "s2\nnone\nH = 0.500",
                                             "s3\nwhite\nH = 0.000"], title="attentive", dest=tmp_path / "m.png")
    fig = figures[0]
    overlays = [ax.images[1] for ax in fig.axes[3:6]]
    assert {im.get_clim() for im in overlays} == {(0.0, 16.0)}  # one scale: the uniform map stays flat and dark
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    assert [ax.images[0].get_array().shape for ax in fig.axes[:3]] == [(32, 32, 3)] * 3  # the input above
    assert [ax.get_title() for ax in fig.axes[:3]][0] == "s1\ngrey_matter\nH = 1.000"


def test_readme_shows_the_demo_reports_that_the_screenshot_script_writes():
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_screenshots", root / "docs" / "make_screenshots.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shown = re.findall(r"!\[[^\]]*\]\((docs/report-[^)]+\.png)\)", (root / "README.md").read_text())
    assert sorted(shown) == sorted(f"docs/{name}" for name in script.SHOTS.values())  # multilabel and regression
    for name in shown:
        with Image.open(root / name) as image:
            assert image.width == script.WIDTH and image.height > 600  # a page, not a broken capture
