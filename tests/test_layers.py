"""Layer-wise probing: the sweep experiment, and `fmprobe layers` end to end on a tiny DINOv2."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fmprobe.cli import app
from fmprobe.config import parse_config
from fmprobe.experiments.layers import layer_experiment, parse_layers
from fmprobe.errors import ConfigError


def test_parse_layers_keeps_module_paths():
    assert parse_layers("0, 3,-1,visual.merger") == [0, 3, -1, "visual.merger"]
    with pytest.raises(ConfigError, match="empty entry"):
        parse_layers("0,,1")


def test_sweep_experiment_copies_head_settings_and_extracts_every_layer_once(toy_study):
    exp = parse_config(toy_study("binary", n=12, heads=[
        {"type": "attentive", "pooling": "attentive", "num_heads": 2, "hidden": 16},
        {"type": "linear", "pooling": "cls+mean"},
    ]))
    sweep = layer_experiment(exp, [0, -1], ["linear", "attentive", "mlp"])
    assert sweep.model.layers == [0, -1] and sweep.features.store_tokens
    assert [h.name for h in sweep.heads] == ["linear@0", "linear@-1", "attentive@0", "attentive@-1", "mlp@0", "mlp@-1"]
    heads = {h.name: h for h in sweep.heads}
    assert heads["linear@-1"].pooling == "cls+mean" and heads["linear@-1"].layer == -1
    assert (heads["attentive@0"].num_heads, heads["attentive@0"].hidden) == (2, 16)
    assert heads["mlp@0"].pooling == "mean"  # not in the config: the defaults
    assert sweep.name == f"{exp.name}-layers" and exp.model.layers == [-1]  # the original is untouched
    with pytest.raises(ConfigError, match="at least two layers"):
        layer_experiment(exp, [-1], ["linear"])
    with pytest.raises(ConfigError, match="head types"):
        layer_experiment(exp, [0, -1], ["svm"])


def test_layers_command_writes_table_figure_and_page(tmp_path, toy_study):
    cfg = toy_study("multiclass", n=45, n_classes=3, train={"epochs": 3}, eval={"bootstrap": 50},
                    heads=[{"type": "attentive", "pooling": "attentive", "num_heads": 2}])
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["layers", str(path), "--layers", "0,-1", "--heads", "linear,attentive",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    run_dir = next((tmp_path / "runs" / "toy-layers").iterdir())
    summary = json.loads((run_dir / "layers.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    table = pd.read_csv(run_dir / "layers.csv")
    assert len(summary["rows"]) == len(table) == 4
    for row in summary["rows"]:
        head = metrics["heads"][f"{row['head_type']}@{row['layer']}"]
        assert head["layer"] == int(row["layer"])
        assert row["test_mean"] == head["splits"]["test"]["mean"]["balanced_accuracy"]
        assert [row["ci_low"], row["ci_high"]] == head["test_ci"]["balanced_accuracy"]
        assert row["ci_low"] <= row["test_mean"] <= row["ci_high"]
        # the run's metrics carry the per-class subgroups of the test split
        assert set(head["subgroups"]["groups"]) == {"true 0", "true 1", "true 2"}
    assert summary["best_on_validation"]["head"] == metrics["selection"]["best_head"]
    assert (run_dir / "layers.png").stat().st_size > 0
    page = (run_dir / "layers.html").read_text()
    assert "data:image/png;base64," in page and "<td>attentive</td><td>-1</td>" in page
    assert "Subgroups on test" in (run_dir / "report.html").read_text()
    assert "best on validation" in result.stdout


def test_a_layer_sweep_reproducing_a_run_s_head_is_info_not_an_error(tmp_path, toy_study):
    """`fmprobe layers` re-trains the config's own head at its own layer: the same configuration, so equal outputs
    are a reproduction (info), while the other layers' heads are no twins at all."""
    from fmprobe.experiments.run import run_experiment

    cfg = toy_study("binary", n=45, train={"epochs": 3}, eval={"bootstrap": 50},
                    heads=[{"type": "linear", "pooling": "cls+mean"}])
    first = run_experiment(parse_config(cfg), progress=False)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["layers", str(path), "--layers", "0,-1", "--heads", "linear", "--quiet"])
    assert result.exit_code == 0, result.output
    run_dir = next((tmp_path / "runs" / "toy-layers").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = {f["name"]: f for f in metrics["heads"]["linear@-1"]["flags"]}
    assert "identical_predictions" not in last and last["reproduced"]["severity"] == "info"
    assert last["reproduced"]["details"]["identical"] == [f"toy/{first.run_dir.name}/linear"]
    assert not {"identical_predictions", "reproduced"} & {f["name"] for f in metrics["heads"]["linear@0"]["flags"]}
    original = json.loads((first.run_dir / "metrics.json").read_text())
    assert [f["severity"] for f in original["heads"]["linear"]["flags"] if f["name"] == "reproduced"] == ["info"]
    assert "reproduced" not in pd.read_csv(run_dir / "layers.csv")["flags"].fillna("").str.cat()  # info is no flag
