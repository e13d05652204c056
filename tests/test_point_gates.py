"""Gates over extraction points: CIs of the spatial scores and of CKA, the metric table, verdicts, the report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fmprobe.cli import app
from fmprobe.diagnostics.align_cli import align_command
from fmprobe.diagnostics.alignment import linear_cka, rbf_cka
from fmprobe.diagnostics.alignment_ci import alignment_interval, cka_resamples, metric_resamples
from fmprobe.diagnostics.alignment_conventions import DEFAULT, AlignmentConventions
from fmprobe.diagnostics.spatial import coco_average_precision, match_detections
from fmprobe.diagnostics.spatial_ci import spatial_intervals
from fmprobe.diagnostics.spatial_run import spatial_command
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.evaluate.bootstrap import interval_levels, resample_weights
from fmprobe.experiments.gates import Criterion, GatesSpec, control_level, criterion_level
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
    lo, hi = alignment_interval(a, b, n_resamples=300)
    bias = values.mean() - point
    assert bias > 0  # resamples have fewer distinct samples: CKA drifts up
    assert [lo, hi] == pytest.approx(list(np.quantile(values, interval_levels(0.95, 40)) - bias))
    assert lo < point < hi
    a2, b2 = pair(200)
    lo2, hi2 = alignment_interval(a2, b2, n_resamples=100)
    assert hi2 - lo2 < hi - lo
    with pytest.raises(FmprobeError, match="no bootstrap CI for 'debiased_cka'"):
        alignment_interval(a, b, "debiased_cka")


def test_align_command_bootstrap_gives_intervals_to_every_metric_that_has_one(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(40, 6))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", a + rng.normal(size=a.shape))
    metrics = ["linear_cka", "rsa", "knn_recall", "linear_r2", "debiased_cka"]
    out = align_command(str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), metrics, out=tmp_path / "out", bootstrap=100)
    for metric in metrics[:-1]:
        lo, hi = out["intervals"][metric]
        assert lo < out["metrics"][metric] < hi, metric
    assert out["intervals"]["debiased_cka"] is None
    assert json.loads((tmp_path / "out" / "alignment.json").read_text())["ci_level"] == 0.95


def test_rsa_resamples_leave_out_the_pairs_of_copies_and_knn_searches_distinct_samples():
    from scipy.stats import spearmanr

    from fmprobe.diagnostics.alignment import rsa

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(25, 4)), rng.normal(size=(25, 4))
    point, rsas = metric_resamples(a, b, "rsa", n_resamples=3, seed=9)
    _, recalls = metric_resamples(a, b, "knn_recall", n_resamples=3, seed=9)
    assert point == pytest.approx(rsa(a, b))
    da, db = 1 - np.corrcoef(a), 1 - np.corrcoef(b)
    unit_a, unit_b = a / np.linalg.norm(a, axis=1)[:, None], b / np.linalg.norm(b, axis=1)[:, None]
    for w, rsa_value, recall in zip(next(resample_weights(25, n_resamples=3, seed=9)), rsas, recalls):
        idx = np.repeat(np.arange(25), w.astype(np.int64))
        pairs = [(p, q) for i, p in enumerate(idx) for q in idx[i + 1 :] if p != q]  # copies' pairs left out
        expected = spearmanr([da[p, q] for p, q in pairs], [db[p, q] for p, q in pairs]).statistic
        assert rsa_value == pytest.approx(expected)
        # recall@10: each drawn sample's neighbours among the distinct other samples, its hit weighted by its draws
        gallery, counts = np.unique(idx, return_counts=True)
        hit = {}
        for g in gallery:
            others = [h for h in gallery if h != g]
            near_a = sorted(others, key=lambda h: -unit_a[g] @ unit_a[h])[:10]
            hit[g] = max(others, key=lambda h: unit_b[g] @ unit_b[h]) in near_a
        assert recall == pytest.approx(sum(hit[g] * c for g, c in zip(gallery, counts)) / counts.sum())


@pytest.mark.parametrize("metric", ["rsa", "knn_recall"])
def test_rsa_and_recall_intervals_cover_the_value_of_their_sample_size(metric):
    """Coverage by simulation: samples of 60 from one population; the truth is the metric's mean at N = 60."""
    from fmprobe.diagnostics.alignment import METRICS

    rng = np.random.default_rng(0)
    w_a, w_b = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))

    def draw():
        z = rng.normal(size=(60, 4))
        return z @ w_a + rng.normal(size=(60, 8)), z @ w_b + 1.5 * rng.normal(size=(60, 8))

    truth = np.mean([METRICS[metric](*draw(), DEFAULT, 0) for _ in range(300)])
    covered = [lo <= truth <= hi for lo, hi in (alignment_interval(*draw(), metric, n_resamples=200, seed=s)
                                                for s in range(40))]  # fmt: skip
    assert np.mean(covered) >= 0.8


