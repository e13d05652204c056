"""Bad inputs through the CLI: each gives exit code 2 and one clear message naming the item, no traceback.

The corpus is generated here at test time (tiny files, written with the libraries users' files come from):
a truncated mp4, a zero-byte PNG, NIfTI volumes with 2 and 5 dimensions, a DICOM without pixel data,
manifests with a BOM / mixed types / a missing column / duplicate ids / out-of-range labels / NaN targets,
and YAML with a misspelt key. Work finished before a bad sample is kept.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from data_factories import CT_SMALL, write_video
from PIL import Image
from typer.testing import CliRunner

import fault_injection as fi
from fmprobe.cli import app


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return fi.save_tiny_dinov2(tmp_path_factory.mktemp("model") / "dinov2")


def png(path: Path, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    return path.name


def project(root: Path, model: Path, rows: list[dict], *, manifest_text: str | None = None, **sections) -> Path:
    """manifest.csv from ``rows`` (or raw ``manifest_text``) and exp.yaml; media paths relative to ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    if manifest_text is None:
        pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    else:
        (root / "manifest.csv").write_text(manifest_text, encoding="utf-8")
    exp = {
        "name": "bad",
        "data": {"manifest": "manifest.csv", "group_column": None, "split_column": None},
        "task": {"type": "binary", "targets": ["y"]},
        "model": {"name": str(model)},
        "features": {"cache_dir": "cache", "batch_size": 2, "shard_size": 2},
        "train": {"epochs": 2, "seeds": [0]},
        "split": {"mode": "generate"},
        "eval": {"bootstrap": 50},
    }
    for key, value in sections.items():
        exp[key] = {**exp.get(key, {}), **value} if isinstance(value, dict) else value
    (root / "exp.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    return root / "exp.yaml"


def images(root: Path, n: int = 12) -> list[dict]:
    return [{"sample_id": f"s{i:03d}", "path": f"img/{png(root / 'img' / f'{i:03d}.png', i)}", "y": i % 2}
            for i in range(n)]


def cli_error(command: str, config: Path) -> str:
    """Run ``fmprobe <command> CONFIG``; check it failed cleanly; return its one message."""
    result = CliRunner().invoke(app, [command, str(config)])
    text = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {text}\n{result.exception!r}"
    assert "Traceback" not in text and text.count("error:") == 1, text
    return " ".join(text.split())  # unwrapped, for matching


# --- media ---------------------------------------------------------------------------------------------

def test_zero_byte_png_names_the_sample_and_keeps_finished_shards(tmp_path, model):
    rows = images(tmp_path)
    (tmp_path / rows[7]["path"]).write_bytes(b"")
    config = project(tmp_path, model, rows)
    message = cli_error("extract", config)
    assert "sample 's007'" in message and "007.png" in message and "empty (0 bytes)" in message
    done = fi.committed_rows(tmp_path / "cache")
    assert done == [f"s{i:03d}" for i in range(6)]  # batches [0,1] [2,3] [4,5] were stored as shards

    png(tmp_path / rows[7]["path"], 7)  # fixed: the rerun extracts only what is missing
    result = CliRunner().invoke(app, ["extract", str(config)])
    assert result.exit_code == 0, result.output
    assert fi.summary_value(result.output, "extracted") == "6" and fi.summary_value(result.output, "cached") == "6"


def test_truncated_mp4(tmp_path, model):
    rows = []
    for i in range(4):
        path = write_video(tmp_path / f"v{i}.mp4", n_frames=8, size=16)
        rows.append({"sample_id": f"v{i}", "path": Path(path).name, "y": i % 2})
    raw = (tmp_path / "v2.mp4").read_bytes()
    (tmp_path / "v2.mp4").write_bytes(raw[: len(raw) // 2])
    config = project(tmp_path, model, rows, data={"kind": "video", "frames_per_clip": 2})
    message = cli_error("extract", config)
    assert "sample 'v2'" in message and "v2.mp4" in message and "truncated" in message


@pytest.mark.parametrize("shape", [(8, 8), (4, 4, 3, 2, 2)], ids=["2d", "5d"])
def test_nifti_with_the_wrong_number_of_dimensions(tmp_path, model, shape):
    rows = []
    for i in range(3):
        vol = np.random.default_rng(i).random(shape if i == 1 else (8, 8, 4)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / f"vol{i}.nii.gz")
        rows.append({"sample_id": f"vol{i}", "path": f"vol{i}.nii.gz", "y": i % 2})
    config = project(tmp_path, model, rows, data={"kind": "volume", "volume_mode": "slices", "frames_per_clip": 1})
    message = cli_error("extract", config)
    assert "sample 'vol1'" in message and "vol1.nii.gz" in message and "3D volume" in message


def test_dicom_without_pixel_data(tmp_path, model):
    rows = []
    for i in range(3):
        ds = pydicom.dcmread(CT_SMALL)
        if i == 2:
            del ds.PixelData
        ds.save_as(tmp_path / f"ct{i}.dcm")
        rows.append({"sample_id": f"ct{i}", "path": f"ct{i}.dcm", "y": i % 2})
    config = project(tmp_path, model, rows)
    message = cli_error("extract", config)
    assert "sample 'ct2'" in message and "ct2.dcm" in message and "no pixel data" in message


# --- manifests -----------------------------------------------------------------------------------------

def manifest_text(root: Path, lines: list[str], header: str = "sample_id,path,y") -> str:
    png(root / "a.png", 0)
    return "\n".join([header, *lines]) + "\n"


def test_csv_with_a_bom_is_read(tmp_path, model):
    rows = images(tmp_path, 4)
    text = "\ufeff" + pd.DataFrame(rows).to_csv(index=False)
    config = project(tmp_path, model, rows, manifest_text=text)
    result = CliRunner().invoke(app, ["extract", str(config)])
    assert result.exit_code == 0, result.output
    assert fi.summary_value(result.output, "samples") == "4"


MANIFEST_CASES = {
    "mixed types": (["a,a.png,1", "b,a.png,yes", "c,a.png,0.5", "d,a.png,0"],
                    ["target 'y' is not a number", "row 3 (id 'b')", "target 'y' must be 0 or 1", "row 4 (id 'c')"]),
    "missing column": ([], ["lacks column(s) 'y' (task.targets)"]),
    "duplicate ids": (["a,a.png,1", "b,a.png,0", "a,a.png,0"], ["duplicate sample ids", "'a' at rows 2, 4"]),
    "label out of range": (["a,a.png,1", "b,a.png,2"], ["target 'y' must be 0 or 1", "row 3 (id 'b'): '2'"]),
    "NaN targets": (["a,a.png,1", "b,a.png,nan", "c,a.png,"], ["missing target 'y'", "row 3 (id 'b')",
                                                               "row 4 (id 'c')"]),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_bad_manifest(tmp_path, model, case):
    lines, expected = MANIFEST_CASES[case]
    header = "sample_id,path" if case == "missing column" else "sample_id,path,y"
    config = project(tmp_path, model, [], manifest_text=manifest_text(tmp_path, lines or ["a,a.png"], header))
    message = cli_error("run", config)
    assert "manifest.csv" in message
    for part in expected:
        assert part in message, message


def test_multiclass_label_not_among_class_names(tmp_path, model):
    text = manifest_text(tmp_path, ["a,a.png,cat", "b,a.png,dog", "c,a.png,cow"])
    config = project(tmp_path, model, [], manifest_text=text,
                     task={"type": "multiclass", "targets": ["y"], "class_names": ["cat", "dog"]})
    message = cli_error("run", config)
    assert "not in task.class_names" in message and "row 4 (id 'c'): 'cow'" in message


# --- configs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["extract", "run"])
def test_yaml_with_a_misspelt_key(tmp_path, model, command):
    config = project(tmp_path, model, images(tmp_path, 4))
    text = config.read_text().replace("shard_size", "shard_szie")
    config.write_text(text)
    message = cli_error(command, config)
    assert "features.shard_szie: unknown key" in message and "exp.yaml" in message


def test_yaml_that_is_not_yaml_or_not_a_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("name: [unclosed\n")
    assert "is not valid YAML" in cli_error("run", tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("- just\n- a list\n")
    assert "top level must be a mapping" in cli_error("run", tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_bytes(b"name: \xff\xfe bad bytes\n")
    assert "c.yaml" in cli_error("run", tmp_path / "c.yaml")
    assert "cannot read config" in cli_error("extract", tmp_path / "missing.yaml")

