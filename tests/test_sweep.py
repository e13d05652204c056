"""Sweeps: grid expansion with dotted keys, resumability, one extraction per cache entry, failures kept apart."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil

import pytest
import yaml
from run_factories import base_config, write_base

from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.config import set_dotted
from fmprobe.experiments.sweep import expand, load_sweep, run_sweep
from fmprobe.report.progress import Progress, stdout_console


def test_set_dotted_handles_sections_and_list_indices():
    data = {"heads": [{"type": "linear"}, {"type": "mlp"}], "train": {"lr": 1}}
    set_dotted(data, "heads.1.hidden", 8)
    set_dotted(data, "train.lr", 0.1)
    set_dotted(data, "loss.type", "focal")  # a missing section is created
    assert data == {"heads": [{"type": "linear"}, {"type": "mlp", "hidden": 8}], "train": {"lr": 0.1},
                    "loss": {"type": "focal"}}
    with pytest.raises(ConfigError, match="'heads.2' is out of range"):
        set_dotted(data, "heads.2.type", "mlp")
    with pytest.raises(ConfigError, match="'heads' is a list, so 'first' must be an index"):
        set_dotted(data, "heads.first.type", "mlp")
    with pytest.raises(ConfigError, match="no list 'model' to index"):
        set_dotted(data, "model.0.name", "x")


def _sweep(tmp_path, grid, **extra):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "grid": grid, **extra}))
    return path


def test_expand_product_zipped_keys_dedupe_and_all_errors_up_front(tmp_path):
    write_base(tmp_path)
    grid = {"heads.0.type": ["linear", "mlp"], "model.layers, heads.0.layer": [[[-1], -1], [[0], 0]],
            "train.lr": [0.01, 0.01]}  # a repeated value gives the same config: run once
    points = expand(load_sweep(_sweep(tmp_path, grid)))
    assert len(points) == 4 and len({p.config_hash for p in points}) == 4
    assert {(p.exp.heads[0].type, p.exp.heads[0].layer, tuple(p.exp.model.layers)) for p in points} == {
        ("linear", -1, (-1,)), ("linear", 0, (0,)), ("mlp", -1, (-1,)), ("mlp", 0, (0,))}

    bad = {"model.layers": [[-1], [0]], "train.lr": [0.1, -1.0]}
    with pytest.raises(ConfigError, match="3 grid combination") as err:
        expand(load_sweep(_sweep(tmp_path, bad)))
    assert "heads[0].layer -1 is not among model.layers [0]" in str(err.value) and "train.lr" in str(err.value)
    with pytest.raises(ConfigError, match="list of 2 items"):
        load_sweep(_sweep(tmp_path, {"model.layers, heads.0.layer": [[-1], -1]}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_sweep(_sweep(tmp_path, {"train.lr": [0.1]}, worker=2))


@pytest.fixture
def count_extractions(monkeypatch):
    import fmprobe.features.extract as extract

    calls = []
    real = extract._extract
    monkeypatch.setattr(extract, "_extract", lambda *a, **k: calls.append(a[2].root) or real(*a, **k))
    return calls


def test_sweep_extracts_once_per_cache_entry_and_resumes(tmp_path, count_extractions):
    write_base(tmp_path)
    path = _sweep(tmp_path, {"heads.0.type": ["linear", "mlp"], "train.lr": [0.05]})
    result = run_sweep(path, workers=1)
    assert [p.status for p in result.points] == ["ran"] * 2
    assert len(count_extractions) == 1  # two runs, one backbone pass
    assert len({json.loads((p.run_dir / "metrics.json").read_text())["config_hash"] for p in result.points}) == 2
    assert all((p.run_dir / "metrics.json").exists() for p in result.points)
    record = json.loads((result.sweep_dir / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["ran"] * 2
    html = result.report.read_text()
    assert 'id="leaderboard"' in html and all(p.run_dir.name in html for p in result.points)

    # resumable: finished runs are skipped; a run without metrics.json is run again
    again = run_sweep(path, workers=1)
    assert [p.status for p in again.points] == ["done"] * 2 and len(count_extractions) == 1
    (result.points[1].run_dir / "metrics.json").unlink()
    third = run_sweep(path, workers=1)
    assert [p.status for p in third.points] == ["done", "ran"]
    assert third.points[1].run_dir != result.points[1].run_dir
    assert len(count_extractions) == 1  # still cached


def test_a_sweep_over_tasks_reports_one_leaderboard_per_primary_metric(tmp_path):
    write_base(tmp_path)
    result = run_sweep(_sweep(tmp_path, {"task.type": ["binary", "regression"]}), workers=1)
    html = result.report.read_text()
    assert 'id="leaderboard"' in html and 'id="leaderboard-2"' in html and 'id="forest-2"' in html
    assert "metric <b>auroc</b>" in html and "metric <b>r2</b>" in html


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path):
    write_base(tmp_path)
    shutil.copy(tmp_path / "manifest.csv", tmp_path / "other.csv")
    path = _sweep(tmp_path, {"data.manifest": ["manifest.csv", "missing.csv"]})
    out = io.StringIO()
    with pytest.raises(FmprobeError, match=r"1 of 2 sweep runs failed") as err:
        run_sweep(path, workers=1, progress=Progress(stdout_console(out)))
    assert "missing.csv" in str(err.value) and "rerun the sweep" in str(err.value)
    lines = out.getvalue().splitlines()  # arms done / running / failed as they go, then the final count
    assert lines[0] == "sweep sweep: 2 arms, 0 finished earlier, 2 to run"
    assert any(line.startswith("extraction failed for 1 arm(s): ") for line in lines)
    assert any(line.startswith("arm done: data.manifest=manifest.csv -> ") for line in lines)
    assert re.fullmatch(r"sweep sweep: 2/2 arms in \d+ s · 1 failed", lines[-1])
    record = json.loads((tmp_path / "runs" / "_sweeps" / "sweep" / "sweep.json").read_text())
    assert sorted(r["status"] for r in record["runs"]) == ["failed", "ran"]
    assert "missing.csv" in (tmp_path / "runs" / "_sweeps" / "sweep" / "report.html").read_text()


def test_ray_without_ray_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed: importing it fails
    write_base(tmp_path)
    with pytest.raises(ConfigError, match="pip install ray"):
        run_sweep(_sweep(tmp_path, {"train.lr": [0.1]}), use_ray=True)


@pytest.mark.slow  # a local Ray instance takes ~10-30 s to start, and the process pool ~45 s
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install ray)")
def test_ray_runs_the_grid_with_the_process_pool_s_metrics(tmp_path):
    import ray

    write_base(tmp_path)
    results = {}
    for name in ("ray", "pool"):  # same data and model; own runs and cache folders (not part of a run's identity)
        grid = {"train.lr": [0.01, 0.05], "runs_dir": [str(tmp_path / name)],
                "features.cache_dir": [str(tmp_path / f"{name}-cache")]}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"base": "base.yaml", "grid": grid, "workers": 2}))
        if name == "ray":
            ray.init(num_cpus=2, include_dashboard=False)
        try:
            result = run_sweep(path, use_ray=name == "ray")
        finally:
            if name == "ray":
                ray.shutdown()
        assert [p.status for p in result.points] == ["ran"] * 2
        results[name] = {p.config_hash: json.loads((p.run_dir / "metrics.json").read_text()) for p in result.points}
    assert results["ray"].keys() == results["pool"].keys()
    for digest, metrics in results["ray"].items():
        expected = results["pool"][digest]
        for key in ("heads", "baseline", "selection", "split", "flags", "prediction_hashes"):
            assert metrics[key] == expected[key], (digest, key)


@pytest.mark.slow  # spawning workers imports torch in each: ~45 s on 2 busy cores
def test_process_pool_runs_the_grid(tmp_path):
    write_base(tmp_path)
    result = run_sweep(_sweep(tmp_path, {"train.lr": [0.01, 0.05]}, workers=2))
    assert [p.status for p in result.points] == ["ran", "ran"]
    assert {json.loads((p.run_dir / "metrics.json").read_text())["config_hash"] for p in result.points} == \
        {p.config_hash for p in result.points}


def test_data_on_an_fsspec_url_runs(tmp_path):
    """Manifest and media on memory:// (an in-process filesystem); the feature cache stays local."""
    import fsspec
    import pandas as pd

    cfg = base_config(tmp_path)
    fs = fsspec.filesystem("memory")
    df = pd.read_csv(cfg["data"]["manifest"])
    for row in df.itertuples():
        fs.pipe(f"/remote/img/{row.sample_id}.png", open(row.path, "rb").read())
    df["path"] = [f"img/{s}.png" for s in df["sample_id"]]  # relative to the manifest's folder
    with fs.open("/remote/manifest.csv", "w") as f:
        df.to_csv(f, index=False)
    cfg["data"]["manifest"] = "memory://remote/manifest.csv"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    result = run_sweep(_sweep(tmp_path, {"train.lr": [0.05]}), workers=1)
    metrics = json.loads((result.points[0].run_dir / "metrics.json").read_text())
    assert sum(metrics["split"]["sizes"].values()) == len(df)


