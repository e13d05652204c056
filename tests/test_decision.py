"""The study's decision over VLMs: the weighted score with its range over the CIs, the outcome rule that fires, the
speed ratio to the baseline, and reconstruction and speed files feeding gate-points' matrix and report."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from fmprobe.diagnostics.speed import ratio_interval, speed_command
from fmprobe.experiments.decision import decide
from fmprobe.experiments.gates import Criterion, GatesSpec, Level, OutcomeRule, utility, weighted_score
from fmprobe.experiments.point_gates import points_command

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPATIAL = Criterion(name="spatial IoU", metric="recon/spatial_iou", target=0.65, acceptable=0.60, fail=0.55,
                    weight=40, controls=["pixel"], margin=0.02)  # fmt: skip
BBOX = Criterion(name="bbox IoU", metric="still/box_iou", target=0.60, acceptable=0.50, fail=0.40, weight=20)
LPIPS = Criterion(name="LPIPS", metric="recon/lpips", target=0.30, acceptable=0.35, fail=0.45, weight=15)
SPEED = Criterion(name="speed", metric="speed_ratio", target=1.0, acceptable=2.0, fail=3.0, weight=15, must_pass=False)
SIMPLE = Criterion(name="integration", metric="integration", target=1.0, acceptable=0.5, fail=0.0, weight=10,
                   must_pass=False)  # fmt: skip
SPEC = GatesSpec(criteria=[SPATIAL, BBOX, LPIPS, SPEED, SIMPLE],
                 outcome=OutcomeRule(criterion="spatial IoU", hybrid_below=0.55, major_pivot_below=0.50))


def test_weighted_score_is_the_weighted_mean_of_utilities_and_its_range_follows_the_cis():
    assert utility(SPATIAL, 0.60) == pytest.approx(0.5) and utility(SPATIAL, 0.7) == 1 and utility(SPATIAL, 0.5) == 0
    assert utility(LPIPS, 0.30) == 1 and utility(LPIPS, 0.375) == pytest.approx(0.5)  # lower is better
    assert utility(SPEED, 2.5) == pytest.approx(0.25)  # linear from fail (3x) to target (1x)
    step = Criterion(metric="linear_cka", acceptable=0.4)
    assert (utility(step, 0.41), utility(step, 0.39)) == (1.0, 0.0)
    levels = {"spatial IoU": Level("pass", 0.62, 0.60, 0.64), "bbox IoU": Level("pass", 0.55, 0.50, 0.60),
              "LPIPS": Level("pass", 0.33, 0.31, 0.35), "speed": Level("pass", 1.5, 1.2, 1.8),
              "integration": Level("pass", 0.8, 0.8, 0.8)}  # fmt: skip
    got = weighted_score(SPEC, levels)
    u = {"spatial IoU": 0.7, "bbox IoU": 0.75, "LPIPS": 0.8, "speed": 0.75, "integration": 0.8}
    assert got["score"] == pytest.approx(sum(c.weight * u[c.name] for c in SPEC.criteria) / 100)
    lo = (40 * 0.5 + 20 * 0.5 + 15 * 0.666666 + 15 * 0.6 + 10 * 0.8) / 100
    hi = (40 * 0.9 + 20 * 1.0 + 15 * 0.933333 + 15 * 0.9 + 10 * 0.8) / 100
    assert got["lo"] == pytest.approx(lo, abs=1e-5) and got["hi"] == pytest.approx(hi, abs=1e-5)


def _model(name, verdict, spatial, weighted=0.5, beats="pass"):
    point, lo, hi, level = spatial
    return {"model": name, "point": "p", "verdict": verdict, "weighted": {"score": weighted},
            "levels": {"spatial IoU": {"level": level, "point": point, "lo": lo, "hi": hi,
                                       "beats": {"pixel": {"level": beats}}}}}  # fmt: skip


@pytest.mark.parametrize("summary, outcome, models", [
    ([_model("a", "accept", (0.7, 0.66, 0.74, "target"), 0.6), _model("b", "accept", (0.7, 0.66, 0.74, "target"), 0.8),
      _model("c", "accept", (0.7, 0.66, 0.74, "target"), 0.7)], "select", ["b", "c"]),
    ([_model("a", "accept", (0.7, 0.66, 0.74, "target")), _model("b", "reject", (0.3, 0.2, 0.4, "fail"))],
     "proceed", ["a"]),
    ([_model("a", "inconclusive", (0.61, 0.58, 0.64, "inconclusive")), _model("b", "reject", (0.3, 0.2, 0.4, "fail"))],
     "undecided", ["a"]),
    ([_model("a", "reject", (0.7, 0.66, 0.74, "target")), _model("b", "reject", (0.3, 0.2, 0.4, "fail"))],
     "investigate", ["a"]),
    ([_model("a", "reject", (0.58, 0.56, 0.60, "fail")), _model("b", "reject", (0.3, 0.2, 0.4, "fail"))],
     "marginal", ["a"]),
    ([_model("a", "reject", (0.58, 0.56, 0.60, "fail"), beats="fail"), _model("b", "reject", (0.53, 0.51, 0.55, "fail"))],
     "pivot to hybrid", ["b"]),  # a is above 0.55 but does not beat its pixel control: it does not count
    ([_model("a", "reject", (0.52, 0.49, 0.55, "fail"))], "major pivot", []),
])  # fmt: skip
def test_the_outcome_rule_that_fires(summary, outcome, models):
    got = decide(SPEC, summary)
    assert (got["outcome"], got["models"]) == (outcome, models), got["text"]
    assert decide(GatesSpec(criteria=[SPATIAL]), summary) is None
    with pytest.raises(ValueError, match="outcome.criterion 'nope'"):
        GatesSpec(criteria=[SPATIAL], outcome=OutcomeRule(criterion="nope", hybrid_below=0.5, major_pivot_below=0.4))


def test_speed_is_timed_in_one_run_against_the_baseline(tmp_path, tiny_dinov2_dir):
    for name, layers in (("base", [-1]), ("other", [0, -1])):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": name, "data": {"manifest": "unused.csv"}, "task": {"type": "binary", "targets": ["y"]},
            "model": {"name": str(tiny_dinov2_dir), "layers": layers}}))  # fmt: skip
    out = speed_command([str(tmp_path / "other.yaml")], str(tmp_path / "base.yaml"), -1, batch=2, repeats=3,
                        warmup=1, bootstrap=50, out=tmp_path / "out")  # fmt: skip
    base = out["baseline"]
    assert base["model"] == "base" and len(base["seconds_before"]) == len(base["seconds_after"]) == 3
    reference = np.median(base["seconds_before"] + base["seconds_after"])
    assert [r["point"] for r in out["results"]] == ["0", "-1"] and base["drift"] > 0
    for r in out["results"]:
        assert r["model"] == "other" and r["ratio"] == pytest.approx(np.median(r["seconds"]) / reference)
        assert r["ci"][0] <= r["ratio"] <= r["ci"][1]
    assert ratio_interval([2.0, 2.0], [1.0, 1.0], n_resamples=10) == [2.0, 2.0]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 4), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_gate_points_reads_reconstructions_and_speed_into_the_matrix_and_the_outcome(tmp_path):
    def spatial(model, box):
        return {"encoder": model, "model": model, "image_size": 64, "frames": None, "n_train": 8, "n_test": 4,
                "steps": 3, "results": [{"layer": "p", "grid": [1, 2, 2], "dim": 4, "box_iou": box, "mask_iou": box,
                                         "map50": 0.3, "box_iou_prior": 0.1, "mask_iou_prior": 0.0,
                                         "ci": {"box_iou": [box - 0.02, box + 0.02]}}]}  # fmt: skip

    def recon(model, iou, lpips):
        return {"model": model, "results": [{"layer": "p", "lpips": lpips, "ssim": 0.8, "edge_f1": 0.6,
                                             "spatial_iou": iou, "map50": 0.4, "gallery": "gallery_p.png",
                                             "ci": {"spatial_iou": [iou - 0.02, iou + 0.02],
                                                    "lpips": [lpips - 0.01, lpips + 0.01]},
                                             "vs": {"pixel": {"spatial_iou": {"diff": iou - 0.5, "lo": iou - 0.52,
                                                                              "hi": iou - 0.48}}}}],
                "controls": []}  # fmt: skip

    files = {}
    for model, box, iou, lpips in (("good", 0.7, 0.75, 0.25), ("weak", 0.45, 0.51, 0.5)):
        for kind, data, name in (("spatial", spatial(model, box), "spatial.json"),
                                 ("recon", recon(model, iou, lpips), "reconstruct.json")):  # fmt: skip
            folder = tmp_path / f"{kind}-{model}"
            folder.mkdir()
            (folder / name).write_text(json.dumps(data))
            files.setdefault(kind, []).append(folder)
        (tmp_path / f"recon-{model}" / "gallery_p.png").write_bytes(_png())
    (tmp_path / "speed.json").write_text(json.dumps({"results": [
        {"model": "good", "point": "p", "ratio": 1.4, "ci": [1.3, 1.5]},
        {"model": "weak", "point": "p", "ratio": 1.0, "ci": [0.9, 1.1]}]}))  # fmt: skip
    (tmp_path / "complexity.csv").write_text("model,point,metric,mean,ci_lo,ci_hi\ngood,p,integration,0.8,,\n"
                                             "weak,p,integration,1.0,,\n")  # fmt: skip
    gates = tmp_path / "gates.yaml"
    gates.write_text(yaml.safe_dump({"reject_flags": "none", "criteria": [c.model_dump() for c in SPEC.criteria],
                                     "outcome": SPEC.outcome.model_dump()}))  # fmt: skip
    report = points_command(gates, files["spatial"], reconstructions=files["recon"], speeds=[tmp_path / "speed.json"],
                            tables=[tmp_path / "complexity.csv"], out=tmp_path / "out")  # fmt: skip
    out = json.loads((tmp_path / "out" / "gates.json").read_text())
    assert out["outcome"]["outcome"] == "proceed" and out["outcome"]["models"] == ["good"]
    assert report.chosen.label == "good/p"
    models = {m["model"]: m for m in out["models"]}
    assert models["good"]["levels"]["spatial IoU"]["beats"]["pixel"]["level"] == "pass"
    assert models["weak"]["weighted"]["score"] < models["good"]["weighted"]["score"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="outcome"' in html and "proceed: good" in html and "weighted score [range over the CIs]" in html
    decision = html[html.index('<table id="decision">'):]
    decision = decision[: decision.index("</table>")]
    assert '<span class="lv-target">target</span>' in decision and '<span class="lv-fail">fail</span>' in decision
    assert '<td class="c-target">' in decision and '<td class="c-fail">' in decision  # cells coloured by level
    assert html.count(base64.b64encode(_png()).decode()) == 2  # each model's gallery
