"""The VLM study's protocol end to end on stand-ins: the spatial gate with its controls tells a spatially faithful
model from random weights; the sweep runs every step of the protocol (spatial probes with controls, alignment with a
video VAE's latents and the channel heatmap, the reconstruction probe, speed, a user-given score) offline and ends
in the decision matrix, the weighted score and the outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
import yaml

from fmprobe.diagnostics.shapes import write_shapes_dataset
from fmprobe.diagnostics.spatial_run import spatial_command
from fmprobe.errors import ConfigError
from fmprobe.experiments.gates import load_gates
from fmprobe.experiments.point_gates import model_metrics, points_command
from fmprobe.experiments.point_sweep import run_point_sweep
from fmprobe.standin import models
from fmprobe.standin.faithful import faithful_model
from fmprobe.train.seeding import seeded

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "vlm_spatial"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def random_vit(tmp_path_factory):
    """A random-init DINOv2 at 64 px (8 x 8 tokens): a model whose weights learned nothing."""
    from transformers import Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("random-vit")
    with seeded(0):
        Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=64, patch_size=8)).save_pretrained(path)  # fmt: skip
    return path


def _config(folder: Path, name: str, model: dict, **extra) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": {"manifest": "unused.csv"},
                                    "task": {"type": "binary", "targets": ["has_circle"]}, "model": model,
                                    **extra}))  # fmt: skip
    return path


def _recipe_gates(folder: Path, keep) -> Path:
    """The recipe's gates file with only the criteria ``keep`` selects (each weighed, for a score) and no outcome."""
    spec = load_gates(RECIPE / "gates.yaml")
    path = folder / "gates.yaml"
    path.write_text(yaml.safe_dump({"reject_flags": "none", "criteria": [
        {**c.model_dump(), "weight": c.weight or 1.0} for c in spec.criteria if keep(c)]}))  # fmt: skip
    return path


def test_random_weights_fail_the_spatial_gate_and_a_spatially_faithful_model_passes_it(tmp_path, random_vit):
    spatial = []
    for name, model in (("random", {"name": str(random_vit), "layers": [-1]}),
                        ("faithful", {**faithful_model(64, 8), "layers": [-1]})):  # fmt: skip
        out = tmp_path / name
        spatial_command(str(_config(tmp_path, name, model)), n_train=32, n_test=24, steps=100, bootstrap=200,
                        controls=["pixel", "random-weights"], out=out)  # fmt: skip
        spatial.append(out)
    gates = _recipe_gates(tmp_path, lambda c: c.metric.startswith("still/") and c.name != "bbox IoU")
    report = points_command(gates, spatial, out=tmp_path / "gates")
    verdicts = {v.run_dir: v for v in report.verdicts}
    random, faithful = verdicts["random"], verdicts["faithful"]
    rows = {r["control"]: r for r in json.loads((tmp_path / "random" / "spatial.json").read_text())["controls"]}
    # the probe's mask IoU of random weights is as high as the model's, near the study's 0.60: only controls tell
    assert rows["random-weights"]["mask_iou"] > 0.5
    for crit in ("mAP@0.5", "mask IoU of the probe (screen)"):
        assert random.levels[crit].level == "fail", random.reasons
        assert random.levels[crit].beats["random-weights"]["level"] == "fail"
    assert random.verdict == "reject"
    # tokens built from the pixels and kept in place: AP@0.5 clears 0.20 and beats both controls by the margin
    ap = faithful.levels["mAP@0.5"]
    assert ap.level in ("pass", "target") and ap.lo > 0.20, faithful.reasons
    assert {k: b["level"] for k, b in ap.beats.items()} == {"pixel": "pass", "random-weights": "pass"}
    assert faithful.levels["mask IoU of the probe (screen)"].beats["random-weights"]["level"] == "pass"
    assert faithful.verdict == "accept" and report.chosen.label == "faithful/-1"
    controls = {r["control"]: r for r in json.loads((tmp_path / "faithful" / "spatial.json").read_text())["controls"]}
    assert controls["random-weights"]["map50"] < 0.1  # its weights redrawn, the faithful model loses the layout


def test_a_metric_table_row_for_every_point_of_a_model(tmp_path):
    spatial = {"encoder": "m", "model": "m", "image_size": 32, "frames": None, "n_train": 4, "n_test": 2, "steps": 1,
               "results": [{"layer": p, "grid": [1, 2, 2], "dim": 4, "box_iou": 0.5, "mask_iou": 0.5, "map50": 0.3}
                           for p in ("0", "-1")]}  # fmt: skip
    table = pd.DataFrame({"model": ["m", "m"], "point": ["*", "0"], "metric": ["integration", "speed_ratio"],
                          "mean": [0.7, 1.5], "ci_lo": [None, 1.4], "ci_hi": [None, 1.6]})  # fmt: skip
    got = model_metrics([spatial], tables=[table]).set_index(["point", "metric"])
    assert got.loc[("0", "integration"), "mean"] == got.loc[("-1", "integration"), "mean"] == 0.7
    assert ("-1", "speed_ratio") not in got.index and got.loc[("0", "speed_ratio"), "ci_hi"] == 1.6
    assert ("*", "integration") not in got.index


