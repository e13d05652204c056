"""Recipe examples/oct_vjepa2: the real YAMLs validate; the stand-in has the real structure; end to end, the
checkpoint sweep streams volumes from an object store (fsspec ``memory://``, in-process), the leaderboard ranks
the checkpoints, and the majority-collapse flag fires for the collapsed checkpoint only."""

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
CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]


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
    assert exp.model.kind == "vjepa2-native" and exp.model.checkpoint.endswith("checkpoints/vjepa2_vitl_oct_single.pt")
    assert exp.data.kind == "volume" and exp.data.volume_mode == "stack"
    assert exp.data.frames_per_clip == exp.model.native_frames  # the clip length the checkpoint's RoPE grid expects
    assert exp.task.type == "multiclass" and exp.task.class_names == CLASSES
    assert exp.task.primary_metric == "balanced_accuracy" and exp.loss.class_weights == "balanced"
    assert exp.train.early_stopping is not None and exp.train.warmup_epochs > 0
    assert len(exp.train.seeds) >= 3 and exp.eval.bootstrap == 1000 and exp.data.group_column == "patient"
    assert [h.type for h in exp.heads] == ["linear", "logreg", "knn"]  # and how many labelled patients each needs:
    assert exp.train.shots == [1, 2, 4, 8, 16, 32] and exp.train.label_fractions[-1] == 1.0 and exp.eval.target
    points = expand(load_sweep(RECIPE / "sweep.yaml"))
    checkpoints = sorted(Path(p.exp.model.checkpoint).name for p in points)
    assert checkpoints == ["vjepa2_vitl_multidomain.pt", "vjepa2_vitl_oct_single.pt"]
    assert all(p.exp.name == exp.name for p in points)  # one experiment: one leaderboard


def test_standin_has_the_real_structure(tmp_path, memory_store):
    paths = _standin_module().main(tmp_path / "out", store=memory_store)
    df = pd.read_csv(paths["manifest"])
    assert list(df.columns) == ["sample_id", "path", "diagnosis", "patient", "eye"]
    assert df["path"].str.match(rf"^{memory_store}/oct/P\d{{3}}/O[DS]\.nii\.gz$").all()
    assert not (tmp_path / "out" / "store").exists()  # the volumes live in the object store only
    assert set(df.groupby("patient")["eye"].agg(lambda eyes: "+".join(sorted(eyes)))) == {"OD+OS"}
    counts = df["diagnosis"].value_counts()
    assert set(counts.index) == set(CLASSES) and counts["CNV"] > 2 * counts["DRUSEN"]  # imbalanced

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


