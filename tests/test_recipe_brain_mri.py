"""Recipe examples/brain_mri: T1w volumes -> age + MMSE regression and sex, six arms (EVA ViT-g frozen, EVA ViT-g
with ln_vision trained, CLIP ViT-L/LLaVA frozen, BLIP-2's projector + ln_vision trained at three projector learning
rates), and the identical-results check across them."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fmprobe.adapt.setup import prepare
from fmprobe.backbones.registry import load_encoder
from fmprobe.cli import app
from fmprobe.config import HeadConfig, ModelConfig, load_config, parse_config
from fmprobe.errors import ConfigError
from fmprobe.experiments.gates import load_gates
from fmprobe.experiments.sweep import expand, load_sweep
from fmprobe.heads import build_head
from fmprobe.standin import models
from fmprobe.standin.configs import standin_yaml

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "brain_mri"


def _generator():
    spec = importlib.util.spec_from_file_location("brain_mri_standin", RECIPE / "make_standin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arms(sweep: Path) -> list:
    return yaml.safe_load(sweep.read_text())["grid"][_generator().ARMS]


def test_real_yamls_validate_and_name_the_real_models():
    age, sex = load_config(RECIPE / "age_mmse.yaml"), load_config(RECIPE / "sex.yaml")
    assert age.task.targets == ["age", "mmse"] and sex.task.type == "binary"
    # MMSE has fewer labelled sessions than age: each target on its own rows; arms ranked by age, not a mean R²
    assert age.task.missing_targets == "mask" and age.task.primary_metric == "r2/age"
    assert age.data.kind == "volume" and age.data.volume_mode == "slices" and age.data.group_column == "subject"
    assert len(age.train.seeds) >= 3 and age.eval.bootstrap == 1000
    # sex.yaml is age_mmse.yaml with another task: the two sweeps compare the arms on the same footing
    a, s = (yaml.safe_load((RECIPE / f).read_text()) for f in ("age_mmse.yaml", "sex.yaml"))
    assert {k: v for k, v in a.items() if k not in ("name", "task")} == {k: v for k, v in s.items()
                                                                       if k not in ("name", "task")}
    assert _arms(RECIPE / "sweep.yaml") == _arms(RECIPE / "sweep_sex.yaml")
    for sweep, base in (("sweep.yaml", age), ("sweep_sex.yaml", sex)):
        points = expand(load_sweep(RECIPE / sweep))
        assert len(points) == 6 and {p.exp.task.type for p in points} == {base.task.type}
        assert [p.exp.model.name for p in points] == ["Salesforce/blip2-opt-2.7b"] * 2 + [
            "openai/clip-vit-large-patch14-336"] + ["Salesforce/blip2-opt-2.7b"] * 3
        assert [p.exp.adapt.strategy for p in points] == ["frozen", "staged", "frozen"] + ["staged"] * 3
        ln = points[1].exp.adapt
        assert (ln.unfreeze, ln.partial_blocks, ln.modules["post_layernorm"].lr) == ("partial", 0, 1e-4)
        # the study's projector arms: Q-Former + language projection (+ ln_vision) at the projector lrs it searched,
        # the head on the tokens the language model reads, no ViT block trained
        projector = [p.exp for p in points[3:]]
        assert [e.adapt.modules["projector"].lr for e in projector] == [1e-4, 1e-5, 1e-6]
        for e in projector:
            assert e.model.layers == ["language_projection"] and e.heads[0].layer == "language_projection"
            assert (e.adapt.unfreeze, e.adapt.partial_blocks, e.adapt.modules["post_layernorm"].lr) == (
                "partial", 0, 1e-4)
            assert e.adapt.modules["projector"].warmup_epochs == 1
    gates = load_gates(RECIPE / "gates.yaml")
    assert gates.experiment == age.name and gates.reject_flags == "error"


def test_ln_vision_arm_trains_post_layernorm_and_the_head_only(tmp_path):
    """partial_blocks 0 + modules: {post_layernorm: ...} = LAVIS' ln_vision in its own group, no ViT block."""
    encoder = load_encoder(ModelConfig(name=str(models.blip2(tmp_path / "blip2"))))
    sweep_arm = _arms(RECIPE / "sweep.yaml")[1][3]
    exp = parse_config({"name": "x", "data": {"manifest": "m.csv"}, "task": {"type": "regression", "targets": ["age"]},
                        "adapt": {**sweep_arm, "device": "cpu"}})  # fmt: skip
    head_cfg = HeadConfig()
    head = build_head(head_cfg, 32, 1)
    prepared = prepare(exp, encoder, head, head_cfg, steps_per_epoch=1)
    trained = {n for n, p in encoder.model.named_parameters() if p.requires_grad}
    assert trained == {"post_layernorm.weight", "post_layernorm.bias"}
    assert prepared.partial_modules == ["post_layernorm"]
    assert {g["kind"]: g["base_lr"] for g in prepared.groups} == {"head": 1e-4, "module:post_layernorm": 1e-4}
    assert prepared.trainable == 2 * 32 + 33
    # nothing to train: CLIP's post_layernorm never touches the tokens; a head on a block has no norm after it
    clip = load_encoder(ModelConfig(name=str(models.clip(tmp_path / "clip"))))
    with pytest.raises(ConfigError, match="applies no final norm"):
        prepare(exp, clip, build_head(head_cfg, 32, 1), head_cfg, steps_per_epoch=1)
    on_block = HeadConfig(layer=0)
    with pytest.raises(ConfigError, match="head reads block 0"):
        prepare(exp, load_encoder(ModelConfig(name=str(tmp_path / "blip2"))), build_head(on_block, 32, 1), on_block,
                steps_per_epoch=1)  # fmt: skip