@pytest.mark.slow  # ~50 s on 2 busy cores
def test_the_whole_protocol_runs_offline_and_ends_in_the_outcome(tmp_path, random_vit):
    """Tiny random VAE (LTX-Video's architecture) and stand-in models through every step of the sweep."""
    manifest = write_shapes_dataset(tmp_path / "data", 24, size=64, seed=1)
    features = {"cache_dir": str(tmp_path / "cache"), "store_tokens": True}
    common = {"data": {"manifest": str(manifest)}, "features": features}
    vae = models.ltx_video_vae(tmp_path / "ltx" / "vae")
    _config(tmp_path, "vae", {"name": str(vae.parent), "subfolder": "vae", "kind": "vae", "image_size": 64,
                              "layers": [-1]}, **common)  # fmt: skip
    _config(tmp_path, "random", {"name": str(random_vit), "layers": [0, -1]}, **common)
    _config(tmp_path, "faithful", {**faithful_model(64, 8), "layers": [-1]}, **common)
    with seeded(0):
        torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alexnet.pth")  # LPIPS without a download
    (tmp_path / "integration.csv").write_text("model,point,metric,mean,ci_lo,ci_hi\nrandom,*,integration,1.0,,\n"
                                              "faithful,*,integration,0.5,,\n")  # fmt: skip
    spec = load_gates(RECIPE / "gates.yaml")
    (tmp_path / "gates.yaml").write_text(yaml.safe_dump({"reject_flags": "none", "criteria": [
        c.model_dump() for c in spec.criteria], "outcome": spec.outcome.model_dump()}))  # fmt: skip
    sweep = {"models": ["random.yaml", "faithful.yaml"], "gates": "gates.yaml",
             "still": {"n_train": 16, "n_test": 8, "steps": 10, "bootstrap": 50},
             "moving": {"frames": 2, "n_train": 4, "n_test": 4, "steps": 5, "bootstrap": 50},
             "reference": "vae.yaml",
             "align": {"metrics": ["linear_cka", "linear_r2", "rsa", "knn_recall"], "bootstrap": 30,
                       "reference_view": "-1:flat", "heatmap": "-1:channels"},
             "controls": ["pixel", "random-weights"],
             "reconstruct": {"vae": "vae.yaml", "n_train": 8, "n_val": 4, "n_test": 6, "epochs": 1, "hidden": 16,
                             "lr": 1e-3, "bootstrap": 30, "lpips_backbone": "alexnet.pth"},
             "speed": {"baseline": "random.yaml", "point": -1, "batch": 1, "repeats": 2, "warmup": 0},
             "tables": ["integration.csv"]}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    events: list[str] = []
    run_point_sweep(tmp_path / "sweep.yaml", on_event=events.append)
    out = tmp_path / "out"
    ran = {Path(e.split(": ", 1)[1]).relative_to(out).as_posix() for e in events if e.startswith("running:")}
    assert ran == {f"{m}/{s}" for m in ("random", "faithful") for s in ("spatial-still", "spatial-moving", "align",
                                                                          "align-heatmap", "reconstruct")} | {"speed"}
    heatmap = json.loads((out / "random" / "align-heatmap" / "alignment.json").read_text())
    assert heatmap["matrices"]["linear_cka"]["cols"] == [f"-1/c{k}" for k in range(8)]  # the VAE's latent channels
    recon = json.loads((out / "faithful" / "reconstruct" / "reconstruct.json").read_text())
    assert {c["control"] for c in recon["controls"]} == {"pixel", "random-weights"}
    points = pd.read_csv(out / "gates" / "points.csv", dtype={"point": str})
    metrics = set(points["metric"])
    assert {"linear_cka", "linear_r2", "rsa", "knn_recall", "recon/spatial_iou", "recon/lpips",
            "recon/spatial_iou-vs-random-weights", "still/map50-vs-pixel", "moving/direction_accuracy",
            "speed_ratio", "integration"} <= metrics  # fmt: skip
    speed = points[(points["metric"] == "speed_ratio")]
    assert set(zip(speed["model"], speed["point"])) == {("random", "0"), ("random", "-1"), ("faithful", "-1")}
    gates = json.loads((out / "gates" / "gates.json").read_text())
    assert gates["outcome"]["outcome"] in ("select", "proceed", "undecided", "investigate", "marginal",
                                           "pivot to hybrid", "major pivot")  # fmt: skip
    assert sorted(m["model"] for m in gates["models"]) == ["faithful", "random"]
    assert all(set(m["weighted"]) == {"score", "lo", "hi"} for m in gates["models"])
    html = (out / "gates" / "report.html").read_text()
    assert 'id="outcome"' in html and "<h2>Reconstructions</h2>" in html
    assert "Alignment with the reference: linear_cka" in html


def test_a_sweep_refuses_a_speed_baseline_or_a_reference_view_it_cannot_honour(tmp_path):
    sweep = {"models": ["a.yaml"], "gates": "gates.yaml", "speed": {"baseline": "b.yaml", "point": -1}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(ConfigError, match="speed.baseline 'b.yaml' is not among models"):
        run_point_sweep(tmp_path / "sweep.yaml")
    sweep = {"models": ["a.yaml"], "gates": "gates.yaml", "align": {"reference_view": "-1:flat"}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(ConfigError, match="name the reference"):
        run_point_sweep(tmp_path / "sweep.yaml")
