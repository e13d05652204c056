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
    reference = load_config(RECIPE / "reference.yaml")
    assert reference.model.name == "facebook/dinov2-large" and reference.model.layers == [-1]
    for file, checkpoint in REAL.items():
        config = load_config(RECIPE / file)
        assert config.model.name == checkpoint and config.model.dtype == "bfloat16"
        assert config.features.device == "cuda" and config.data.manifest == reference.data.manifest
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
    assert sweep.models == list(REAL) and sweep.reference == "reference.yaml" and sweep.moving.frames == 8
    assert {(p.a, p.b) for p in sweep.pairs} >= {("-2@tiles", "-2@base")}
    gates = {c.name: c for c in load_gates(RECIPE / "gates.yaml").criteria}
    assert (gates["spatial IoU"].metric, gates["spatial IoU"].acceptable, gates["spatial IoU"].must_pass) == (
        "still/mask_iou", 0.60, True)
    assert (gates["bbox IoU"].metric, gates["bbox IoU"].acceptable, gates["bbox IoU"].must_pass) == (
        "still/box_iou", 0.50, True)
    cka = gates["CKA to DINOv2-L"]
    assert (cka.metric, cka.acceptable, cka.must_pass) == ("linear_cka", 0.40, False)


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
    assert sweep.models == list(REAL) and sweep.still.n_train == standin.SWEEP["still"]["n_train"]
    assert load_config(written["reference.yaml"]).model.name == "dinov2-small-offline"


def _level(crit, point, lo, hi):
    """The gate level by hand (higher-is-better metrics): decided by the CI's ends, the point when there is none."""
    if lo != lo:
        lo = hi = point
    if crit.target is not None and lo >= crit.target:
        return "target"
    if lo >= crit.acceptable:
        return "pass"
    if hi < crit.acceptable or (crit.fail is not None and point < crit.fail):
        return "fail"
    return "inconclusive"


@pytest.mark.slow
def test_standin_comparison_ends_in_the_decision_matrix_across_four_families(tmp_path):
    standin = _standin()
    written = standin.main(tmp_path)
    (command,) = standin.commands(written)
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code in (0, 1), result.output
    out = tmp_path / "out"
    names = {file: load_config(written[file]).name for file in REAL}

    for file, (_, _, _, points) in standin.MODELS.items():
        folder = out / Path(file).stem
        still = json.loads((folder / "spatial-still" / "spatial.json").read_text())
        moving = json.loads((folder / "spatial-moving" / "spatial.json").read_text())
        assert still["model"] == names[file] and [r["layer"] for r in still["results"]] == [str(p) for p in points]
        assert moving["frames"] == 3 and all(r["grid"][0] == 3 for r in moving["results"])
        for r in still["results"] + moving["results"]:
            for m in ("box_iou", "mask_iou", "map50"):
                assert r["ci"][m][0] <= r[m] <= r["ci"][m][1]
        cka = json.loads((folder / "align" / "alignment.json").read_text())
        assert cka["a"]["model"] == names[file] and cka["matrices"]["linear_cka"]["rows"] == [str(p) for p in points]

    # controls: noise tokens are at chance, pixel patches well above it
    pixel = json.loads((out / "controls" / "pixel-still" / "spatial.json").read_text())["results"][0]
    noise = json.loads((out / "controls" / "random-still" / "spatial.json").read_text())["results"][0]
    assert noise["mask_iou"] < 0.3 < pixel["mask_iou"] and noise["ci"]["mask_iou"][1] < pixel["ci"]["mask_iou"][0]

    # AnyRes vs base: a paired difference on the same test shapes, inside its own CI
    pair = json.loads((out / "pairs" / "llava_next--2_tiles-vs--2_base" / "pair.json").read_text())
    rows = {r["layer"]: r for r in json.loads((out / "llava_next" / "spatial-still" / "spatial.json").read_text())["results"]}
    for metric, d in pair["metrics"].items():
        assert d["diff"] == pytest.approx(rows["-2@tiles"][metric] - rows["-2@base"][metric], abs=1e-9)
        assert d["lo"] <= d["diff"] <= d["hi"]

    # one verdict per (model, point), recomputed by hand from the measured numbers and the gates' thresholds
    spec = load_gates(written["gates.yaml"])
    table = pd.read_csv(out / "gates" / "points.csv", dtype={"point": str}).set_index(["model", "point", "metric"])
    gates = json.loads((out / "gates" / "gates.json").read_text())
    expected_candidates = {f"{names[f]}/{p}" for f, (_, _, _, points) in standin.MODELS.items() for p in points}
    assert {v["candidate"] for v in gates["verdicts"]} == expected_candidates
    total = sum(c.weight for c in spec.criteria)
    for v in gates["verdicts"]:
        model, point = v["run_dir"], v["candidate"][len(v["run_dir"]) + 1 :]
        levels = {}
        for crit in spec.criteria:
            row = table.loc[(model, point, crit.metric)]
            levels[crit.name] = _level(crit, row["mean"], row["ci_lo"], row["ci_hi"])
            assert v["levels"][crit.name]["level"] == levels[crit.name], (model, point, crit.name)
        must = [levels[c.name] for c in spec.criteria if c.must_pass]
        assert v["verdict"] == ("reject" if "fail" in must else "inconclusive" if "inconclusive" in must else "accept")
        assert v["score"] == pytest.approx(sum(c.weight * POINTS[levels[c.name]] for c in spec.criteria) / total)
    rank = {"accept": 0, "inconclusive": 1, "reject": 2}
    keys = [(rank[v["verdict"]], -v["score"]) for v in gates["verdicts"]]
    assert keys == sorted(keys)
    accepted = [v for v in gates["verdicts"] if v["verdict"] == "accept"]
    assert gates["chosen"] == (accepted[0]["candidate"] if accepted else None)
    assert result.exit_code == (0 if accepted else 1)

    # the decision matrix: the four families side by side at their best points, a row per criterion
    assert sorted(m["model"] for m in gates["models"]) == sorted(names.values())
    html = (out / "gates" / "report.html").read_text()
    decision = html[html.index('<table id="decision">'):]
    decision = decision[: decision.index("</table>")]
    assert all(f"<th>{name}</th>" in decision for name in names.values())
    assert all(c.name in decision for c in spec.criteria) and "weighted score" in decision
    assert 'id="pairs"' in html and 'id="controls"' in html and 'id="verdicts"' in html
    assert html.count("data:image/png;base64,") == 4 * (2 + 3)  # per model: still, moving, 3 alignment curves
