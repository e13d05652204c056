"""`fmprobe spatial --encoder CONFIG` on the VLM families: every extraction point of the config (vision blocks, the
projector, language-model layers, CogVLM's vision experts; both views of tiled models) gets box and mask IoU with
their bootstrap CIs in spatial.json."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fmprobe.cli import app
from fmprobe.standin import models, remote

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _views(*points):
    return [f"{p}@{v}" for p in points for v in ("base", "tiles")]


FAMILIES = {
    "llava_next": (models.llava_next, _views(0, 1, 2, "model.multi_modal_projector", "model.language_model.layers.0",
                                             "model.language_model.layers.1"), {}),  # fmt: skip
    "internvl": (models.internvl, _views(0, 1, 2, "model.multi_modal_projector:input", "model.multi_modal_projector",
                                         "model.language_model.layers.0", "model.language_model.layers.1"), {}),
    "cogvlm2": (remote.cogvlm2, [0, 1, 2, "model.vision.conv", "model.vision.linear_proj", "model.layers.0",
                                 "model.layers.1", "model.layers.0.mlp.vision_mlp", "model.layers.1.mlp.vision_mlp"],
                {"trust_remote_code": True}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_spatial_scores_every_extraction_point_with_cis(tmp_path, family):
    write, points, extra = FAMILIES[family]
    config = {"name": family, "data": {"manifest": "unused.csv"}, "task": {"type": "binary", "targets": ["y"]},
              "model": {"name": str(write(tmp_path / "model")), "layers": points, **extra},
              "heads": [{"type": "linear", "layer": points[0]}]}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "spatial"
    result = CliRunner().invoke(app, ["spatial", "--encoder", str(tmp_path / "config.yaml"), "--n-train", "12",
                                      "--n-test", "6", "--steps", "8", "--bootstrap", "40", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    spatial = json.loads((out / "spatial.json").read_text())
    assert spatial["image_size"] == 128
    rows = {r["layer"]: r for r in spatial["results"]}
    assert list(rows) == [str(p) for p in points]
    for point, row in rows.items():
        for metric in ("box_iou", "mask_iou"):
            lo, hi = row["ci"][metric]
            assert 0 <= lo <= row[metric] <= hi <= 1, (point, metric)
        if point.endswith("@tiles"):  # the tiles view is twice as fine as the base view of the same point
            base = rows[point.replace("@tiles", "@base")]["grid"]
            assert row["grid"] == [1, 2 * base[1], 2 * base[2]]
        assert point in result.output
