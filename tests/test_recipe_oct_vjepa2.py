"""Recipe examples/oct_vjepa2: the real YAMLs are the study's (diabetes staging in four classes, two native
V-JEPA 2 ViT-B checkpoints, balanced class weights and the uniform-weights control, W&B on, checkpoints on gs://);
the stand-in has the real structure; end to end, the sweep streams volumes from an object store (fsspec
``memory://``, in-process), the leaderboard ranks the arms, and the majority-collapse flag fires for the collapsed
checkpoint."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fmprobe.backbones.registry import load_encoder
from fmprobe.cli import app
from fmprobe.config import load_config
from fmprobe.data.readers import read_media
from fmprobe.experiments.compare_runs import compare_runs
from fmprobe.experiments.sweep import expand, load_sweep

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "oct_vjepa2"
CLASSES = ["healthy", "pre_diabetes", "oral_medication", "insulin"]


def _standin_module():
    spec = importlib.util.spec_from_file_location("oct_vjepa2_standin", RECIPE / "make_standin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def memory_store():
    """A fresh bucket in fsspec's in-memory object store, removed afterwards."""
    url = f"memory://oct-standin-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def test_real_config_and_sweep_validate():
    exp = load_config(RECIPE / "config.yaml")
    assert exp.model.kind == "vjepa2-native" and exp.model.checkpoint.startswith("gs://")  # streamed through fsspec
    assert exp.model.native_num_heads == 12  # ViT-B width 768: checked against the checkpoint when it loads
    assert exp.data.kind == "volume" and exp.data.volume_mode == "stack"
    assert exp.data.frames_per_clip == exp.model.native_frames  # the clip length the checkpoint's RoPE grid expects
    assert exp.task.type == "multiclass" and exp.task.targets == ["stage"] and exp.task.class_names == CLASSES
    assert exp.task.primary_metric == "balanced_accuracy" and exp.loss.class_weights == "balanced"
    assert (exp.heads[0].type, exp.heads[0].pooling, exp.heads[0].dropout) == ("linear", "mean", 0.1)
    assert exp.train.early_stopping is not None and exp.train.warmup_epochs > 0
    assert len(exp.train.seeds) >= 3 and exp.eval.bootstrap == 1000 and exp.data.group_column == "patient"
    assert exp.tracking.wandb and exp.tracking.wandb_project == "3d-oct-foundation-model"
    assert [h.type for h in exp.heads] == ["linear", "logreg", "knn"]  # and how many labelled patients each needs:
    assert exp.train.shots == [1, 2, 4, 8, 16, 32] and exp.train.label_fractions[-1] == 1.0 and exp.eval.target
    points = expand(load_sweep(RECIPE / "sweep.yaml"))
    arms = sorted((p.exp.model.checkpoint.split("/")[-2], p.exp.loss.class_weights) for p in points)
    assert arms == [("multi_domain", "balanced"), ("multi_domain", "none"), ("single_domain_01", "balanced"),
                    ("single_domain_01", "none")]  # the uniform-weights control beside each checkpoint
    assert all(p.exp.name == exp.name for p in points)  # one experiment: one leaderboard
    readme = (RECIPE / "README.md").read_text()
    for said in ("healthy", "pre-diabetes", "oral medication", "insulin", "2.86:1", "FSSPEC_S3_ENDPOINT_URL",
                 "majority_collapse", "uniform"):
        assert said in readme, said


def test_standin_has_the_real_structure(tmp_path, memory_store):
    paths = _standin_module().main(tmp_path / "out", store=memory_store)
    df = pd.read_csv(paths["manifest"])
    assert list(df.columns) == ["sample_id", "path", "stage", "patient", "eye"]
    assert df["path"].str.match(rf"^{memory_store}/oct/P\d{{3}}/O[DS]\.nii\.gz$").all()
    assert not (tmp_path / "out" / "store").exists()  # the volumes live in the object store only
    assert set(df.groupby("patient")["eye"].agg(lambda eyes: "+".join(sorted(eyes)))) == {"OD+OS"}
    counts = df["stage"].value_counts()
    assert set(counts.index) == set(CLASSES) and counts["healthy"] > 2 * counts["insulin"]  # imbalanced as studied
    assert counts.idxmax() == "healthy" and counts.idxmin() == "insulin"
    assert (df.groupby("patient")["stage"].nunique() == 1).all()  # a patient's stage is both eyes' label

    exp = load_config(paths["config"])  # the stand-in copy of config.yaml: only sizes and paths differ
    real = load_config(RECIPE / "config.yaml")
    assert (exp.task, exp.loss, exp.heads) == (real.task, real.loss, real.heads)
    volume = read_media(df["path"][0], exp.data, sample_id=df["sample_id"][0])
    assert volume.shape == (exp.data.num_clips, exp.data.frames_per_clip, 1, 32, 32)

    encoder = load_encoder(exp.model)
    assert encoder.input_spec.num_frames == exp.data.frames_per_clip
    collapsed = load_encoder(exp.model.model_copy(update={"checkpoint": str(paths["collapsed"])}))
    clips = torch.randn(2, 4, 3, 32, 32)
    tokens = next(iter(collapsed.encode(clips, layers=[-1]).tokens.values()))
    assert torch.allclose(tokens, tokens[:1, :1].expand_as(tokens), atol=1e-5)  # one vector for every input
    informative = next(iter(encoder.encode(clips, layers=[-1]).tokens.values()))
    assert not torch.allclose(informative[0], informative[1], atol=1e-3)