def test_sweep_report_draws_one_label_efficiency_curve_per_backbone_and_head(tmp_path, monkeypatch):
    import fmprobe.report.efficiency as report_efficiency
    from run_factories import write_model

    drawn = {}  # protocol -> the series of its last figure: the sweep report's (each run's report comes first)
    real = report_efficiency.label_curves
    monkeypatch.setattr(report_efficiency, "label_curves",
                        lambda series, **kw: drawn.update({kw["protocol"]: dict(series)}) or real(series, **kw))
    base = base_config(tmp_path, **{"train.label_fractions": [0.5, 1.0]})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, "heads": [{"type": "knn"}, {"type": "logreg"}]}))
    other = write_model(tmp_path / "other", seed=1)
    result = run_sweep(_sweep(tmp_path, {"model.name": [str(tmp_path / "model"), str(other)]}), workers=1)
    assert "label-efficiency curves (fraction)" in result.report.read_text()
    assert sorted(drawn) == ["fraction"]  # no few-shot budgets in this sweep: no empty figure
    assert sorted(drawn["fraction"]) == ["name=model/knn", "name=model/logreg", "name=other/knn", "name=other/logreg"]
    for x, mean, lo, hi in drawn["fraction"].values():
        assert x == [0.5, 1.0] and all(lo_ <= m <= hi_ for m, lo_, hi_ in zip(mean, lo, hi))


