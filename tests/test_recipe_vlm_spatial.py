"""Recipe examples/vlm_spatial: its real YAMLs validate; the stand-in comparison of the four VLM families runs end to
end through the CLI and ends in a verdict per (model, extraction point) that follows from the measured numbers, the
decision matrix across the four families, and LLaVA-NeXT's AnyRes-vs-base paired comparison."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fmprobe.backbones.registry import load_encoder
from fmprobe.cli import app
from fmprobe.config import load_config
from fmprobe.experiments.gates import load_gates
from fmprobe.experiments.point_sweep import load_point_sweep

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "vlm_spatial"
POINTS = {"target": 1.0, "pass": 2 / 3, "inconclusive": 1 / 3, "fail": 0.0}
REAL = {"config.yaml": "Qwen/Qwen2.5-VL-7B-Instruct", "llava_next.yaml": "llava-hf/llava-v1.6-vicuna-7b-hf",
        "internvl2.yaml": "OpenGVLab/InternVL2-8B", "cogvlm2.yaml": "THUDM/cogvlm2-llama3-chat-19B"}  # fmt: skip


def _standin():
    spec = importlib.util.spec_from_file_location("vlm_spatial_standin", RECIPE / "make_standin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_real_yamls_validate():
    vae = load_config(RECIPE / "vae.yaml")
    assert (vae.model.name, vae.model.subfolder, vae.model.kind) == ("Lightricks/LTX-Video", "vae", "vae")
    assert vae.features.store_tokens and vae.model.image_size % 32 == 0
    for file, checkpoint in REAL.items():
        config = load_config(RECIPE / file)
        assert config.model.name == checkpoint and config.model.dtype == "bfloat16"
        assert config.features.device == "cuda" and config.data.manifest == vae.data.manifest
        assert config.model.trust_remote_code == (file in ("internvl2.yaml", "cogvlm2.yaml"))
    llava = [str(x) for x in load_config(RECIPE / "llava_next.yaml").model.layers]
    assert {p.rsplit("@", 1)[0] for p in llava if p.endswith("@base")} == {p.rsplit("@", 1)[0] for p in llava
                                                                          if p.endswith("@tiles")}  # fmt: skip
    assert "model.multi_modal_projector@tiles" in llava and "-2@base" in llava
    internvl = [str(x) for x in load_config(RECIPE / "internvl2.yaml").model.layers]
    assert "mlp1:input@tiles" in internvl and "language_model.model.layers.15@base" in internvl
    cog = [str(x) for x in load_config(RECIPE / "cogvlm2.yaml").model.layers]
    assert "model.layers.7.mlp.vision_mlp" in cog and "model.vision.linear_proj" in cog
    sweep, _ = load_point_sweep(RECIPE / "sweep.yaml")
    assert sweep.models == list(REAL) and sweep.reference == "vae.yaml" and sweep.moving.frames == 8
    assert sweep.controls == ["pixel", "random-weights"] and sweep.reconstruct.vae == "vae.yaml"
    assert (sweep.reconstruct.loss, sweep.reconstruct.lr, sweep.reconstruct.batch_size, sweep.reconstruct.epochs) == (
        "pixels", 1e-4, 8, 50)  # the study's E-P4.6 training
    assert sweep.speed.baseline == "config.yaml" and sweep.tables == ["integration.csv"]
    assert {(p.a, p.b) for p in sweep.pairs} >= {("-2@tiles", "-2@base")}
    integration = pd.read_csv(RECIPE / "integration.csv")
    assert set(integration["model"]) == {load_config(RECIPE / f).name for f in REAL} and set(integration["point"]) == {"*"}
    spec = load_gates(RECIPE / "gates.yaml")
    gates = {c.name: c for c in spec.criteria}
    study = {  # name: metric, (target, acceptable, fail), must pass, weight (the study's thresholds and weights)
        "spatial IoU": ("recon/spatial_iou", (0.65, 0.60, 0.55), True, 40),
        "bbox IoU": ("still/box_iou", (0.60, 0.50, 0.40), True, 20),
        "mAP@0.5": ("still/map50", (0.30, 0.20, 0.10), True, 0),
        "LPIPS": ("recon/lpips", (0.30, 0.35, 0.45), True, 15),
        "inference speed (x Qwen2.5-VL)": ("speed_ratio", (1.0, 2.0, 3.0), False, 15),
        "integration complexity": ("integration", (1.0, 0.5, 0.0), False, 10),
        "CKA to the VAE latents": ("linear_cka", (0.50, 0.40, 0.30), False, 0),
        "linear R2 to the VAE latents": ("linear_r2", (0.50, 0.40, 0.25), False, 0),
        "Spearman rho of distances": ("rsa", (0.60, 0.50, 0.40), False, 0),
        "recall@10": ("knn_recall", (0.30, 0.20, 0.10), False, 0),
        "SSIM": ("recon/ssim", (0.80, 0.75, 0.65), False, 0),
        "edge F1": ("recon/edge_f1", (0.60, 0.50, 0.40), False, 0),
        "direction accuracy": ("moving/direction_accuracy", (None, 0.80, None), False, 0),
    }  # fmt: skip
    for name, (metric, levels, must, weight) in study.items():
        c = gates[name]
        assert (c.metric, (c.target, c.acceptable, c.fail), c.must_pass, c.weight) == (metric, levels, must, weight)
    for name in ("bbox IoU", "mAP@0.5"):
        assert gates[name].controls == ["pixel", "random-weights"] and gates[name].margin > 0
    assert gates["spatial IoU"].controls == ["random-weights"] and gates["spatial IoU"].margin > 0
    assert spec.outcome.model_dump() == {"criterion": "spatial IoU", "hybrid_below": 0.55, "major_pivot_below": 0.50,
                                         "select": 2}  # fmt: skip


def test_standin_has_the_real_structure(tmp_path):
    standin = _standin()
    written = standin.main(tmp_path)
    manifest = pd.read_csv(written["manifest"])
    assert {"sample_id", "path", "annotations", "group", "has_circle", "largest_shape"} <= set(manifest.columns)
    assert all((written["manifest"].parent / p).is_file() for p in manifest["path"])
    for file, (_, _, size, points) in standin.MODELS.items():
        config = load_config(written[file])
        assert Path(config.model.name).parent == tmp_path / "models" and Path(config.data.manifest) == written["manifest"]
        encoder = load_encoder(config.model)  # the real loader (remote code too), LM included where points read it
        out = encoder.encode(torch.zeros(1, 3, size, size), config.model.layers)
        assert list(out.tokens) == [str(p) for p in points]
    sweep, _ = load_point_sweep(written["sweep.yaml"])
    assert sweep.models == [*REAL, standin.FAITHFUL] and sweep.still.n_train == standin.SWEEP["still"]["n_train"]
    vae = load_config(written["vae.yaml"])
    assert (Path(vae.model.name), vae.model.subfolder) == (tmp_path / "models" / "ltx_video", "vae")
    assert load_encoder(vae.model).latents(torch.zeros(1, 3, 64, 64))[1] == (1, 8, 8)
    faithful = load_config(written[standin.FAITHFUL])
    assert faithful.model.kind == "python" and Path(faithful.data.manifest) == written["manifest"]


def _level(crit, point, lo, hi):
    """The gate level by hand: decided by the CI's ends (the point when there is none), mirrored when lower is
    better."""
    if lo != lo:
        lo = hi = point
    if not crit.higher:
        return _level(crit.model_copy(update={"direction": "higher", "target": _neg(crit.target),
                                              "acceptable": -crit.acceptable, "fail": _neg(crit.fail)}),
                      -point, -hi, -lo)  # fmt: skip
    if crit.target is not None and lo >= crit.target:
        return "target"
    if lo >= crit.acceptable:
        return "pass"
    if hi < crit.acceptable or (crit.fail is not None and point < crit.fail):
        return "fail"
    return "inconclusive"


def _neg(x):
    return None if x is None else -x


def _beats(crit, diff, lo, hi):
    """Does the point beat a control by the margin, by hand (paired difference and its CI)?"""
    worst, best = (lo, hi) if crit.higher else (-hi, -lo)
    return "fail" if best <= crit.margin else "pass" if worst > crit.margin else "inconclusive"


@pytest.mark.slow
def test_standin_runs_the_whole_protocol_and_ends_in_the_outcome(tmp_path):
    standin = _standin()
    written = standin.main(tmp_path)
    (command,) = standin.commands(written)
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code in (0, 1), result.output
    _check_protocol(standin, written, tmp_path / "out", result.exit_code)


def _check_protocol(standin, written, out, exit_code):
    """Every output of the stand-in protocol, and every verdict recomputed by hand."""
    files = [*REAL, standin.FAITHFUL]
    names = {file: load_config(written[file]).name for file in files}
    points_of = {**{f: [str(p) for p in m[3]] for f, m in standin.MODELS.items()}, standin.FAITHFUL: ["-1"]}

    for file in files:
        folder, points = out / Path(file).stem, points_of[file]
        still = json.loads((folder / "spatial-still" / "spatial.json").read_text())
        moving = json.loads((folder / "spatial-moving" / "spatial.json").read_text())
        assert still["model"] == names[file] and [r["layer"] for r in still["results"]] == points
        assert moving["frames"] == 3 and all(r["grid"][0] == 3 for r in moving["results"])
        for r in still["results"] + moving["results"]:
            for m in ("box_iou", "mask_iou", "map50"):
                assert r["ci"][m][0] <= r[m] <= r["ci"][m][1]
            assert set(r["vs"]) == {"pixel", "random-weights"}  # each point against its controls, paired
            for d in (d for v in r["vs"].values() for d in v.values()):
                assert d["lo"] <= d["diff"] <= d["hi"]
        cka = json.loads((folder / "align" / "alignment.json").read_text())
        assert cka["a"]["model"] == names[file] and cka["b"]["dims"] == {"-1": 8 * 8 * 8}  # 8 x 8 latents x 8 channels
        if len(points) > 1:
            assert cka["matrices"]["linear_cka"]["rows"] == points
        else:  # one point against the one latent layer: one value per metric, with its CI
            assert set(cka["metrics"]) == set(cka["intervals"]) == {"linear_cka", "linear_r2", "rsa", "knn_recall"}
        heatmap = json.loads((folder / "align-heatmap" / "alignment.json").read_text())
        assert heatmap["matrices"]["linear_cka"]["cols"] == [f"-1/c{k}" for k in range(8)]
        recon = json.loads((folder / "reconstruct" / "reconstruct.json").read_text())
        assert [r["layer"] for r in recon["results"]] == points and recon["loss"] == "pixels"
        assert all((folder / "reconstruct" / r["gallery"]).is_file() for r in recon["results"] + recon["controls"])
    speed = json.loads((out / "speed" / "speed.json").read_text())
    assert speed["baseline"]["model"] == names["config.yaml"] and speed["baseline"]["point"] == "visual.merger"
    assert {(r["model"], r["point"]) for r in speed["results"]} == {(names[f], p) for f in files for p in points_of[f]}

    # AnyRes vs base: a paired difference on the same test shapes, inside its own CI
    pair = json.loads((out / "pairs" / "llava_next--2_tiles-vs--2_base" / "pair.json").read_text())
    rows = {r["layer"]: r for r in json.loads((out / "llava_next" / "spatial-still" / "spatial.json").read_text())["results"]}
    for metric, d in pair["metrics"].items():
        assert d["diff"] == pytest.approx(rows["-2@tiles"][metric] - rows["-2@base"][metric], abs=1e-9)
        assert d["lo"] <= d["diff"] <= d["hi"]

    # one verdict per (model, point), recomputed by hand from the measured numbers, the controls and the thresholds
    spec = load_gates(written["gates.yaml"])
    table = pd.read_csv(out / "gates" / "points.csv", dtype={"point": str}).set_index(["model", "point", "metric"])
    gates = json.loads((out / "gates" / "gates.json").read_text())
    assert {v["candidate"] for v in gates["verdicts"]} == {f"{names[f]}/{p}" for f in files for p in points_of[f]}
    rank = {"fail": 0, "inconclusive": 1, "pass": 2, "target": 3}
    total = sum(c.weight for c in spec.criteria)
    for v in gates["verdicts"]:
        model, point = v["run_dir"], v["candidate"][len(v["run_dir"]) + 1 :]
        levels = {}
        for crit in spec.criteria:
            row = table.loc[(model, point, crit.metric)]
            level = _level(crit, row["mean"], row["ci_lo"], row["ci_hi"])
            for control in crit.controls:
                d = table.loc[(model, point, f"{crit.metric}-vs-{control}")]
                level = min(level, _beats(crit, d["mean"], d["ci_lo"], d["ci_hi"]), key=rank.get)
            levels[crit.name] = level
            assert v["levels"][crit.name]["level"] == level, (model, point, crit.name)
        must = [levels[c.name] for c in spec.criteria if c.must_pass]
        assert v["verdict"] == ("reject" if "fail" in must else "inconclusive" if "inconclusive" in must else "accept")
        assert v["score"] == pytest.approx(sum(c.weight * POINTS[levels[c.name]] for c in spec.criteria) / total)
    keys = [({"accept": 0, "inconclusive": 1, "reject": 2}[v["verdict"]], -v["score"]) for v in gates["verdicts"]]
    assert keys == sorted(keys)
    accepted = [v for v in gates["verdicts"] if v["verdict"] == "accept"]
    assert gates["chosen"] == (accepted[0]["candidate"] if accepted else None)
    assert exit_code == (0 if accepted else 1)
    # random VLMs do not beat their own random-weights control: the spatial criteria fail, whatever their values
    for v in gates["verdicts"]:
        if v["run_dir"] != names[standin.FAITHFUL]:
            assert v["levels"]["mask IoU of the probe (screen)"]["level"] != "pass"
    # the outcome: the study's table over the models at their best points
    summary = {m["model"]: m for m in gates["models"]}
    assert sorted(summary) == sorted(names.values())
    assert gates["outcome"]["outcome"] in ("select", "proceed", "undecided", "investigate", "marginal",
                                           "pivot to hybrid", "major pivot")  # fmt: skip

    # the decision matrix: the five models side by side at their best points, a row per criterion
    html = (out / "gates" / "report.html").read_text()
    decision = html[html.index('<table id="decision">'):]
    decision = decision[: decision.index("</table>")]
    assert all(f"<th>{name}</th>" in decision for name in names.values())
    assert all(c.name in decision for c in spec.criteria) and "weighted score [range over the CIs]" in decision
    assert 'id="pairs"' in html and 'id="controls"' in html and 'id="verdicts"' in html and 'id="outcome"' in html
    assert "<h2>Reconstructions</h2>" in html