def test_spatial_command_moving_shapes_on_an_image_encoder_stack_frames(tmp_path):
    result = spatial_command("pixel", n_train=4, n_test=3, image_size=32, steps=3, frames=2, bootstrap=50,
                             out=tmp_path)  # fmt: skip
    row = result["results"][0]
    assert result["frames"] == 2 and row["grid"] == [2, 2, 2]  # 2 frames of 2 x 2 patches of 16 px
    assert row["n_test_images"] == 6 and set(row["ci"]) <= {"box_iou", "mask_iou", "map50", "direction_accuracy"}
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
    pixel = {"control": "pixel", **_spatial(None, {"-1": 0.5})["results"][0]}
    for name, data in {"still": {**_spatial(None, still), "controls": [pixel]}, "moving": _spatial(4, still),
                       "align": _alignment({"7": 0.5, "merger": 0.5})}.items():  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / ("alignment.json" if name == "align" else "spatial.json")).write_text(json.dumps(data))
    gates = tmp_path / "gates.yaml"
    gates.write_text(yaml.safe_dump({"criteria": [c.model_dump() for c in SPEC.criteria]}))
    result = CliRunner().invoke(app, ["gate-points", str(gates), "--spatial", str(tmp_path / "still"), "--spatial",
                                      str(tmp_path / "moving" / "spatial.json"), "--align", str(tmp_path / "align"),
                                      "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "out" / "gates.json").read_text())
    assert out["chosen"] == "org/vlm/7" and [v["verdict"] for v in out["verdicts"]] == ["accept", "accept"]
    html = (tmp_path / "out" / "report.html").read_text()
    controls = html[html.index('<table id="controls">'):]
    assert 'id="verdicts"' in html and '<td class="l">pixel</td><td class="l">-1</td>' in controls
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


# ------------------------------------------------------------------------------------------- controls


def _with_controls(values: dict[str, float], diffs: dict[str, dict[str, tuple[float, float, float]]]):
    """A spatial.json whose points carry paired differences to controls: {point: {control: (diff, lo, hi)}}."""
    spatial = _spatial(None, values)
    for r in spatial["results"]:
        r["vs"] = {c: {m: {"diff": d, "lo": lo, "hi": hi, "p_value": 0.01} for m in ("box_iou", "mask_iou", "map50")}
                   for c, (d, lo, hi) in diffs[r["layer"]].items()}  # fmt: skip
    return spatial


def test_a_criterion_with_controls_passes_only_where_the_point_beats_them_by_the_margin():
    spec = GatesSpec(criteria=[Criterion(name="iou", metric="still/mask_iou", target=0.9, acceptable=0.6,
                                         controls=["pixel", "random-weights"], margin=0.05)])  # fmt: skip
    table = point_metrics([_with_controls({"good": 0.8, "noise": 0.8, "close": 0.8, "low": 0.5}, {
        "good": {"pixel": (0.10, 0.07, 0.13), "random-weights": (0.20, 0.15, 0.25)},
        "noise": {"pixel": (0.10, 0.07, 0.13), "random-weights": (0.01, -0.02, 0.04)},  # random weights do as well
        "close": {"pixel": (0.06, 0.03, 0.09), "random-weights": (0.20, 0.15, 0.25)},  # CI straddles the margin
        "low": {"pixel": (0.10, 0.07, 0.13), "random-weights": (0.20, 0.15, 0.25)}})])  # fmt: skip
    assert {"still/mask_iou-vs-pixel", "still/box_iou-vs-random-weights"} <= set(table["metric"])
    got = {v.head: v for v in gate_points(spec, table, "m").verdicts}
    assert {p: v.levels["iou"].level for p, v in got.items()} == {"good": "pass", "noise": "fail",
                                                                   "close": "inconclusive", "low": "fail"}
    assert {p: v.verdict for p, v in got.items()} == {"good": "accept", "noise": "reject", "close": "inconclusive",
                                                       "low": "reject"}  # fmt: skip
    assert got["noise"].levels["iou"].beats["random-weights"]["level"] == "fail"
    assert any("does not beat random-weights by 0.05" in r for r in got["noise"].reasons)
    assert got["good"].levels["iou"].beats["pixel"] == {"level": "pass", "point": 0.10, "lo": 0.07, "hi": 0.13}
    # lower-is-better: beating the control means a difference below -margin
    lower = Criterion(name="lp", metric="recon/lpips", acceptable=0.35, controls=["pixel"], margin=0.02)
    assert control_level(lower, -0.05, -0.08, -0.03).level == "pass"
    assert control_level(lower, -0.05, -0.08, 0.01).level == "inconclusive"
    assert control_level(lower, 0.0, -0.01, 0.01).level == "fail"
    with pytest.raises(ValueError, match="name the controls"):
        Criterion(metric="still/mask_iou", acceptable=0.6, margin=0.05)
    with pytest.raises(FmprobeError, match="no test metric 'still/mask_iou-vs-pixel'"):
        gate_points(spec, point_metrics([_spatial(None, {"7": 0.8})]), "m")


def test_spatial_controls_are_probed_on_the_same_shapes_and_compared_pairwise(tiny_dinov2_dir, tmp_path):
    result = spatial_command(str(tiny_dinov2_dir), layers=[0, -1], n_train=6, n_test=4, image_size=32, steps=3,
                             bootstrap=40, controls=["pixel", "random-weights"], out=tmp_path)  # fmt: skip
    controls = {(c["control"], c["layer"]): c for c in result["controls"]}
    assert set(controls) == {("pixel", "-1"), ("random-weights", "0"), ("random-weights", "-1")}
    assert controls[("pixel", "-1")]["grid"] == [1, 4, 4] and result["encoder"] == str(tiny_dinov2_dir)
    for row in result["results"]:
        for control in ("pixel", "random-weights"):
            other = controls[(control, "-1" if control == "pixel" else row["layer"])]
            for m, d in row["vs"][control].items():
                assert d["diff"] == pytest.approx(row[m] - other[m], abs=1e-9) and d["lo"] <= d["diff"] <= d["hi"]
    # the random-weights rows come from different tokens than the trained model's at the same point
    assert result["results"][1]["per_image"] != controls[("random-weights", "-1")]["per_image"]
    with pytest.raises(ConfigError, match="redraws a model's weights"):
        spatial_command("pixel", n_train=4, n_test=2, image_size=32, steps=1, controls=["random-weights"])
    with pytest.raises(ConfigError, match="paired bootstrap"):
        spatial_command("pixel", n_train=4, n_test=2, image_size=32, steps=1, bootstrap=0, controls=["pixel"])


def test_random_weights_keep_each_tensors_moments_and_lose_the_weights(tiny_dinov2_dir):
    from fmprobe.backbones.registry import load_encoder
    from fmprobe.config import ModelConfig
    from fmprobe.diagnostics.random_weights import randomise_weights

    trained = load_encoder(ModelConfig(name=str(tiny_dinov2_dir)))
    before = {k: v.clone() for k, v in trained.named_parameters()}
    fingerprint = trained.fingerprint()
    drawn = randomise_weights(load_encoder(ModelConfig(name=str(tiny_dinov2_dir))), seed=3)
    again = randomise_weights(load_encoder(ModelConfig(name=str(tiny_dinov2_dir))), seed=3)
    assert drawn.name.endswith("(random-weights)") and drawn.fingerprint() != fingerprint
    for name, param in drawn.named_parameters():
        torch.testing.assert_close(param, dict(again.named_parameters())[name])  # seeded
        if param.numel() > 100 and before[name].std() > 0:  # a constant tensor stays its constant
            assert not torch.allclose(param, before[name])
            assert param.mean().item() == pytest.approx(before[name].mean().item(), abs=0.05)
            assert param.std().item() == pytest.approx(before[name].std().item(), rel=0.2)
