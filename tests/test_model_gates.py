"""Several models' extraction points side by side: paired point comparisons, the gates' decision matrix across models
and points (extensible by metric tables), and the resumable spatial sweep that produces them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fmprobe.cli import app
from fmprobe.diagnostics.spatial_pairs import compare_points
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.evaluate.bootstrap import interval_levels, p_value, resample_weights
from fmprobe.experiments.gates import Criterion, GatesSpec
from fmprobe.experiments.point_gates import gate_models, model_metrics, model_summary
from fmprobe.experiments.point_sweep import run_point_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spatial(encoder, values, frames=None, n=12, seed=0):
    """A spatial.json of ``encoder`` with per-image IoUs around each point's value."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-0.1, 0.1, n)  # image difficulty, shared by every point
    results = []
    for point, v in values.items():
        per = np.clip(v + base + rng.normal(0, 0.01, n), 0, 1)
        results.append({"layer": point, "grid": [1, 2, 2], "dim": 4, "box_iou": float(per.mean()) - 0.05,
                        "box_iou_prior": 0.1, "mask_iou": float(per.mean()), "mask_iou_prior": 0.0, "map50": v / 2,
                        "ci": {"box_iou": [v - 0.1, v], "mask_iou": [v - 0.05, v + 0.05], "map50": [v / 2 - 0.05, v / 2]},
                        "per_image": {"box_iou": (per - 0.05).tolist(), "mask_iou": per.tolist()}})  # fmt: skip
    return {"encoder": encoder, "image_size": 56, "frames": frames, "n_train": 8, "n_test": n // (frames or 1),
            "steps": 3, "results": results}  # fmt: skip


def test_compare_points_is_a_paired_bootstrap_over_the_same_images():
    spatial = _spatial("m", {"x@tiles": 0.7, "x@base": 0.6}, frames=2)
    out = compare_points(spatial, "x@tiles", "x@base", n_resamples=300, seed=4)
    rows = {r["layer"]: r for r in spatial["results"]}
    a, b = (np.asarray(rows[p]["per_image"]["mask_iou"]) for p in ("x@tiles", "x@base"))
    d = out["metrics"]["mask_iou"]
    assert d["diff"] == pytest.approx(a.mean() - b.mean()) and d["a"] == pytest.approx(a.mean())
    # the CI recomputed by hand: the same resamples (the two frames of a clip drawn together), mean differences
    draws = [(w @ a - w @ b) / w.sum() for w in next(resample_weights(12, groups=np.arange(12) // 2, n_resamples=300,
                                                                      seed=4))]  # fmt: skip
    # at the levels of the one interval every CI uses (expanded for the 6 clips drawn)
    assert [d["lo"], d["hi"]] == pytest.approx(list(np.quantile(draws, interval_levels(0.95, 6))))
    # shared difficulty cancels: every resampled difference is above 0 (p as small as 300 resamples of 6 clips allow)
    assert min(draws) > 0 and d["p_value"] == pytest.approx(p_value(np.asarray(draws), units=6)) and d["p_value"] < 0.06
    same = compare_points(spatial, "x@base", "x@base", n_resamples=50)["metrics"]["box_iou"]
    assert same["diff"] == same["lo"] == same["hi"] == 0
    with pytest.raises(ConfigError, match="'x@thumbnail' is not a point of m's spatial.json; it has: x@tiles, x@base"):
        compare_points(spatial, "x@thumbnail", "x@base")


SPEC = GatesSpec(criteria=[
    Criterion(name="iou", metric="still/mask_iou", target=0.7, acceptable=0.6, fail=0.45, must_pass=True, weight=2),
    Criterion(name="cka", metric="linear_cka", acceptable=0.4, must_pass=False),
    Criterion(name="direction", metric="direction_accuracy", acceptable=0.8, must_pass=False),
])  # fmt: skip


def _alignment(model, values):
    rows = list(values)
    return {"a": {"source": f"{model}.yaml", "model": model, "layers": rows}, "b": {"source": "ref.yaml", "layers": ["-1"]},
            "samples": 20, "matrices": {"linear_cka": {"rows": rows, "cols": ["-1"], "values": [[v] for v in values.values()],
                                                       "ci": [[[v - 0.1, v + 0.1]] for v in values.values()]}}}  # fmt: skip