def test_projector_arm_trains_query_tokens_qformer_language_projection_and_ln_vision_only(tmp_path):
    """The recipe's projector arm on the stand-in's full BLIP-2 checkpoint: every projector weight and ln_vision in
    their own groups at the arm's learning rates; no ViT block, no language model."""
    source = str(models.blip2(tmp_path / "blip2"))
    for arm, lr in zip(_arms(RECIPE / "sweep.yaml")[3:], (1e-4, 1e-5, 1e-6)):
        model_name, layers, head_layer, adapt = arm
        assert model_name == "Salesforce/blip2-opt-2.7b"
        encoder = load_encoder(ModelConfig(name=source, layers=layers))
        exp = parse_config({"name": "x", "data": {"manifest": "m.csv"}, "model": {"name": source, "layers": layers},
                            "heads": [{"layer": head_layer}], "task": {"type": "regression", "targets": ["age"]},
                            "adapt": {**adapt, "device": "cpu"}})  # fmt: skip
        head_cfg = exp.heads[0]
        head = build_head(head_cfg, 32, 1)
        prepared = prepare(exp, encoder, head, head_cfg, steps_per_epoch=1)
        trained = {n for n, p in encoder.model.named_parameters() if p.requires_grad}
        projector = {n for n, _ in encoder.model.named_parameters() if n.startswith("projector.")}
        assert {"projector.query_tokens", "projector.language_projection.weight"} <= projector
        assert any(n.startswith("projector.qformer.") for n in projector)
        assert trained == projector | {"post_layernorm.weight", "post_layernorm.bias"}
        assert {g["kind"]: g["base_lr"] for g in prepared.groups} == {
            "head": 1e-4, "module:post_layernorm": 1e-4, "module:projector": lr}
        assert not any("language_model" in n for n, _ in encoder.named_parameters())


def test_standin_volumes_have_the_real_layout_and_the_signal(tmp_path):
    gen = _generator()
    manifest = pd.read_csv(gen.write_dataset(tmp_path, subjects=16))
    assert list(manifest.columns) == ["sample_id", "path", "subject", "session", "age", "mmse", "male"]
    sessions = manifest.groupby("subject").size()
    assert sessions.max() == 2 and sessions.min() == 1  # follow-ups: grouping by subject matters
    img = nib.load(tmp_path / manifest.path[0])
    assert img.shape == gen.SHAPE and img.get_data_dtype() == np.int16 and np.allclose(np.diag(img.affine)[:3], 4.8)
    # age -> CSF in the central slab (dark voxels inside the head); sex -> head size (voxels above background)
    dark, size = [], []
    for path in manifest.path:
        vol = np.asarray(nib.load(tmp_path / path).dataobj, dtype=np.float32)
        head = vol > 0.1 * np.percentile(vol, 99)  # white matter ~ the 99th percentile, CSF ~ 0.16 of it
        slab = (slice(10, 30), slice(12, 36), slice(16, 26))
        dark.append(np.mean(vol[slab][head[slab]] < 0.35 * np.percentile(vol, 99)))
        size.append(head.sum())
    assert np.corrcoef(manifest.age, dark)[0, 1] > 0.5
    assert np.mean(np.array(size)[manifest.male == 1]) > 1.1 * np.mean(np.array(size)[manifest.male == 0])
    scored = manifest.mmse.notna()
    assert manifest.age.notna().all() and 0.2 < scored.mean() < 0.8  # MMSE missing for many sessions
    assert (manifest.groupby("subject")["mmse"].count() % manifest.groupby("subject").size()).eq(0).all()
    assert np.corrcoef(manifest.age[scored], manifest.mmse[scored])[0, 1] < -0.2


def _cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _flags(metrics: dict) -> set[str]:
    return {f["name"] for f in metrics["flags"]}