def test_arms_trained_together_match_each_arm_run_alone_bit_for_bit(tmp_path, monkeypatch):
    """Arms differing in head type and learning rate (each with a second head on another input) train in one
    process and one HeadBank pass per input and seed (on two cores, side by side in a forked copy of it); every
    run's metrics, predictions and curves equal its run alone, to the bit, early stopping included."""
    import pandas as pd

    import fmprobe.experiments.run as run_module
    from fmprobe import forks
    from fmprobe.experiments.run import run_experiment

    monkeypatch.setattr(forks, "cores", lambda: 2)

    write_base(tmp_path)
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["train"]["early_stopping"] = {"patience": 1}
    base["heads"].append({"type": "mlp", "name": "wide", "hidden": 24, "pooling": "cls"})
    base["train"]["epochs"] = 5
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"heads.0.type": ["linear", "mlp"], "train.lr": [0.01, 0.2]}
    batches = []
    real = run_module.train_arms
    monkeypatch.setattr(run_module, "train_arms", lambda exps, *a: batches.append(len(exps)) or real(exps, *a))
    result = run_sweep(_sweep(tmp_path, grid), workers=1)
    assert batches == [4] and [p.status for p in result.points] == ["ran"] * 4  # one batch of every arm

    def metrics(run_dir):  # run ids (a time stamp each) name the twins in flags: the one difference allowed
        text = re.sub(r"\d{8}-\d{6}-", "RUN-", (run_dir / "metrics.json").read_text())
        return {k: v for k, v in json.loads(text).items() if k not in ("wall_seconds", "timing")}  # times

    alone_dir = tmp_path / "alone"  # in the sweep's order: each run is compared with the same other runs
    alone_runs = [run_experiment(p.exp.model_copy(update={"runs_dir": str(alone_dir)}), progress=False).run_dir
                  for p in result.points]  # fmt: skip
    for point, alone in zip(result.points, alone_runs):
        together = point.run_dir
        assert metrics(alone) == metrics(together), point.values
        for table in ("predictions.parquet", "curves.parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(alone / table), pd.read_parquet(together / table),
                                          check_exact=True)
    curves = [pd.read_parquet(p.run_dir / "curves.parquet") for p in result.points]
    epochs = {n for c in curves for n in c.groupby(["head", "seed"]).size()}
    assert len(epochs) > 1  # members stopped at different epochs: some sat out while others of their bank trained