def _tables():
    rows = [("org/a", "7", 0.9), ("org/a", "lm.0", 0.5), ("org/b", "x@base", 0.85), ("org/b", "x@tiles", 0.95)]
    return [pd.DataFrame([{"model": m, "point": p, "metric": "direction_accuracy", "mean": v, "ci_lo": np.nan,
                           "ci_hi": np.nan} for m, p, v in rows])]  # fmt: skip


def test_models_are_gated_side_by_side_and_summed_up_per_model():
    spatial = [_spatial("org/a", {"7": 0.66, "lm.0": 0.5}), _spatial("org/b", {"x@base": 0.62, "x@tiles": 0.85}, seed=1)]
    alignments = [_alignment("org/b", {"x@base": 0.25, "x@tiles": 0.55}), _alignment("org/a", {"7": 0.6, "lm.0": 0.6})]
    table = model_metrics(spatial, alignments, _tables())  # a metric table adds the "direction" column
    report = gate_models(SPEC, table)
    labels = [v.label for v in report.verdicts]
    assert sorted(labels) == ["org/a/7", "org/a/lm.0", "org/b/x@base", "org/b/x@tiles"]
    assert report.chosen.label == "org/b/x@tiles"  # iou target, cka pass, direction pass: ranked first across models
    got = {v.label: v for v in report.verdicts}
    assert got["org/a/lm.0"].verdict == "reject" and got["org/a/lm.0"].levels["direction"].level == "fail"
    assert got["org/b/x@base"].levels["cka"].level == "fail"  # CKA of org/b's alignment, not org/a's
    summary = model_summary(report)
    assert [(s["model"], s["point"]) for s in summary] == [("org/b", "x@tiles"), ("org/a", "7")]
    assert summary[1]["levels"]["iou"]["point"] == pytest.approx(got["org/a/7"].levels["iou"].point)


def test_an_alignment_must_name_a_measured_model():
    spatial = [_spatial("org/a", {"7": 0.7}), _spatial("org/b", {"1": 0.7})]
    with pytest.raises(FmprobeError, match="names model 'org/c', which no spatial.json measured"):
        model_metrics(spatial, [_alignment("org/c", {"7": 0.5})])
    with pytest.raises(FmprobeError, match="two alignments for model 'org/a'"):
        model_metrics(spatial, [_alignment("org/a", {"7": 0.5}), _alignment("org/a", {"7": 0.5})])
    with pytest.raises(FmprobeError, match=r"rows for models \['org/z'\]"):
        model_metrics(spatial, (), [_tables()[0].assign(model="org/z")])


