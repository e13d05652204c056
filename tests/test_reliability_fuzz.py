"""Property-based fuzzing of config and manifest parsing: never a crash, always a valid object or an
FmprobeError (which the CLI prints as one message). A valid result also keeps the documented contracts."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fmprobe.config import Experiment, dump_config, load_config, parse_config
from fmprobe.data.manifest import Manifest, load_manifest
from fmprobe.errors import FmprobeError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- configs -------------------------------------------------------------------------------------------

VALID = {
    "name": "fuzz",
    "data": {"manifest": "m.csv"},
    "task": {"type": "binary", "targets": ["y"]},
}
KEYS = [
    "name", "runs_dir", "data", "data.manifest", "data.kind", "data.frames_per_clip", "data.clip_position",
    "data.num_clips", "data.volume_mode", "data.slice_axis", "data.window", "data.window.center",
    "data.window.width", "data.on_error", "data.group_column", "task", "task.type", "task.targets",
    "task.class_names", "task.primary_metric", "model", "model.name", "model.kind", "model.layers",
    "model.checkpoint", "model.native_frames", "model.image_size", "features", "features.token_grid",
    "features.shard_size", "heads", "loss.class_weights", "loss.pos_weight", "loss.focal_alpha",
    "train.seeds", "train.early_stopping", "train.early_stopping.patience", "split.mode", "split.fractions",
    "eval.ci", "eval.thresholds", "trian", "data.kidn", "model.layers.0",
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["binary", "multiclass", "video", "volume", "uniform", "stack",
                                           "vjepa2-native", "attentive", "balanced", "auto", "-1", "1e999"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["type", "layer",
                                            "pooling", "name", "center", "width"])), inner, max_size=4)),
    max_leaves=12,
)


def set_path(data: dict, dotted: str, value) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def check_config(data) -> None:
    try:
        exp = parse_config(data)
    except FmprobeError:
        return
    assert isinstance(exp, Experiment)
    # a valid config survives its own resolved dump: what a run saves can be run again
    assert parse_config(yaml.safe_load(dump_config(exp))) == exp


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=5))
def test_mutated_configs_parse_or_raise_a_config_error(mutations):
    data = yaml.safe_load(yaml.safe_dump(VALID))
    for key, value in mutations:
        set_path(data, key, value)
    check_config(data)


@FUZZ
@given(values)
def test_arbitrary_documents_parse_or_raise_a_config_error(document):
    check_config(document)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 values.map(lambda v: yaml.safe_dump(v).encode())),
       st.dictionaries(st.sampled_from(KEYS), values, max_size=3))
def test_config_files_and_overrides_load_or_raise_a_config_error(config_dir, raw, overrides):
    path = config_dir / "exp.yaml"
    path.write_bytes(raw)
    try:
        exp = load_config(path, overrides)
    except FmprobeError:
        return
    assert isinstance(exp, Experiment)


# --- manifests -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the fuzzed manifests are written, beside the one image their relative paths may name."""
    folder = tmp_path_factory.mktemp("fuzz-manifest")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "a.png")
    return folder

CELLS = st.one_of(
    st.sampled_from(["", "nan", "NA", "null", "None", "0", "1", "1.0", "0.0", "2", "-1", "inf", "-inf", "1e400",
                     "99999999999999999999999", "٣", " 1 ", "cat", "dog", "true", "True", "a.png", "b.png",
                     "s://x/a.png", "train", "val", "test", "TRAIN", "g1", "\ufeff1", "0x1", "1_0", "+1"]),
    st.text(max_size=6),
)
COLUMNS = ["sample_id", "path", "y", "z", "group", "split", "extra"]


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    pd.DataFrame(rows, columns=header).to_csv(buf, index=False)
    return buf.getvalue()


TASKS = st.sampled_from([
    {"type": "binary", "targets": ["y"]},
    {"type": "multiclass", "targets": ["y"]},
    {"type": "multiclass", "targets": ["y"], "class_names": ["cat", "dog", "1"]},
    {"type": "multilabel", "targets": ["y", "z"]},
    {"type": "regression", "targets": ["y"]},
    {"type": "regression", "targets": ["y", "z"], "primary_metric": "r2/y"},
])


def check_manifest(manifest_path: Path, task: dict, data: dict | None = None) -> None:
    exp = parse_config({"name": "m", "data": {"manifest": str(manifest_path), **(data or {})}, "task": task})
    try:
        manifest = load_manifest(exp.data, exp.task)
    except FmprobeError:
        return
    assert isinstance(manifest, Manifest)
    y = manifest.targets()
    n = len(manifest.df)
    assert manifest.df["sample_id"].is_unique and (manifest.df["sample_id"] != "").all()
    if task["type"] == "binary":
        assert y.shape == (n,) and set(np.unique(y)) <= {0.0, 1.0}
    elif task["type"] == "multiclass":
        assert y.shape == (n,) and y.dtype == np.int64 and (0 <= y).all() and (y < len(manifest.class_names)).all()
    elif task["type"] == "multilabel":
        assert y.shape == (n, len(task["targets"])) and set(np.unique(y)) <= {0.0, 1.0}
    else:
        assert y.shape == (n, len(task["targets"])) and np.isfinite(y).all()


@FUZZ
@given(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=7),
       st.lists(st.lists(CELLS, min_size=7, max_size=7), max_size=6), TASKS,
       st.sampled_from([{}, {"group_column": None, "split_column": None}, {"group_column": "extra"}]))
def test_csv_manifests_load_or_raise_a_clear_error(media_dir, columns, rows, task, data):
    rows = [r[: len(columns)] for r in rows]
    path = media_dir / "m.csv"
    path.write_text(csv_text(columns, rows), encoding="utf-8")
    check_manifest(path, task, data)


@FUZZ
@given(st.binary(max_size=300), TASKS)
def test_arbitrary_bytes_as_a_manifest_raise_a_clear_error(media_dir, raw, task):
    path = media_dir / "raw.csv"
    path.write_bytes(raw)
    check_manifest(path, task)


PARQUET_COLUMNS = st.sampled_from([
    ("int", st.integers(-3, 3)), ("float", st.floats(allow_nan=True, allow_infinity=True)),
    ("bool", st.booleans()), ("text", CELLS), ("optional int", st.one_of(st.none(), st.integers(0, 2))),
])


@FUZZ
@given(st.integers(0, 5), st.fixed_dictionaries({c: PARQUET_COLUMNS for c in ["sample_id", "y", "z", "group"]}),
       TASKS, st.data())
def test_parquet_manifests_with_any_column_types(media_dir, n, kinds, task, data):
    frame = {"path": ["a.png"] * n}
    for column, (_, strategy) in kinds.items():
        frame[column] = data.draw(st.lists(strategy, min_size=n, max_size=n))
    path = media_dir / "m.parquet"
    pd.DataFrame(frame).to_parquet(path, index=False)
    check_manifest(path, task, {"split_column": None})


@pytest.mark.parametrize("value", [math.nan, math.inf, -1])
def test_a_non_finite_or_negative_shard_size_is_a_config_error(value):
    with pytest.raises(FmprobeError, match="features.shard_size"):
        parse_config({**VALID, "features": {"shard_size": value}})
