"""Results index (SQLite over run directories) and the leaderboard built on it."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from run_factories import fake_run

from fmprobe.errors import FmprobeError
from fmprobe.experiments.index import index_path, query, update_index
from fmprobe.experiments.leaderboard import build_leaderboard


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
