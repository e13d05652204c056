"""Recipe examples/vlm_spatial: its real YAMLs validate; the stand-in study runs end to end through the CLI and
ends in a gate verdict per extraction point that follows from the measured numbers."""

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

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "vlm_spatial"
POINTS = {"target": 1.0, "pass": 2 / 3, "inconclusive": 1 / 3, "fail": 0.0}


def _standin():
    spec = importlib.util.spec_from_file_location("vlm_spatial_standin", RECIPE / "make_standin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_real_yamls_validate():
    config, reference = load_config(RECIPE / "config.yaml"), load_config(RECIPE / "reference.yaml")
    assert config.model.name == "Qwen/Qwen2.5-VL-7B-Instruct" and config.model.image_size % 28 == 0
    layers = [str(x) for x in config.model.layers]
    assert "visual.merger" in layers and any(x.startswith("model.language_model.layers.") for x in layers)
    assert reference.model.name == "facebook/dinov2-large" and reference.model.layers == [-1]
    assert config.data.manifest == reference.data.manifest  # the two models see the same images
    gates = load_gates(RECIPE / "gates.yaml")
    iou, cka = gates.criteria[0], gates.criteria[1]
    assert (iou.metric, iou.acceptable, iou.must_pass) == ("still/mask_iou", 0.60, True)
    assert (cka.metric, cka.acceptable, cka.must_pass) == ("linear_cka", 0.40, False)


def test_standin_has_the_real_structure(tmp_path):
    written = _standin().main(tmp_path)
    manifest = pd.read_csv(written["manifest"])
    assert {"sample_id", "path", "annotations", "group", "has_circle", "largest_shape"} <= set(manifest.columns)
    assert all((written["manifest"].parent / p).is_file() for p in manifest["path"])
    config = load_config(written["config"])
    assert config.model.name == str(written["model"]) and Path(config.data.manifest) == written["manifest"]
    encoder = load_encoder(config.model)  # the real loader, LM included because LM layers are listed
    out = encoder.encode(torch.zeros(1, 3, 112, 112), [0, "visual.merger", "model.language_model.layers.1"])
    assert out.grid["0"] == (1, 8, 8)
    assert out.grid["visual.merger"] == out.grid["model.language_model.layers.1"] == (1, 4, 4)
    assert load_config(written["reference"]).model.name == "dinov2-small-offline"


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
def test_standin_study_ends_in_a_verdict_per_point(tmp_path):
    standin = _standin()
    written = standin.main(tmp_path)
    runner = CliRunner()
    codes = []
    for command in standin.commands(written, tmp_path):
        result = runner.invoke(app, shlex.split(command)[1:])
        assert result.exit_code in (0, 1), f"{command}\n{result.output}"
        codes.append(result.exit_code)
    assert codes[:-1] == [0] * (len(codes) - 1)

    still = json.loads((tmp_path / "spatial-still" / "spatial.json").read_text())
    moving = json.loads((tmp_path / "spatial-moving" / "spatial.json").read_text())
    assert [r["layer"] for r in still["results"]] == [str(p) for p in standin.POINTS]
    assert moving["frames"] == 4 and all(r["grid"][0] == 4 for r in moving["results"])
    for r in still["results"] + moving["results"]:
        for m in ("box_iou", "mask_iou", "map50"):
            assert r["ci"][m][0] <= r[m] <= r["ci"][m][1]

    # controls: noise tokens are at chance, pixel patches well above it
    pixel = json.loads((tmp_path / "control-pixel" / "spatial.json").read_text())["results"][0]
    noise = json.loads((tmp_path / "control-random" / "spatial.json").read_text())["results"][0]
    assert noise["mask_iou"] < 0.3 < pixel["mask_iou"] and noise["ci"]["mask_iou"][1] < pixel["ci"]["mask_iou"][0]
    assert noise["map50"] < 0.05 and noise["box_iou"] < noise["box_iou_prior"] + 0.1

    alignment = json.loads((tmp_path / "align" / "alignment.json").read_text())
    cka = alignment["matrices"]["linear_cka"]
    assert cka["rows"] == [str(p) for p in standin.POINTS] and cka["cols"] == ["-1"]
    assert all(lo <= v[0] <= hi for v, ((lo, hi),) in zip(cka["values"], cka["ci"]))

    # one verdict per point, recomputed by hand from the measured numbers and the gates' thresholds
    spec = load_gates(written["gates"])
    table = pd.read_csv(tmp_path / "gates" / "points.csv", dtype={"point": str}).set_index(["point", "metric"])
    gates = json.loads((tmp_path / "gates" / "gates.json").read_text())
    verdicts = {v["candidate"].rsplit("/", 1)[1]: v for v in gates["verdicts"]}
    assert sorted(verdicts) == sorted(str(p) for p in standin.POINTS)
    for point, v in verdicts.items():
        levels = {}
        for crit in spec.criteria:
            row = table.loc[(point, crit.metric)]
            levels[crit.name] = _level(crit, row["mean"], row["ci_lo"], row["ci_hi"])
            assert v["levels"][crit.name]["level"] == levels[crit.name], (point, crit.name)
        must = [levels[c.name] for c in spec.criteria if c.must_pass]
        expected = "reject" if "fail" in must else "inconclusive" if "inconclusive" in must else "accept"
        assert v["verdict"] == expected, point
        total = sum(c.weight for c in spec.criteria)
        assert v["score"] == pytest.approx(sum(c.weight * POINTS[levels[c.name]] for c in spec.criteria) / total)
    iou = table.xs("still/mask_iou", level="metric")
    assert verdicts["visual.merger"]["verdict"] == ("reject" if iou.loc["visual.merger", "ci_hi"] < 0.6 else
                                                   verdicts["visual.merger"]["verdict"])  # fmt: skip
    # survivors ranked by the weighted score; the recommendation is the best accepted point, if any
    rank = {"accept": 0, "inconclusive": 1, "reject": 2}
    keys = [(rank[v["verdict"]], -v["score"]) for v in gates["verdicts"]]
    assert keys == sorted(keys)
    accepted = [v for v in gates["verdicts"] if v["verdict"] == "accept"]
    assert gates["chosen"] == (accepted[0]["candidate"] if accepted else None)
    assert codes[-1] == (0 if accepted else 1)
    html = (tmp_path / "gates" / "report.html").read_text()
    assert 'id="verdicts"' in html and 'id="controls"' in html and html.count("data:image/png;base64,") == 5
