"""Results index (SQLite over run directories) and the leaderboard built on it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from contextlib import closing

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from run_factories import add_fake_segmentation, fake_run

from fmprobe.errors import FmprobeError
from fmprobe.experiments.index import SCHEMA_VERSION, index_path, query, update_index
from fmprobe.experiments.leaderboard import build_leaderboard, print_leaderboard
from fmprobe.report.sweep import write_board_report


def test_index_follows_the_run_directories(tmp_path):
    runs = tmp_path / "runs"
    a = fake_run(runs, "r1", {"lin": {"val": 0.9, "test": 0.8, "ci": (0.7, 0.88)}}, lr=0.1)
    b = fake_run(runs, "r2", {"lin": {"val": 0.7, "test": 0.75, "ci": (0.6, 0.85)},
                              "mlp": {"val": 0.8, "test": 0.7, "ci": (0.6, 0.8), "flags": [("overfit_gap", "warning")]}})
    assert update_index(runs) == index_path(runs)
    heads = query(runs, "SELECT run_dir, head, selected, flags FROM heads ORDER BY run_dir, head")
    assert heads[["head", "selected"]].values.tolist() == [["lin", 1], ["lin", 0], ["mlp", 1]]
    assert json.loads(heads.loc[2, "flags"]) == ["overfit_gap"]
    test = query(runs, "SELECT * FROM metrics WHERE split = 'test' AND head = 'lin' ORDER BY run_dir")
    assert test[["mean", "ci_lo", "ci_hi", "baseline"]].values.tolist() == [[0.8, 0.7, 0.88, 0.5], [0.75, 0.6, 0.85, 0.5]]

    # a rewritten metrics.json is re-read; a deleted run disappears
    m = json.loads((a / "metrics.json").read_text())
    m["heads"]["lin"]["splits"]["test"]["mean"]["auroc"] = 0.81
    (a / "metrics.json").write_text(json.dumps(m))
    shutil.rmtree(b)
    update_index(runs)
    assert query(runs, "SELECT mean FROM metrics WHERE split='test'")["mean"].tolist() == [0.81]
    assert query(runs, "SELECT COUNT(*) AS n FROM runs")["n"].item() == 1


def test_leaderboard_ranks_on_validation_and_shows_what_varies(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "r1", {"lin": {"val": 0.70, "test": 0.95, "ci": (0.9, 0.99)}}, lr=0.1, wall=3.0)
    fake_run(runs, "r2", {"lin": {"val": 0.90, "test": 0.80, "ci": (0.7, 0.88)}}, lr=0.01)
    board = build_leaderboard(runs)
    t = board.table
    # validation decides the order, even though r1 has the better test number
    assert t["run_id"].tolist() == ["r2", "r1"] and t["rank"].tolist() == [1, 2]
    assert board.metric == "auroc" and board.params == ["train.lr"]
    assert t["train.lr"].tolist() == ["0.01", "0.1"]
    assert t.loc[1, ["test_mean", "ci_lo", "ci_hi", "baseline", "n_seeds", "wall_seconds"]].tolist() == \
        [0.95, 0.9, 0.99, 0.5, 2, 3.0]
    board.to_csv(tmp_path / "lb.csv")
    csv = pd.read_csv(tmp_path / "lb.csv")
    assert csv["run_id"].tolist() == ["r2", "r1"] and "train.lr" in csv


def test_lower_is_better_metric_ranks_ascending_and_mixed_metrics_need_a_choice(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "r1", {"lin": {"val": 3.0, "test": 3.0, "ci": (2, 4)}}, primary="mae", experiment="reg")
    fake_run(runs, "r2", {"lin": {"val": 2.0, "test": 2.0, "ci": (1, 3)}}, primary="mae", experiment="reg")
    fake_run(runs, "r3", {"lin": {"val": 0.9, "test": 0.9, "ci": (0.8, 1)}})
    with pytest.raises(FmprobeError, match="different primary metrics"):
        build_leaderboard(runs)
    assert build_leaderboard(runs, experiment="reg").table["run_id"].tolist() == ["r2", "r1"]
    with pytest.raises(FmprobeError, match="no finished run of experiment 'nope'"):
        build_leaderboard(runs, experiment="nope")


def test_a_missing_runs_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FmprobeError, match="does not exist"):
        update_index(tmp_path / "nothing")


# --- parameters, segmentation, grid choice; the schema migration; candidates without the metric -------------


def _edit(run_dir, change):
    m = json.loads((run_dir / "metrics.json").read_text())
    change(m)
    (run_dir / "metrics.json").write_text(json.dumps(m))


def _printed(board) -> str:
    console = Console(record=True, width=400)
    print_leaderboard(console, board)
    return console.export_text()


def test_index_and_leaderboard_carry_total_params_segmentation_and_grid_choice(tmp_path):
    runs = tmp_path / "runs"
    r1 = fake_run(runs, "r1", {"lin": {"val": 0.9, "test": 0.8, "ci": (0.7, 0.9), "params": 100, "total": 9100},
                               "mlp": {"val": 0.8, "test": 0.8, "ci": (0.7, 0.9)}})
    frozen = add_fake_segmentation(r1, {"segmentation": 0.7})  # one decoder, shared by both heads
    r2 = fake_run(runs, "r2", {"lin": {"val": 0.7, "test": 0.7, "ci": (0.6, 0.8)}})
    add_fake_segmentation(r2, {"lin": 0.5})  # adapted: the head's own decoder
    r3 = fake_run(runs, "r3", {"lin": {"val": 0.6, "test": 0.6, "ci": (0.5, 0.7)}})  # no segmentation
    _edit(r3, lambda m: m["selection"].update(grid={"heads": {"lin": {"chosen": "lin/lr0.1/wd0"}}}))

    update_index(runs)
    seg = query(runs, "SELECT run_dir, head, mean, ci_lo, ci_hi, baseline FROM metrics "
                      "WHERE metric = 'seg/miou' AND split = 'test' ORDER BY run_dir, head")
    test = frozen["decoders"]["segmentation"]["splits"]["test"]["mean"]["miou"]
    lo, hi = frozen["decoders"]["segmentation"]["test_ci"]["miou"]
    assert seg["head"].tolist() == ["lin", "mlp", "lin"]
    assert seg.loc[0, ["mean", "ci_lo", "ci_hi", "baseline"]].tolist() == \
        pytest.approx([test, lo, hi, frozen["baseline"]["test"]["miou"]])
    assert seg.loc[1, "mean"] == seg.loc[0, "mean"] and seg.loc[2, "mean"] == pytest.approx(0.49)
    assert query(runs, "SELECT COUNT(*) AS n FROM metrics WHERE metric = 'seg/iou/fg'")["n"].item() == 3 * 3

    board = build_leaderboard(runs)
    t = board.table.set_index(["run_id", "head"])
    assert t.loc[("r1", "lin"), ["trainable_params", "total_params"]].tolist() == [100, 9100]
    assert t.loc[("r1", "mlp"), "seg_miou"] == pytest.approx(test) and np.isnan(t.loc[("r3", "lin"), "seg_miou"])
    assert t.loc[("r3", "lin"), "grid_member"] == "lin/lr0.1/wd0"
    text = _printed(board)
    assert "100 / 9,100" in text and "seg mIoU (test)" in text and f"{test:.3f} [{lo:.3f}, {hi:.3f}]" in text
    assert "lin/lr0.1/wd0" in text and "not ranked" not in text
    board.to_csv(tmp_path / "lb.csv")
    csv = pd.read_csv(tmp_path / "lb.csv").set_index(["run_id", "head"])
    assert csv.loc[("r1", "lin"), "total_params"] == 9100 and csv.loc[("r2", "lin"), "seg_miou"] == pytest.approx(0.49)
    html = write_board_report(tmp_path / "lb.html", [board], title="t").read_text()
    assert "params (trainable / total)" in html and "100 / 9,100" in html and "seg mIoU (test)" in html

    # ranked on the decoder's validation mIoU; the run without segmentation is listed, not silently blank
    board = build_leaderboard(runs, metric="seg/miou")
    assert board.table["run_id"].tolist() == ["r1", "r1", "r2"] and board.missing == ["exp/r3/lin"]
    assert not board.shows_segmentation  # the ranked metric already is the mIoU
    assert "not ranked: 1 candidate(s) have no seg/miou on val and test: exp/r3/lin" in _printed(board)
    html = write_board_report(tmp_path / "seg.html", [board], title="t").read_text()
    assert 'id="not-ranked"' in html and "exp/r3/lin" in html


def test_metrics_the_leaderboard_cannot_rank_on_are_refused_with_what_there_is(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "r1", {"lin": {"val": 0.9, "test": 0.8, "ci": (0.7, 0.9)}})
    with pytest.raises(FmprobeError, match="no run has metric 'seg/miou' on val and test \\(the runs have: auroc\\)"):
        build_leaderboard(runs, metric="seg/miou")
    with pytest.raises(FmprobeError, match="'total_params' is shown in every row, not a metric to rank on"):
        build_leaderboard(runs, metric="total_params")


# The index as the first fmprobe wrote it (no user_version, no heads.total_params, no segmentation rows).
OLD_SCHEMA = """
CREATE TABLE runs (run_dir TEXT PRIMARY KEY, experiment TEXT, run_id TEXT, config_hash TEXT, metrics_mtime REAL,
  task_type TEXT, primary_metric TEXT, model TEXT, seeds TEXT, n_seeds INTEGER, ci_level REAL,
  best_head TEXT, wall_seconds REAL, git_sha TEXT);
