"""Gates over extraction points: CIs of the spatial scores and of CKA, the metric table, verdicts, the report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fmprobe.cli import app
from fmprobe.diagnostics.align_cli import align_command
from fmprobe.diagnostics.alignment import linear_cka, rbf_cka
from fmprobe.diagnostics.alignment_ci import cka_interval, cka_resamples
from fmprobe.diagnostics.alignment_conventions import DEFAULT, AlignmentConventions
from fmprobe.diagnostics.spatial import coco_average_precision, match_detections
from fmprobe.diagnostics.spatial_ci import spatial_intervals
from fmprobe.diagnostics.spatial_run import spatial_command
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.evaluate.bootstrap import interval_levels, resample_weights
from fmprobe.experiments.gates import Criterion, GatesSpec, criterion_level
from fmprobe.experiments.point_gates import gate_points, point_metrics


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------- CIs


def _detections(rng: np.random.Generator, n: int):
    gts, dets = [], []
    for _ in range(n):
        gt = np.sort(rng.uniform(0, 50, size=(int(rng.integers(1, 4)), 4)).reshape(-1, 2, 2), axis=1).reshape(-1, 4)
        noisy = gt + rng.normal(0, 3, size=gt.shape)
        boxes = np.concatenate([noisy, rng.uniform(0, 50, size=(2, 4))])
        dets.append((boxes, rng.uniform(size=len(boxes))))
        gts.append(gt)
    return dets, gts


def test_spatial_ap_of_a_resample_is_coco_ap_of_the_repeated_images():
    rng = np.random.default_rng(0)
    dets, gts = _detections(rng, 12)
    matches = match_detections(dets, gts)
    per_image = {"box_iou": rng.uniform(size=12), "mask_iou": rng.uniform(size=12), "ap_matches": matches,
                 "n_gt": [len(g) for g in gts]}  # fmt: skip
    lo_hi = spatial_intervals(per_image, 2, n_resamples=300, seed=3)
    point = coco_average_precision(dets, gts)
    assert lo_hi["map50"][0] < point < lo_hi["map50"][1]
    assert lo_hi["mask_iou"][0] < per_image["mask_iou"].mean() < lo_hi["mask_iou"][1]
    # the same resamples, recomputed from scratch on the repeated images (slices of one sample drawn together)
    weights = next(resample_weights(12, groups=np.arange(12) // 2, n_resamples=300, seed=3))
    direct = []
    for w in weights:
        idx = np.repeat(np.arange(12), w.astype(np.int64))
        assert all(w[2 * k] == w[2 * k + 1] for k in range(6))
        direct.append(coco_average_precision([dets[i] for i in idx], [gts[i] for i in idx]))
    np.testing.assert_allclose(np.quantile(direct, interval_levels(0.95, 6)), lo_hi["map50"], atol=1e-12)


def test_spatial_intervals_refuse_misaligned_inputs():
    with pytest.raises(FmprobeError, match="do not line up"):
        spatial_intervals({"box_iou": [0.1] * 3, "mask_iou": [0.1] * 3, "ap_matches": [], "n_gt": []}, 1)


KORNBLITH_04 = AlignmentConventions(rbf_sigma_factor=0.4, rbf_median="full-matrix")


@pytest.mark.parametrize("metric, fn, conventions", [
    ("linear_cka", linear_cka, DEFAULT),
    ("rbf_cka", rbf_cka, DEFAULT),
    ("rbf_cka", lambda a, b: rbf_cka(a, b, 0.4, "full-matrix"), KORNBLITH_04),  # the CI follows the bandwidth rule
])
def test_cka_resamples_equal_cka_of_the_repeated_rows(metric, fn, conventions):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(30, 8))
    b = a @ rng.normal(size=(8, 5)) + rng.normal(size=(30, 5))
    point, values = cka_resamples(a, b, metric, n_resamples=20, seed=4, conventions=conventions)
    assert point == pytest.approx(fn(a, b), abs=1e-10)
    weights = next(resample_weights(30, n_resamples=20, seed=4))
    direct = [fn(a[idx], b[idx]) for idx in (np.repeat(np.arange(30), w.astype(np.int64)) for w in weights)]
    np.testing.assert_allclose(values, direct, atol=1e-8)


def test_cka_interval_is_bias_corrected_and_narrows_with_samples():
    rng = np.random.default_rng(2)

    def pair(n):
        a = rng.normal(size=(n, 20))
        return a, a[:, :5] @ rng.normal(size=(5, 10)) + 2 * rng.normal(size=(n, 10))

    a, b = pair(40)
    point, values = cka_resamples(a, b, n_resamples=300)
    lo, hi = cka_interval(a, b, n_resamples=300)
    bias = values.mean() - point
    assert bias > 0  # resamples have fewer distinct samples: CKA drifts up
    assert [lo, hi] == pytest.approx(list(np.quantile(values, interval_levels(0.95, 40)) - bias))
    assert lo < point < hi
    a2, b2 = pair(200)
    lo2, hi2 = cka_interval(a2, b2, n_resamples=100)
    assert hi2 - lo2 < hi - lo
    with pytest.raises(FmprobeError, match="no bootstrap CI for 'rsa'"):
        cka_interval(a, b, "rsa")


def test_align_command_bootstrap_gives_cka_intervals_only(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(40, 6))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", a + rng.normal(size=a.shape))
    out = align_command(str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), ["linear_cka", "rsa"],
                        out=tmp_path / "out", bootstrap=100)  # fmt: skip
    lo, hi = out["intervals"]["linear_cka"]
    assert lo < out["metrics"]["linear_cka"] < hi and out["intervals"]["rsa"] is None
    assert json.loads((tmp_path / "out" / "alignment.json").read_text())["ci_level"] == 0.95


def test_spatial_command_moving_shapes_on_an_image_encoder_stack_frames(tmp_path):
    result = spatial_command("pixel", n_train=4, n_test=3, image_size=32, steps=3, frames=2, bootstrap=50,
                             out=tmp_path)  # fmt: skip
    row = result["results"][0]
    assert result["frames"] == 2 and row["grid"] == [2, 2, 2]  # 2 frames of 2 x 2 patches of 16 px
    assert row["n_test_images"] == 6 and set(row["ci"]) == {"box_iou", "mask_iou", "map50"}
    for m, (lo, hi) in row["ci"].items():
        assert lo <= row[m] + 1e-9 and row[m] - 1e-9 <= hi, m
    assert json.loads((tmp_path / "spatial.json").read_text())["bootstrap"] == 50


# ------------------------------------------------------------------------------------------- gates


def _spatial(frames, values, ci=0.05):
    return {"encoder": "org/vlm", "image_size": 56, "frames": frames, "n_train": 8, "n_test": 4, "steps": 3,
            "results": [{"layer": p, "grid": [1, 2, 2], "dim": 4, "box_iou": v, "box_iou_prior": 0.1, "mask_iou": v,
                         "mask_iou_prior": 0.0, "map50": v / 2,
                         "ci": {m: [x - ci, x + ci] for m, x in (("box_iou", v), ("mask_iou", v), ("map50", v / 2))}}
                        for p, v in values.items()]}  # fmt: skip


def _alignment(values):
    rows = list(values)
    return {"a": {"source": "cfg.yaml", "layers": rows}, "b": {"source": "ref.yaml:-1", "layers": ["-1"]},
            "samples": 20, "conventions": DEFAULT.record(), "matrices": {
                "linear_cka": {"rows": rows, "cols": ["-1"], "values": [[v] for v in values.values()],
                               "ci": [[[v - 0.1, v + 0.1]] for v in values.values()]},
                "rsa": {"rows": rows, "cols": ["-1"], "values": [[0.3] for _ in rows]}}}  # fmt: skip


SPEC = GatesSpec(criteria=[
    Criterion(name="iou", metric="still/mask_iou", target=0.7, acceptable=0.6, fail=0.45, must_pass=True, weight=2),
    Criterion(name="cka", metric="linear_cka", acceptable=0.4, must_pass=False),
    Criterion(name="moving", metric="moving/mask_iou", acceptable=0.6, must_pass=False),
])  # fmt: skip


def test_point_verdicts_follow_the_levels_and_the_score_ranks_survivors():
    still = {"7": 0.80, "merger": 0.66, "lm.0": 0.62, "lm.27": 0.30}
    table = point_metrics([_spatial(None, still), _spatial(4, {k: v - 0.1 for k, v in still.items()})],
                          _alignment({"7": 0.25, "merger": 0.6, "lm.0": 0.7, "lm.27": 0.9}))  # fmt: skip
    assert set(table["metric"]) >= {"still/mask_iou", "moving/map50", "linear_cka", "rsa"}
    report = gate_points(SPEC, table, "org/vlm")
    got = {v.head: v for v in report.verdicts}
    assert got["lm.27"].verdict == "reject" and got["lm.0"].verdict == "inconclusive"  # CI [0.57, 0.67]
    assert got["7"].verdict == got["merger"].verdict == "accept"
    for v in report.verdicts:  # every level and score recomputed from the table and the thresholds
        for crit in SPEC.criteria:
            row = table[(table["point"] == v.head) & (table["metric"] == crit.metric)].iloc[0]
            assert v.levels[crit.name] == criterion_level(crit, row["mean"], row["ci_lo"], row["ci_hi"])
        points = {"target": 1, "pass": 2 / 3, "inconclusive": 1 / 3, "fail": 0}
        expected = sum(c.weight * points[v.levels[c.name].level] for c in SPEC.criteria) / 4
        assert v.score == pytest.approx(expected)
    # merger: iou pass (x2), cka pass, moving inconclusive (0.56 +- 0.05); block 7: target (x2), fail, pass
    assert got["merger"].score == pytest.approx((4 / 3 + 2 / 3 + 1 / 3) / 4)
    assert got["7"].score == pytest.approx((2 + 2 / 3) / 4)
    assert report.chosen.head == "7" and report.chosen.label == "org/vlm/7"
    assert [v.head for v in report.verdicts] == ["7", "merger", "lm.0", "lm.27"]


def test_gate_points_refuses_what_points_do_not_have():
    table = point_metrics([_spatial(None, {"7": 0.8})])
    with pytest.raises(ConfigError, match="experiment"):
        gate_points(GatesSpec(experiment="x", criteria=SPEC.criteria[:1]), table, "org/vlm")
    with pytest.raises(ConfigError, match="split: test"):
        gate_points(GatesSpec(criteria=[Criterion(metric="still/mask_iou", split="val", acceptable=0.5)]), table, "e")
    with pytest.raises(FmprobeError, match="no test metric 'linear_cka'"):
        gate_points(SPEC, table, "org/vlm")
    with pytest.raises(FmprobeError, match="same data kind"):
        point_metrics([_spatial(None, {"7": 0.8}), _spatial(None, {"7": 0.8})])


def test_gate_points_command_writes_verdicts_table_and_report(tmp_path):
    still = {"7": 0.80, "merger": 0.66}
    for name, data in {"still": _spatial(None, still), "moving": _spatial(4, still),
                       "pixel": {**_spatial(None, {"-1": 0.5}), "encoder": "pixel-patch-16"},
                       "align": _alignment({"7": 0.5, "merger": 0.5})}.items():  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / ("alignment.json" if name == "align" else "spatial.json")).write_text(json.dumps(data))
    gates = tmp_path / "gates.yaml"
    gates.write_text(yaml.safe_dump({"criteria": [c.model_dump() for c in SPEC.criteria]}))
    result = CliRunner().invoke(app, ["gate-points", str(gates), "--spatial", str(tmp_path / "still"), "--spatial",
                                      str(tmp_path / "moving" / "spatial.json"), "--align", str(tmp_path / "align"),
                                      "--control", str(tmp_path / "pixel"), "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "out" / "gates.json").read_text())
    assert out["chosen"] == "org/vlm/7" and [v["verdict"] for v in out["verdicts"]] == ["accept", "accept"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="verdicts"' in html and 'id="controls"' in html and "pixel-patch-16" in html
    assert html.count("data:image/png;base64,") == 4  # still, moving, linear_cka, rsa
    assert "mutual_knn, knn_recall: the k = 10 nearest other samples by cosine similarity" in html  # conventions
    assert (tmp_path / "out" / "points.csv").read_text().startswith("point,metric,mean,ci_lo,ci_hi")
    missing = CliRunner().invoke(app, ["gate-points", str(gates), "--spatial", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_points_report_lists_every_point_in_the_shared_gates_tables(tmp_path):
    from fmprobe.report.points import write_points_report

    still = {"7": 0.80, "merger": 0.66}
    spatial = [_spatial(None, still), _spatial(4, still)]
    table = point_metrics(spatial, _alignment({"7": 0.25, "merger": 0.6}))
    report = gate_points(SPEC, table, "org/vlm")
    html = write_points_report(tmp_path / "report.html", report, table, spatial, None).read_text()
    verdicts = html[html.index('<table id="verdicts">'):]
    verdicts = verdicts[: verdicts.index("</table>")]
    assert "<th class=\"l\">extraction point</th>" in verdicts
    assert all(f'<td class="l">{p}</td>' in verdicts for p in still)
    criteria = html[html.index('<table id="criteria">'):]
    assert '<th class="l">split</th>' not in criteria[: criteria.index("</table>")]
    # every point's level per criterion is shown and marked as its level, as the gate decided it
    for point in still:
        row = verdicts[verdicts.index(f'<td class="l">{point}</td>'):]
        row = row[: row.index("</tr>")]
        levels = [v.levels[c.name].level for v in report.verdicts if v.label.endswith(f"/{point}")
                  for c in SPEC.criteria]  # fmt: skip
        assert re.findall(r'<span class="lv-(\w+)">\1</span>', row) == levels
