"""`fmprobe run` end to end on a tiny real backbone: the run directory, its numbers, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fmprobe.cli import app
from fmprobe.config import load_config, parse_config
from fmprobe.errors import ConfigError, FmprobeError, LeakageError, ManifestError
from fmprobe.evaluate.metrics import compute_metrics
from fmprobe.experiments.run import run_experiment


def test_run_directory_holds_everything_and_numbers_recompute_from_predictions(toy_study):
    exp = parse_config(toy_study("binary"))
    result = run_experiment(exp, progress=False)
    run_dir = result.run_dir
    for name in ("config.resolved.yaml", "env.json", "predictions.parquet", "metrics.json", "curves.parquet",
                 "report.html", "checkpoints/linear/seed0/best.pt", "checkpoints/linear/seed1/last.pt"):
        assert (run_dir / name).exists(), name
    assert parse_config(yaml.safe_load((run_dir / "config.resolved.yaml").read_text())) == exp

    metrics = json.loads((run_dir / "metrics.json").read_text())
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    head = metrics["heads"]["linear"]
    # Every number can be recomputed from predictions.parquet with scikit-learn.
    for seed, auroc in zip(exp.train.seeds, head["splits"]["test"]["per_seed"]["auroc"]):
        rows = preds[(preds["split"] == "test") & (preds["seed"] == seed)]
        ref = compute_metrics("binary", rows["y/y"].to_numpy(), rows["p/y"].to_numpy())
        assert auroc == pytest.approx(ref["auroc"], abs=1e-12)
    lo, hi = head["test_ci"]["auroc"]
    assert lo <= head["splits"]["test"]["mean"]["auroc"] <= hi
    # Context next to the number: split sizes and groups, seeds, baseline, what was selected on what.
    assert metrics["seeds"] == [0, 1]
    assert sum(metrics["split"]["sizes"].values()) == 90
    assert metrics["baseline"]["test"]["auroc"] == pytest.approx(0.5)
    assert metrics["bootstrap"]["unit"] == "group"
    assert "validation" in metrics["selection"]["rule"]
    # The signal is real: the probe beats the baseline and nothing is flagged as collapse.
    assert head["splits"]["test"]["mean"]["auroc"] > 0.8
    assert not {f["name"] for f in head["flags"]} & {"majority_collapse", "constant_output", "below_baseline"}
    # Thresholds come from validation and are recorded per seed.
    assert set(head["thresholds"]) == {"0", "1"}


def test_leakage_across_generated_splits_is_impossible(toy_study):
    exp = parse_config(toy_study("binary"))
    run_dir = run_experiment(exp, progress=False).run_dir
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    sides = preds.groupby("group")["split"].nunique()
    assert (sides == 1).all()


def test_given_splits_that_leak_groups_are_refused(toy_study, tmp_path):
    config = toy_study("binary")
    manifest = Path(config["data"]["manifest"])
    df = pd.read_csv(manifest)
    df["split"] = np.resize(["train", "val", "test"], len(df))  # patients have 3 samples: one per split
    df.to_csv(manifest, index=False)
    config["data"]["split_column"] = "split"
    config["split"] = {"mode": "given"}
    with pytest.raises(LeakageError, match="patient"):
        run_experiment(parse_config(config), progress=False)
    config["split"]["allow_group_overlap"] = True
    metrics = run_experiment(parse_config(config), progress=False).metrics
    assert metrics["split"]["group_overlap"]
    assert "group_overlap" in {f["name"] for f in metrics["flags"]}


def test_uninformative_imbalanced_multiclass_is_flagged(toy_study):
    config = toy_study("multiclass", n=120, informative=False, n_classes=4, weights=[0.7, 0.1, 0.1, 0.1],
                       loss={"class_weights": "none"})
    metrics = run_experiment(parse_config(config), progress=False).metrics
    names = {f["name"] for f in metrics["heads"]["linear"]["flags"]}
    assert {"majority_collapse", "below_baseline"} & names, names


def test_two_configs_with_the_same_predictions_are_flagged(toy_study, tiny_dinov2_dir, tmp_path):
    import shutil

    first = toy_study("binary")
    first_dir = run_experiment(parse_config(first), progress=False).run_dir
    # An evaluation setting reads predictions and never changes them: a reproduction (info), not an error.
    eval_only = {**first, "eval": {**first["eval"], "tiny_class": 3}}
    metrics = run_experiment(parse_config(eval_only), progress=False).metrics
    assert "identical_predictions" not in {f["name"] for f in metrics["flags"]}
    assert [f["severity"] for f in metrics["flags"] if f["name"] == "reproduced"] == ["info"]
    # A "different backbone" that is the same weights under another path is what the flag exists for.
    copy = shutil.copytree(tiny_dinov2_dir, tmp_path / "other-backbone")
    other_model = {**first, "model": {**first["model"], "name": str(copy)}}
    result = run_experiment(parse_config(other_model), progress=False)
    flags = [f for f in result.metrics["flags"] if f["name"] == "identical_predictions"]
    assert flags and flags[0]["severity"] == "error"
    assert f"{first_dir.parent.name}/{first_dir.name}/linear" in flags[0]["details"]["identical"]
    # ... on both sides: the earlier run learns about its later twin, in metrics.json and in its report
    earlier = json.loads((first_dir / "metrics.json").read_text())
    twin = next(f for f in earlier["heads"]["linear"]["flags"] if f["name"] == "identical_predictions")
    assert f"{result.run_dir.parent.name}/{result.run_dir.name}/linear" in twin["details"]["identical"]
    assert any(f["name"] == "identical_predictions" and f["head"] == "linear" for f in earlier["flags"])
    assert "identical_predictions" in (first_dir / "report.html").read_text()


def test_balanced_class_weights_are_computed_and_recorded(toy_study):
    config = toy_study("binary", weights=[0.8, 0.2], loss={"class_weights": "balanced"})
    result = run_experiment(parse_config(config), progress=False)
    weights = result.metrics["heads"]["linear"]["loss"]["class_weights"]
    preds = pd.read_parquet(result.run_dir / "predictions.parquet")
    y = preds[(preds["split"] == "train") & (preds["seed"] == preds["seed"].min())]["y/y"].to_numpy()
    n, n_pos = len(y), int(y.sum())
    assert 0 < n_pos < n / 2  # imbalanced: the weights must differ
    # sklearn's balanced: n / (k * n_c) with k = 2 classes, for each side of the label
    assert weights["positive"] == pytest.approx([n / (2 * n_pos)])
    assert weights["negative"] == pytest.approx([n / (2 * (n - n_pos))])


def test_balanced_sampler_draws_frozen_probe_batches_class_balanced(toy_study, monkeypatch):
    """train.balanced_sampler on a frozen probe: every epoch over the cached features draws the classes equally
    (a permutation would draw them 80/20), with the sampler end-to-end training uses."""
    from fmprobe.train import sampling, sources

    drawn: list[np.ndarray] = []

    def recording(n, generator, weights):  # noqa: ANN001, ANN202
        order = sampling.epoch_order(n, generator, weights)
        drawn.append(order.numpy())
        return order

    monkeypatch.setattr(sources, "epoch_order", recording)
    config = toy_study("binary", n=150, weights=[0.8, 0.2], train={"epochs": 3, "balanced_sampler": True})
    result = run_experiment(parse_config(config), progress=False)
    preds = pd.read_parquet(result.run_dir / "predictions.parquet")
    y = preds[(preds["split"] == "train") & (preds["seed"] == 0)]["y/y"].to_numpy().astype(int)
    assert y.mean() < 0.3 and len(drawn) == 3 * 2  # epochs x seeds, each drawn with replacement
    positive_share = np.mean([y[order].mean() for order in drawn])
    assert 0.4 < positive_share < 0.6
    assert load_config(result.run_dir / "config.resolved.yaml").train.balanced_sampler
    with pytest.raises(ConfigError, match="moved to train.balanced_sampler"):
        parse_config({**config, "adapt": {"balanced_sampler": True}})


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"heads": [{"type": "transformer"}]}, r"heads\.0\.type"),
        ({"task": {"type": "binary", "targets": ["y"], "primary_metric": "r2"}}, "not valid for a binary task"),
        ({"train": {"epochs": 2, "learning_rate": 0.1}}, r"train\.learning_rate: unknown key"),
    ],
)
def test_bad_config_values_fail_before_any_work(toy_study, tmp_path, patch, message):
    config = {**toy_study("binary"), **patch}
    with pytest.raises(ConfigError, match=message):
        run_experiment(parse_config(config), progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_targets_missing_from_manifest_fail_before_extraction(toy_study, tmp_path):
    config = toy_study("binary")
    config["task"]["targets"] = ["diagnosis"]
    with pytest.raises(ManifestError, match="diagnosis"):
        run_experiment(parse_config(config), progress=False)
    assert not (tmp_path / "cache").exists()


def test_cli_run_prints_summary_and_bad_config_exits_with_one_message(toy_study, tmp_path):
    config = toy_study("regression")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    ok = runner.invoke(app, ["run", str(path), "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert "r2" in ok.output and "baseline" in ok.output and "report: " in ok.output  # the report's path, last
    config["heads"] = [{"type": "linear", "pooling": "mean", "hiden": 3}]
    path.write_text(yaml.safe_dump(config))
    bad = runner.invoke(app, ["run", str(path)])
    assert bad.exit_code == 2
    assert "heads.0.hiden" in bad.output and "Traceback" not in bad.output


def test_compare_runs_pairs_the_same_test_samples_and_refuses_different_ones(toy_study, tmp_path):
    from fmprobe.errors import FmprobeError
    from fmprobe.experiments.compare_runs import compare_runs

    base = toy_study("binary")
    run_a = run_experiment(parse_config(base), progress=False).run_dir
    mlp = {**base, "heads": [{"type": "mlp", "pooling": "mean", "hidden": 16}]}
    run_b = run_experiment(parse_config(mlp), progress=False).run_dir
    result = compare_runs(run_a, run_b, n_resamples=300)
    assert result["metric"] == "auroc" and result["n_test"] > 0 and result["resampled"] == "groups"
    assert result["lo"] <= result["diff"] <= result["hi"] and 0 < result["p_value"] <= 1
    same = compare_runs(run_a, run_a, n_resamples=300)
    assert same["diff"] == 0 and same["p_value"] == 1 and same["identical_outputs"]
    other_split = {**base, "split": {"mode": "generate", "seed": 7}}
    run_c = run_experiment(parse_config(other_split), progress=False).run_dir
    with pytest.raises(FmprobeError, match="different test samples"):
        compare_runs(run_a, run_c, n_resamples=100)
    runner = CliRunner()
    out = runner.invoke(app, ["compare", str(run_a), str(run_b), "--resamples", "200"])
    assert out.exit_code == 0 and '"p_value"' in out.output


def test_compare_scores_each_head_as_its_table_does_and_says_when_outputs_are_identical(toy_study, tmp_path):
    from fmprobe.experiments.compare_runs import compare_runs

    config = toy_study("binary", heads=[{"type": "linear", "pooling": "mean"},
                                        {"type": "mlp", "pooling": "mean", "hidden": 8}], train={"seeds": [0, 1, 2]})
    run = run_experiment(parse_config(config), progress=False)
    result = compare_runs(run.run_dir, run.run_dir, head_a="linear", head_b="mlp", n_resamples=300)
    table = {h: run.metrics["heads"][h]["splits"]["test"]["mean"]["auroc"] for h in ("linear", "mlp")}
    # one definition of a head's test score: the mean over seeds of each seed's AUROC, as the table shows it
    assert result["a"]["value"] == pytest.approx(table["linear"], abs=1e-12)
    assert result["b"]["value"] == pytest.approx(table["mlp"], abs=1e-12)
    assert result["diff"] == pytest.approx(table["linear"] - table["mlp"], abs=1e-12)
    assert result["a"]["members"] == 3 and not result["identical_outputs"]
    assert "mean over the members" in result["definition"]
    out = CliRunner().invoke(app, ["compare", str(run.run_dir), str(run.run_dir), "--head-a", "linear", "--head-b",
                                   "mlp", "--resamples", "100", "--json", str(tmp_path / "cmp.json")])
    assert out.exit_code == 0, out.output
    assert f"auroc {table['linear']:.3f}" in out.output and f"auroc {table['mlp']:.3f}" in out.output
    assert json.loads((tmp_path / "cmp.json").read_text())["a"]["value"] == pytest.approx(table["linear"])
    same = CliRunner().invoke(app, ["compare", str(run.run_dir), str(run.run_dir), "--resamples", "100"])
    assert "identical outputs" in same.output


def test_kfold_rotates_validation_and_scores_every_fold_on_one_test_set(toy_study):
    config = toy_study("binary", n=120, split={"mode": "kfold", "folds": 3, "fractions": [0.6, 0.2, 0.2]},
                       train={"seeds": [0]})
    result = run_experiment(parse_config(config), progress=False)
    metrics, run_dir = result.metrics, result.run_dir
    head = metrics["heads"]["linear"]
    assert metrics["folds"] == 3 and head["members"] == ["fold0/seed0", "fold1/seed0", "fold2/seed0"]
    assert len(head["splits"]["val"]["per_seed"]["auroc"]) == 3
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    val_ids = [set(preds[(preds["fold"] == k) & (preds["split"] == "val")]["sample_id"]) for k in range(3)]
    assert not (val_ids[0] & val_ids[1]) and not (val_ids[1] & val_ids[2])  # validation rotates
    test_ids = [set(preds[(preds["fold"] == k) & (preds["split"] == "test")]["sample_id"]) for k in range(3)]
    assert test_ids[0] == test_ids[1] == test_ids[2] and not (test_ids[0] & val_ids[0])
    assert (run_dir / "checkpoints" / "fold2" / "linear" / "seed0" / "best.pt").exists()
    lo, hi = head["test_ci"]["auroc"]
    assert lo <= head["splits"]["test"]["mean"]["auroc"] <= hi


def test_a_target_with_one_class_is_refused_before_any_feature_is_extracted(toy_study, tmp_path, monkeypatch):
    from fmprobe.backbones import registry

    config = toy_study("binary", n=30, weights=[0.0, 1.0])

    def no_encoder(model):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(registry, "load_encoder", no_encoder)
    with pytest.raises(ManifestError, match=r"target 'y' has a single class: all 30 rows hold 1"):
        run_experiment(parse_config(config), progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_regression_targets_with_missing_values_train_and_score_on_their_own_rows(toy_study):
    """Age for every session, MMSE for some: a masked loss, each target's metrics, CI and baseline on its own
    rows, and a ranking by one target (never by a mean over targets in different units)."""
    from sklearn.metrics import r2_score

    from fmprobe.experiments.leaderboard import build_leaderboard

    config = toy_study("regression", n=120, seed=3)
    manifest = Path(config["data"]["manifest"])
    df = pd.read_csv(manifest)
    rng = np.random.default_rng(0)
    df["z"] = 10 * df["y"].round() + rng.normal(0, 1, len(df)) + 20  # another unit, same signal
    df.loc[rng.random(len(df)) < 0.45, "z"] = np.nan  # MMSE-like: less than half the sessions lack it
    df.loc[df["z"].notna() & (rng.random(len(df)) < 0.15), "y"] = np.nan
    df.to_csv(manifest, index=False)
    task = {"type": "regression", "targets": ["y", "z"], "primary_metric": "r2/z"}
    with pytest.raises(ManifestError, match="missing target 'y'.*task.missing_targets: mask"):
        run_experiment(parse_config({**config, "task": task}), progress=False)
    with pytest.raises(ConfigError, match="several targets .* never by a mean over targets"):
        parse_config({**config, "task": {**task, "primary_metric": "r2"}})

    result = run_experiment(parse_config({**config, "task": {**task, "missing_targets": "mask"}}), progress=False)
    m = result.metrics
    head = m["heads"]["linear"]
    assert m["task"]["primary_metric"] == "r2/z" and m["task"]["headline_metrics"][:2] == ["r2/z", "r2/y"]
    assert head["loss"]["missing_targets"].startswith("masked")
    preds = pd.read_parquet(result.run_dir / "predictions.parquet")
    test = preds[preds["split"] == "test"]
    train = preds[(preds["split"] == "train") & (preds["seed"] == 0)]
    for target in ("y", "z"):
        rows = test[test[f"y/{target}"].notna()]
        assert m["task"]["rows_per_target"][target]["test"] == rows["sample_id"].nunique() < len(test) / 2
        per_seed = [r2_score(g[f"y/{target}"], g[f"p/{target}"]) for _, g in rows.groupby("seed")]
        assert head["splits"]["test"]["mean"][f"r2/{target}"] == pytest.approx(np.mean(per_seed))
        assert head["splits"]["test"]["mean"][f"r2/{target}"] > 0.5  # learnt from its own rows
        lo, hi = head["test_ci"][f"r2/{target}"]
        assert lo < head["splits"]["test"]["mean"][f"r2/{target}"] < hi
        mean_train = train[f"y/{target}"].mean()  # pandas skips the missing values
        baseline = r2_score(rows.query("seed == 0")[f"y/{target}"], np.full(len(rows) // 2, mean_train))
        assert m["baseline"]["test"][f"r2/{target}"] == pytest.approx(baseline, rel=1e-4)  # float32 targets
    board = build_leaderboard(Path(config["runs_dir"]))
    assert board.metric == "r2/z"


def test_a_failed_run_records_its_stage_and_error_and_a_rerun_starts_a_clean_directory(toy_study, tmp_path,
                                                                                       monkeypatch):
    import fmprobe.experiments.run as run_module
    from fmprobe.experiments.index import run_statuses
    from fmprobe.experiments.leaderboard import build_leaderboard

    config = toy_study("binary", train={"epochs": 2})
    real = run_module.train_heads

    def broken(*args, **kwargs):
        raise RuntimeError("the GPU fell off the bus")

    monkeypatch.setattr(run_module, "train_heads", broken)
    with pytest.raises(RuntimeError, match="fell off the bus") as err:
        run_experiment(parse_config(config), progress=False)
    failed_dir = next((tmp_path / "runs" / "toy").iterdir())
    assert any(str(failed_dir) in note for note in err.value.__notes__)
    status = json.loads((failed_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["stage"] == "train" and status["time"]
    assert "RuntimeError: the GPU fell off the bus" in status["error"]
    assert not (failed_dir / "metrics.json").exists()
    with pytest.raises(FmprobeError, match=r"no finished run.*\nfailed: toy/.* at train: RuntimeError: the GPU"):
        build_leaderboard(tmp_path / "runs")

    monkeypatch.setattr(run_module, "train_heads", real)
    rerun = run_experiment(parse_config(config), progress=False).run_dir
    assert rerun != failed_dir and sorted(p.name for p in failed_dir.iterdir()) == ["config.resolved.yaml",
                                                                                     "status.json"]
    assert json.loads((rerun / "status.json").read_text())["status"] == "finished"
    states = run_statuses(tmp_path / "runs").set_index("run_id")
    assert states.loc[failed_dir.name, ["status", "stage"]].tolist() == ["failed", "train"]
    assert states.loc[rerun.name, "status"] == "finished"
    board = build_leaderboard(tmp_path / "runs")
    assert board.table["run_id"].tolist() == [rerun.name]
    assert board.failed == [{"run": f"toy/{failed_dir.name}", "stage": "train",
                             "error": "RuntimeError: the GPU fell off the bus"}]


def test_heads_stopped_at_their_last_allowed_epoch_are_flagged_not_converged(toy_study):
    """The training loop's last allowed epoch reaches metrics.json: with one epoch, every seed's best is its last."""
    metrics = run_experiment(parse_config(toy_study("binary", n=45, train={"epochs": 1})), progress=False).metrics
    head = metrics["heads"]["linear"]
    flag = next(f for f in head["flags"] if f["name"] == "not_converged")
    assert flag["details"]["members"] == {"0": {"best_epoch": 1, "epochs": 1}, "1": {"best_epoch": 1, "epochs": 1}}
    assert head["epochs_allowed"] == {"0": 1, "1": 1} and "epoch 1 of 1" in flag["message"]


def test_fixed_thresholds_are_stated_as_fixed_not_as_tuned(toy_study):
    """``eval.thresholds: fixed`` decides at 0.5 and the run's record says so (it used to read "tuned on
    validation (fixed)")."""
    cfg = toy_study("binary")
    cfg.setdefault("eval", {})["thresholds"] = "fixed"
    run_dir = run_experiment(parse_config(cfg), progress=False).run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.ravel(list(metrics["heads"]["linear"]["thresholds"].values())).tolist() == [0.5, 0.5]
    rule = metrics["selection"]["thresholds"]
    assert "0.5" in rule and "tuned on validation" not in rule