def test_an_arm_failing_in_training_is_recorded_in_its_run_and_rerun_anew(tmp_path, monkeypatch):
    from fmprobe.experiments.index import run_statuses

    import fmprobe.probes.frozen as frozen

    write_base(tmp_path)
    real = frozen.fit_heads

    def fails_at_high_lr(members, *args, **kwargs):  # the arms train together first, then alone
        if any(m.lr > 0.04 for m in members):
            raise RuntimeError("diverged")
        return real(members, *args, **kwargs)

    monkeypatch.setattr(frozen, "fit_heads", fails_at_high_lr)
    path = _sweep(tmp_path, {"train.lr": [0.01, 0.05]})
    with pytest.raises(FmprobeError, match="1 of 2 sweep runs failed"):
        run_sweep(path, workers=1)
    states = run_statuses(tmp_path / "runs")
    assert sorted(states["status"]) == ["failed", "finished"]
    failed = states[states["status"] == "failed"].iloc[0]
    assert failed["stage"] == "train" and "RuntimeError: diverged" in failed["error"]
    record = json.loads((tmp_path / "runs" / "_sweeps" / "sweep" / "sweep.json").read_text())
    error = next(r["error"] for r in record["runs"] if r["status"] == "failed")
    assert failed["run_dir"] in error  # the sweep names the failed run's directory

    monkeypatch.setattr(frozen, "fit_heads", real)
    again = run_sweep(path, workers=1)
    assert sorted(p.status for p in again.points) == ["done", "ran"]  # the failed arm runs again, in a new directory
    rerun = next(p.run_dir for p in again.points if p.status == "ran")
    assert str(rerun) != failed["run_dir"]
    assert json.loads((rerun / "status.json").read_text())["status"] == "finished"


@pytest.mark.slow  # two spawned workers: ~1 min on 2 busy cores
def test_a_parallel_sweep_flags_both_arms_that_are_one_backbone_under_two_names(tmp_path):
    """Two arms finishing together used to compare themselves with nothing; both must carry the flag, in their
    files, the leaderboard and the sweep report."""
    from fmprobe.experiments.leaderboard import build_leaderboard

    write_base(tmp_path)
    shutil.copytree(tmp_path / "model", tmp_path / "model-copy")
    names = [str(tmp_path / "model"), str(tmp_path / "model-copy")]
    result = run_sweep(_sweep(tmp_path, {"model.name": names}, workers=2))
    assert [p.status for p in result.points] == ["ran", "ran"]
    for point, other in zip(result.points, reversed(result.points)):
        metrics = json.loads((point.run_dir / "metrics.json").read_text())
        flag = next(f for f in metrics["heads"]["linear"]["flags"] if f["name"] == "identical_predictions")
        assert flag["details"]["identical"] == [f"tiny/{other.run_dir.name}/linear"]
        assert "identical_predictions" in (point.run_dir / "report.html").read_text()
    board = build_leaderboard(tmp_path / "runs")
    assert all("identical_predictions" in flags for flags in board.table["flags"])
    assert result.report.read_text().count("identical_predictions") >= 2


def test_a_sweeps_arms_train_and_finish_side_by_side_in_forked_processes(tmp_path, monkeypatch):
    """The arms' HeadBank passes (one per seed here) and the arms' finishing (bootstrap, files, report) are shared
    with a forked copy of the sweep's process, one per core; every arm's run is finished and recorded."""
    import os

    import fmprobe.experiments.run as run_module
    import fmprobe.probes.frozen as frozen
    from fmprobe import forks

    write_base(tmp_path)
    seen = tmp_path / "seen"
    seen.mkdir()

    def recording(name, real):
        def wrapper(*args, **kwargs):
            (seen / f"{name}.{os.getpid()}").touch()
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(forks, "cores", lambda: 2)
    monkeypatch.setattr(frozen, "_seed_runs", recording("train", frozen._seed_runs))
    monkeypatch.setattr(run_module, "_finish", recording("finish", run_module._finish))
    result = run_sweep(_sweep(tmp_path, {"heads.0.type": ["linear", "mlp"], "train.lr": [0.01, 0.2]}), workers=1)
    assert [p.status for p in result.points] == ["ran"] * 4
    for step in ("train", "finish"):
        pids = {p.suffix for p in seen.glob(f"{step}.*")}
        assert len(pids) == 2 and f".{os.getpid()}" in pids, step
    for point in result.points:
        assert json.loads((point.run_dir / "status.json").read_text())["status"] == "finished"
        assert (point.run_dir / "report.html").is_file()