def test_gate_points_cli_writes_the_decision_matrix_and_paired_comparisons(tmp_path):
    files = {"a": _spatial("org/a", {"7": 0.66, "lm.0": 0.5}),
             "b": _spatial("org/b", {"x@base": 0.62, "x@tiles": 0.85}, seed=1),
             "align-a": _alignment("org/a", {"7": 0.6, "lm.0": 0.6}),
             "align-b": _alignment("org/b", {"x@base": 0.25, "x@tiles": 0.55})}  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / ("alignment.json" if name.startswith("align") else "spatial.json")).write_text(json.dumps(data))
    _tables()[0].to_csv(tmp_path / "direction.csv", index=False)
    gates = tmp_path / "gates.yaml"
    gates.write_text(yaml.safe_dump({"criteria": [c.model_dump() for c in SPEC.criteria]}))
    runner = CliRunner()
    pair = runner.invoke(app, ["compare-points", str(tmp_path / "b"), "x@tiles", "x@base", "--resamples", "200",
                               "--out", str(tmp_path / "pair")])  # fmt: skip
    assert pair.exit_code == 0, pair.output
    result = runner.invoke(app, ["gate-points", str(gates), "--spatial", str(tmp_path / "a"), "--spatial",
                                 str(tmp_path / "b"), "--align", str(tmp_path / "align-a"), "--align",
                                 str(tmp_path / "align-b"), "--table", str(tmp_path / "direction.csv"), "--pair",
                                 str(tmp_path / "pair"), "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "out" / "gates.json").read_text())
    assert out["chosen"] == "org/b/x@tiles" and [m["model"] for m in out["models"]] == ["org/b", "org/a"]
    html = (tmp_path / "out" / "report.html").read_text()
    decision = html[html.index('<table id="decision">'):]
    decision = decision[: decision.index("</table>")]
    assert "<th>org/b</th><th>org/a</th>" in decision  # models are columns, best first
    assert all(c.name in decision for c in SPEC.criteria) and "<td>x@tiles</td><td>7</td>" in decision
    pairs = html[html.index('<table id="pairs">'):]
    assert "x@tiles" in pairs[: pairs.index("</table>")]
    assert html.count("data:image/png;base64,") == 4  # spatial + CKA curve per model
    points = pd.read_csv(tmp_path / "out" / "points.csv")
    assert set(points["model"]) == {"org/a", "org/b"} and "direction_accuracy" in set(points["metric"])


def _sweep(tmp_path, tiny_dinov2_dir, **extra):
    for name in ("a", "b"):
        config = {"name": name, "data": {"manifest": "unused.csv"}, "task": {"type": "binary", "targets": ["y"]},
                  "model": {"name": str(tiny_dinov2_dir), "layers": [0, -1]}, "heads": [{"layer": 0}]}  # fmt: skip
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    criteria = [{"name": "iou", "metric": "still/mask_iou", "acceptable": 0.0, "must_pass": True}]
    (tmp_path / "gates.yaml").write_text(yaml.safe_dump({"reject_flags": "none", "criteria": criteria}))
    sweep = {"models": ["a.yaml", "b.yaml"], "gates": "gates.yaml",
             "still": {"n_train": 6, "n_test": 4, "steps": 3, "bootstrap": 20},
             "controls": {"encoders": ["pixel"], "image_size": 32},
             "pairs": [{"model": "b.yaml", "a": "0", "b": "-1"}], **extra}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "sweep.yaml"


def test_spatial_sweep_runs_each_step_once_and_reruns_what_a_config_edit_changes(tmp_path, tiny_dinov2_dir):
    path = _sweep(tmp_path, tiny_dinov2_dir)
    events: list[str] = []
    report = run_point_sweep(path, on_event=events.append)
    ran = [e for e in events if e.startswith("running:")]
    assert len(ran) == 4  # a and b still, the pixel control, the pair
    assert report.counts["accept"] == 4  # every (model, point): mask IoU >= 0
    gates = json.loads((tmp_path / "out" / "gates" / "gates.json").read_text())
    assert [m["model"] for m in gates["models"]] == ["a", "b"]  # one checkpoint, two configs: two models (by name)
    assert (tmp_path / "out" / "pairs" / "b-0-vs--1" / "pair.json").exists()
    events.clear()
    run_point_sweep(path, on_event=events.append)
    assert not [e for e in events if e.startswith("running:")]  # everything done earlier
    config = yaml.safe_load((tmp_path / "a.yaml").read_text())
    config["model"]["image_size"] = 48
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config))
    events.clear()
    run_point_sweep(path, on_event=events.append)
    assert [e for e in events if e.startswith("running:")] == [f"running: {tmp_path / 'out' / 'a' / 'spatial-still'}"]


def test_spatial_sweep_refuses_a_bad_sweep_before_running(tmp_path, tiny_dinov2_dir):
    with pytest.raises(ConfigError, match="pairs name models"):
        run_point_sweep(_sweep(tmp_path, tiny_dinov2_dir, pairs=[{"model": "c.yaml", "a": "0", "b": "-1"}]))
    with pytest.raises(ConfigError, match="moving needs frames"):
        run_point_sweep(_sweep(tmp_path, tiny_dinov2_dir, moving={"n_train": 4}))
    with pytest.raises(ConfigError, match="unknown key"):
        run_point_sweep(_sweep(tmp_path, tiny_dinov2_dir, sweeps=2))
    assert not (tmp_path / "out").exists()