CREATE TABLE heads (run_dir TEXT, head TEXT, type TEXT, pooling TEXT, layer TEXT, trainable_params INTEGER,
  selected INTEGER, flags TEXT, error_flags INTEGER, PRIMARY KEY (run_dir, head));
CREATE TABLE metrics (run_dir TEXT, head TEXT, split TEXT, metric TEXT, mean REAL, sd REAL, ci_lo REAL, ci_hi REAL,
  baseline REAL, PRIMARY KEY (run_dir, head, split, metric));
CREATE TABLE params (run_dir TEXT, key TEXT, value TEXT, PRIMARY KEY (run_dir, key));
"""


def test_an_index_of_the_old_schema_is_migrated_and_its_runs_read_again(tmp_path):
    runs = tmp_path / "runs"
    new = fake_run(runs, "new", {"lin": {"val": 0.9, "test": 0.8, "ci": (0.7, 0.9), "params": 7, "total": 5007}})
    add_fake_segmentation(new, {"segmentation": 0.6})
    old = fake_run(runs, "old", {"lin": {"val": 0.8, "test": 0.7, "ci": (0.6, 0.8), "params": 7, "total": None}})
    with closing(sqlite3.connect(index_path(runs))) as con, con:  # as the old fmprobe left it: both runs up to date
        con.executescript(OLD_SCHEMA)
        for run in (new, old):
            mtime = (run / "metrics.json").stat().st_mtime
            con.execute("INSERT INTO runs VALUES (?, 'exp', ?, 'h', ?, 'binary', 'auroc', 'm', '[0, 1]', 2, 0.95, "
                        "'lin', 10.0, NULL)", (str(run.resolve()), run.name, mtime))
            con.execute("INSERT INTO heads VALUES (?, 'lin', 'linear', 'mean', '-1', 7, 1, '[]', 0)", (str(run.resolve()),))
            for split in ("val", "test"):
                con.execute("INSERT INTO metrics VALUES (?, 'lin', ?, 'auroc', 0.5, 0.0, NULL, NULL, NULL)",
                            (str(run.resolve()), split))
    board = build_leaderboard(runs)
    t = board.table.set_index("run_id")
    assert t.loc["new", "total_params"] == 5007 and t.loc["new", "test_mean"] == 0.8  # re-read, not the stale 0.5
    assert t.loc["new", "seg_miou"] == pytest.approx(0.59) and np.isnan(t.loc["old", "seg_miou"])
    assert pd.isna(t.loc["old", "total_params"]) and "7 / ?" in _printed(board)  # the old run never recorded it
    assert query(runs, "PRAGMA user_version")["user_version"].item() == SCHEMA_VERSION
    assert build_leaderboard(runs, metric="seg/miou").missing == ["exp/old/lin"]

    with closing(sqlite3.connect(index_path(runs))) as con, con:
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(FmprobeError, match="written by a newer fmprobe"):
        update_index(runs)


def test_board_report_draws_a_point_that_rounding_puts_a_hair_outside_its_ci(tmp_path):
    runs = tmp_path / "runs"  # a percentile CI end equal to the point, off by one ulp after averaging
    fake_run(runs, "r1", {"lin": {"val": 0.9, "test": 0.8, "ci": (0.8 + 1e-16 * 2, 0.9)}})
    html = write_board_report(tmp_path / "lb.html", [build_leaderboard(runs)], title="t").read_text()
    assert 'id="forest"' in html


def test_runs_that_never_saw_each_other_are_flagged_on_both_sides_by_the_index(toy_study, tmp_path):
    """Two runs finishing together (a parallel sweep) each compared themselves with nothing: the index compares
    every finished run, flags both in metrics.json, report.html and the leaderboard, and drops the flag with the
    twin."""
    from fmprobe.config import parse_config
    from fmprobe.experiments.run import run_experiment

    first = run_experiment(parse_config(toy_study("binary", n=45, train={"epochs": 2})), progress=False).run_dir
    twin = first.parent / "20990101-000000-twin"  # the same outputs under another configuration, written unseen
    shutil.copytree(first, twin)
    m = json.loads((twin / "metrics.json").read_text())
    m["prediction_hashes"]["linear"][0] = "another-configuration"
    m["config_hash"] = "another-run"
    (twin / "metrics.json").write_text(json.dumps(m))
    assert "identical_predictions" not in (first / "metrics.json").read_text()

    board = build_leaderboard(tmp_path / "runs")
    assert all("identical_predictions" in row for row in board.table["flags"]) and len(board.table) == 2
    for run, other in ((first, twin), (twin, first)):
        metrics = json.loads((run / "metrics.json").read_text())
        flag = next(f for f in metrics["heads"]["linear"]["flags"] if f["name"] == "identical_predictions")
        assert flag["severity"] == "error" and flag["details"]["identical"] == [f"toy/{other.name}/linear"]
        assert "identical_predictions" in (run / "report.html").read_text()
    update_index(tmp_path / "runs")  # nothing changed: nothing rewritten, no flag twice
    assert json.loads((first / "metrics.json").read_text())["flags"].count(flag | {"head": "linear"}) <= 1

    shutil.rmtree(twin)
    update_index(tmp_path / "runs")
    assert "identical_predictions" not in (first / "metrics.json").read_text()
    assert "identical_predictions" not in (first / "report.html").read_text()


def test_a_run_whose_outputs_cannot_be_compared_keeps_the_twin_flag_it_has(tmp_path):
    """A run from an older fmprobe (no recorded output hash, a config this version cannot read) is not judged: the
    index leaves its identical-outputs flag as recorded rather than dropping it unseen."""
    heads = {"lin": {"val": 0.9, "test": 0.8, "ci": (0.7, 0.9), "flags": [("identical_predictions", "error")]}}
    run = fake_run(tmp_path / "runs", "old", heads)
    before = (run / "metrics.json").read_text()
    update_index(tmp_path / "runs")
    assert (run / "metrics.json").read_text() == before
    assert build_leaderboard(tmp_path / "runs").table["flags"].tolist() == [["identical_predictions"]]