@pytest.mark.slow  # three checkpoints x 240 volumes, three seeds each: ~1-2 min on 2 busy cores
def test_checkpoint_sweep_leaderboard_and_collapse_flag(tmp_path, memory_store):
    paths = _standin_module().main(tmp_path / "out", store=memory_store)
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", str(paths["sweep"])])  # workers: 1 -> in-process, so memory:// is seen
    assert result.exit_code == 0, result.output

    runs = {}
    for metrics_file in paths["runs"].glob("oct-vjepa2/*/metrics.json"):
        config = load_config(metrics_file.parent / "config.resolved.yaml")
        runs[Path(config.model.checkpoint).name] = (metrics_file.parent, json.loads(metrics_file.read_text()))
    assert sorted(runs) == ["vjepa2_tiny_collapsed.pt", "vjepa2_tiny_multidomain.pt", "vjepa2_tiny_oct_single.pt"]

    for name in ("vjepa2_tiny_oct_single.pt", "vjepa2_tiny_multidomain.pt"):
        run_dir, m = runs[name]
        head = m["heads"]["linear"]
        assert m["bootstrap"]["unit"] == "group" and m["baseline"]["test"]["balanced_accuracy"] == pytest.approx(0.25)
        lo, hi = head["test_ci"]["balanced_accuracy"]
        assert 0.25 < lo <= head["splits"]["test"]["mean"]["balanced_accuracy"] <= hi  # beats chance, CI and all
        for c in CLASSES:  # per-class F1 with its CI
            assert 0 <= head["splits"]["test"]["mean"][f"f1/{c}"] <= 1 and len(head["test_ci"][f"f1/{c}"]) == 2
        weights = head["loss"]["class_weights"]  # balanced: the rarest class weighs the most
        train_counts = np.bincount(pd.read_parquet(run_dir / "predictions.parquet").query("split == 'train'")
                                   .drop_duplicates("sample_id")["y/diagnosis"].astype(int), minlength=4)
        assert np.argmax(weights) == np.argmin(train_counts) and np.argmin(weights) == np.argmax(train_counts)
        assert "majority_collapse" not in {f["name"] for f in head["flags"]}
        checkpoint = paths["collapsed"].parent / name
        assert f"backbone {checkpoint} " in (run_dir / "report.html").read_text()  # the checkpoint, not model.name
        curves = pd.read_parquet(run_dir / "curves.parquet").query("seed == 0")
        lr = curves["lr"].to_numpy()
        assert lr[0] < lr[1] and np.all(np.diff(lr[1:]) <= 0)  # warmup, then cosine decay

        # label efficiency: every head on few-shot episodes and label fractions, a curve in the report
        block = m["efficiency"]
        assert {p["head"] for p in block["points"]} == {"linear", "logreg", "knn"}
        full = next(p for p in block["points"] if (p["head"], p["protocol"], p["value"]) == ("logreg", "fraction", 1.0))
        assert full["interval"][0] > 0.25  # every training patient labelled: beats chance, interval and all
        assert any(p["status"] == "missing" for p in block["points"])  # K = 32 DRUSEN patients: not in the stand-in
        assert set(block["labels_needed"]) == {"linear", "logreg", "knn"}
        assert "label-efficiency curve (fraction)" in (run_dir / "report.html").read_text()

    collapsed = {f["name"]: f for f in runs["vjepa2_tiny_collapsed.pt"][1]["heads"]["linear"]["flags"]}
    assert collapsed["majority_collapse"]["severity"] == "error"
    assert collapsed["majority_collapse"]["details"]["predicted_share"] == 1.0
    sweep_report = paths["runs"] / "_sweeps" / "oct-vjepa2-checkpoints" / "report.html"
    assert "label-efficiency curves (fraction)" in sweep_report.read_text()  # one curve per checkpoint and head

    board_csv, board_html = tmp_path / "leaderboard.csv", tmp_path / "leaderboard.html"
    result = runner.invoke(app, ["leaderboard", "--runs", str(paths["runs"]), "--experiment", "oct-vjepa2",
                                 "--csv", str(board_csv), "--html", str(board_html)])  # fmt: skip
    assert result.exit_code == 0, result.output
    board = pd.read_csv(board_csv, keep_default_na=False)
    assert len(board) == 9 and set(board["metric"]) == {"balanced_accuracy"}  # 3 checkpoints x 3 heads
    collapsed_rows = board[board["model.checkpoint"].str.endswith("vjepa2_tiny_collapsed.pt")]
    assert sorted(collapsed_rows["rank"]) == [7, 8, 9]
    assert collapsed_rows["flags"].str.split(";").map(lambda f: "majority_collapse" in f).all()
    assert not board[board["rank"] < 7]["flags"].str.contains("majority_collapse").any()
    assert "majority_collapse" in board_html.read_text()

    single, multi = runs["vjepa2_tiny_oct_single.pt"][0], runs["vjepa2_tiny_multidomain.pt"][0]
    paired = compare_runs(multi, single, n_resamples=200)  # multi-domain minus single-domain, same test eyes
    assert paired["metric"] == "balanced_accuracy" and paired["resampled"] == "groups"
    assert paired["lo"] <= paired["diff"] <= paired["hi"]