@pytest.mark.slow
def test_standin_study_end_to_end(tmp_path):
    gen = _generator()
    out = gen.main(tmp_path / "standin")
    runs = tmp_path / "standin" / "runs"

    # the six arms on age + MMSE
    _cli("sweep", str(out["sweep"]))
    sweep = json.loads((runs / "_sweeps" / "brain-mri-age-mmse-encoders" / "sweep.json").read_text())
    arms = [Path(r["run_dir"]) for r in sweep["runs"]]
    assert [r["status"] for r in sweep["runs"]] == ["ran"] * 6
    for run_dir in arms:
        m = _metrics(run_dir)
        head = m["heads"]["linear"]
        assert m["bootstrap"]["unit"] == "group" and m["seeds"] == [0, 1, 2]
        rows = m["task"]["rows_per_target"]  # each target trained and scored on the rows where it exists
        assert all(rows["mmse"][s] < rows["age"][s] for s in ("train", "test")), rows
        for metric in ("r2/age", "r2/mmse"):
            lo, hi = head["test_ci"][metric]
            assert lo < head["splits"]["test"]["mean"][metric] < hi
        assert m["baseline"]["test"]["r2/age"] <= 0 and m["baseline"]["test"]["r2/mmse"] <= 0
        # sessions of one subject never straddle splits (and there are follow-ups, so this was at stake)
        assert m["split"]["group_overlap"] == [] and m["split"]["groups"]["train"] < m["split"]["sizes"]["train"]
        preds = pd.read_parquet(run_dir / "predictions.parquet")
        assert (preds.groupby("group")["split"].nunique() == 1).all()
        # the identical-results check ran against the other arms and stayed silent: the encoders differ
        assert "identical_predictions" not in _flags(m)
        # age is learned on every arm (the point beats the baseline: no error); with 15 test subjects its CI may
        # still reach below the baseline, which is a warning, not a failure of the arm
        errors = {f["details"]["metric"] for f in m["flags"] if f["name"] == "below_baseline" and f["severity"] == "error"}
        assert "r2/age" not in errors and head["splits"]["test"]["mean"]["r2/age"] > 0.3
        assert (run_dir / "report.html").exists()
    ln = json.loads((arms[1] / "adaptation.json").read_text())["heads"]["linear"]["0"]
    assert ln["partial_modules"] == ["post_layernorm"]
    assert {g["name"].split("/")[0]: g["base_lr"] for g in ln["param_groups"]} == {
        "head": 1e-4, "module:post_layernorm": 1e-4}
    # the projector arms trained the projector at their own learning rate beside ln_vision, the head on the LM's
    # image tokens; stage 2 moved them (outputs differ from one learning rate to the next)
    for run_dir, lr in zip(arms[3:], (1e-4, 1e-5, 1e-6)):
        adapted = json.loads((run_dir / "adaptation.json").read_text())["heads"]["linear"]["0"]
        assert adapted["partial_modules"] == ["post_layernorm"]
        assert {g["name"].split("/")[0]: g["base_lr"] for g in adapted["param_groups"]} == {
            "head": 1e-4, "module:post_layernorm": 1e-4, "module:projector": lr}
        resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
        assert resolved["heads"][0]["layer"] == "language_projection"

    # sex: the same features (cache hit), another task
    _cli("run", str(out["sex"]), "--quiet")
    (sex_run,) = (runs / "brain-mri-sex").iterdir()
    sex = _metrics(sex_run)
    assert sex["heads"]["linear"]["splits"]["test"]["mean"]["auroc"] > 0.75
    assert len(sex["heads"]["linear"]["test_ci"]["auroc"]) == 2

    # an arm that is accidentally the same model (a second folder holding the same EVA weights) must be caught
    copy = shutil.copytree(out["blip2"], tmp_path / "standin" / "models" / "eva-vit-g-finetuned")
    duplicate = standin_yaml(out["sweep"], out["sweep"].parent / "sweep_duplicate.yaml",
                             set={("grid", gen.ARMS): [[str(copy), [-1], -1, {"strategy": "frozen"}]],
                                  "name": "brain-mri-duplicate-arm"})  # fmt: skip
    _cli("sweep", str(duplicate))
    (dup_run,) = set((runs / "brain-mri-age-mmse").iterdir()) - set(arms)
    flag = next(f for f in _metrics(dup_run)["flags"] if f["name"] == "identical_predictions")
    assert flag["severity"] == "error"
    assert flag["details"]["identical"] == [f"brain-mri-age-mmse/{arms[0].name}/linear"]

    _cli("leaderboard", "--runs", str(runs), "--experiment", "brain-mri-age-mmse", "--csv", str(tmp_path / "lb.csv"))
    board = pd.read_csv(tmp_path / "lb.csv")
    assert len(board) == 7 and "model.name" in board.columns and (board["n_seeds"] == 3).all()
    assert list(board["val_mean"]) == sorted(board["val_mean"], reverse=True)
    flagged = board[board["flags"].fillna("").str.contains("identical_predictions")]
    assert sorted(flagged["run_id"]) == sorted([arms[0].name, dup_run.name])  # both sides of the identical pair

    result = CliRunner().invoke(app, ["gate", str(out["gates"]), "--runs", str(runs), "--json",
                                      str(tmp_path / "gates.json")])  # fmt: skip
    verdicts = {Path(v["run_dir"]).name: v for v in json.loads((tmp_path / "gates.json").read_text())["verdicts"]}
    assert result.exit_code in (0, 1) and len(verdicts) == 7
    assert verdicts[dup_run.name]["verdict"] == "reject"
    assert any("identical_predictions" in r for r in verdicts[dup_run.name]["reasons"])
    assert verdicts[arms[0].name]["verdict"] == "reject"  # its twin makes it as suspect as the duplicate
    assert not any("sanity flag" in r for arm in arms[1:] for r in verdicts[arm.name]["reasons"])