@pytest.mark.slow  # three checkpoints x 240 volumes, two class weightings, three seeds each: a few min on 2 busy cores
def test_checkpoint_sweep_leaderboard_and_collapse_flag(tmp_path, memory_store):
    paths = _standin_module().main(tmp_path / "out", store=memory_store)
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", str(paths["sweep"])])  # workers: 1 -> in-process, so memory:// is seen
    assert result.exit_code == 0, result.output

    runs = {}
    for metrics_file in paths["runs"].glob("oct-vjepa2/*/metrics.json"):
        config = load_config(metrics_file.parent / "config.resolved.yaml")
        key = (Path(config.model.checkpoint).name, config.loss.class_weights)
        runs[key] = (metrics_file.parent, json.loads(metrics_file.read_text()))
    names = ["vjepa2_tiny_collapsed.pt", "vjepa2_tiny_multidomain.pt", "vjepa2_tiny_oct_single.pt"]
    assert sorted(runs) == [(n, w) for n in names for w in ("balanced", "none")]

    for name in ("vjepa2_tiny_oct_single.pt", "vjepa2_tiny_multidomain.pt"):
        run_dir, m = runs[name, "balanced"]
        head = m["heads"]["linear"]
        assert m["bootstrap"]["unit"] == "group" and m["baseline"]["test"]["balanced_accuracy"] == pytest.approx(0.25)
        lo, hi = head["test_ci"]["balanced_accuracy"]
        assert 0.25 < lo <= head["splits"]["test"]["mean"]["balanced_accuracy"] <= hi  # beats chance, CI and all
        for c in CLASSES:  # per-class F1 with its CI
            assert 0 <= head["splits"]["test"]["mean"][f"f1/{c}"] <= 1 and len(head["test_ci"][f"f1/{c}"]) == 2
        weights = head["loss"]["class_weights"]  # balanced: the rarest class weighs the most
        train_counts = np.bincount(pd.read_parquet(run_dir / "predictions.parquet").query("split == 'train'")
                                   .drop_duplicates("sample_id")["y/stage"].astype(int), minlength=4)
        assert np.argmax(weights) == np.argmin(train_counts) and np.argmin(weights) == np.argmax(train_counts)
        assert "majority_collapse" not in {f["name"] for f in head["flags"]}
        checkpoint = paths["collapsed"].parent / name
        assert f"backbone {checkpoint} " in (run_dir / "report.html").read_text()  # the checkpoint, not model.name
        curves = pd.read_parquet(run_dir / "curves.parquet").query("seed == 42")
        lr = curves["lr"].to_numpy()
        assert lr[0] < lr[1] and np.all(np.diff(lr[1:]) <= 0)  # warmup, then cosine decay
        uniform = runs[name, "none"][1]["heads"]["linear"]["loss"]  # the control: what the loss really used
        assert uniform["class_weights"] is None

        # label efficiency: every head on few-shot episodes and label fractions, a curve in the report
        block = m["efficiency"]
        assert {p["head"] for p in block["points"]} == {"linear", "logreg", "knn"}
        full = next(p for p in block["points"] if (p["head"], p["protocol"], p["value"]) == ("logreg", "fraction", 1.0))
        assert full["interval"][0] > 0.25  # every training patient labelled: beats chance, interval and all
        assert any(p["status"] == "missing" for p in block["points"])  # K = 32 patients of the rarest stage: not in the stand-in
        assert set(block["labels_needed"]) == {"linear", "logreg", "knn"}
        assert "label-efficiency curve (fraction)" in (run_dir / "report.html").read_text()

    for weights in ("balanced", "none"):  # a representation that collapsed: every arm on it is flagged
        collapsed = {f["name"]: f for f in runs["vjepa2_tiny_collapsed.pt", weights][1]["heads"]["linear"]["flags"]}
        assert collapsed["majority_collapse"]["severity"] == "error"
        assert collapsed["majority_collapse"]["details"]["predicted_share"] == 1.0
    sweep_report = paths["runs"] / "_sweeps" / "oct-vjepa2-checkpoints" / "report.html"
    assert "label-efficiency curves (fraction)" in sweep_report.read_text()  # one curve per checkpoint and head

    board_csv, board_html = tmp_path / "leaderboard.csv", tmp_path / "leaderboard.html"
    result = runner.invoke(app, ["leaderboard", "--runs", str(paths["runs"]), "--experiment", "oct-vjepa2",
                                 "--csv", str(board_csv), "--html", str(board_html)])  # fmt: skip
    assert result.exit_code == 0, result.output
    board = pd.read_csv(board_csv, keep_default_na=False)
    assert len(board) == 18 and set(board["metric"]) == {"balanced_accuracy"}  # 3 checkpoints x 2 weightings x 3 heads
    assert set(board["loss.class_weights"]) == {"balanced", "none"}  # the arms' difference is a column
    on_collapsed = board[board["model.checkpoint"].str.endswith("collapsed.pt")]
    assert sorted(on_collapsed["rank"]) == list(range(13, 19))
    assert all("majority_collapse" in f.split(";") for f in on_collapsed["flags"])
    assert "majority_collapse" in board_html.read_text()

    single, multi = runs["vjepa2_tiny_oct_single.pt", "balanced"][0], runs["vjepa2_tiny_multidomain.pt", "balanced"][0]
    paired = compare_runs(multi, single, n_resamples=200)  # multi-domain minus single-domain, same test eyes
    assert paired["metric"] == "balanced_accuracy" and paired["resampled"] == "groups"
    assert paired["lo"] <= paired["diff"] <= paired["hi"]
