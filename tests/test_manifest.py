"""Manifest loading: every check, all offending rows in one error, path resolution, formats."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pandas as pd
import pytest
from data_factories import write_csv
from pydantic import ValidationError

from fmprobe.config import DataConfig, TaskConfig
from fmprobe.data.manifest import check_targets_vary, load_manifest
from fmprobe.errors import ConfigError, ManifestError

BINARY = TaskConfig(type="binary", targets=["label"])


def _media(folder, names):
    (folder / "img").mkdir(exist_ok=True)
    for n in names:
        (folder / "img" / n).write_bytes(b"x")


def _csv(tmp_path, header, rows, **kw):
    names = [r[header.index("path")] for r in rows if "path" in header]
    _media(tmp_path, [n.split("/", 1)[1] for n in names if n.startswith("img/")])
    return write_csv(tmp_path / "m.csv", header, rows, **kw)


def _errors(excinfo) -> str:
    return str(excinfo.value)


def test_valid_csv_resolves_paths_and_defaults(tmp_path):
    path = _csv(tmp_path, ["sample_id", "path", "label"], [["a", "img/a.png", 0], ["b", "img/b.png", 1]])
    m = load_manifest(DataConfig(manifest=path), BINARY)
    assert m.df["sample_id"].tolist() == ["a", "b"]
    assert m.df["path"].tolist() == [str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")]
    assert m.df["group"].tolist() == ["a", "b"]  # no group column: each sample its own group
    assert m.df["split"].isna().all()
    y = m.targets()
    assert y.dtype == np.float32 and y.tolist() == [0.0, 1.0]
    assert m.class_names is None


def test_root_and_custom_columns(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _media(data_dir, ["a.png", "b.png"])
    path = write_csv(
        tmp_path / "m.csv",
        ["id", "file", "patient", "fold", "label"],
        [["007", "img/a.png", "p1", "train", 1], ["008", "img/b.png", "p1", "test", 0]],
    )
    cfg = DataConfig(manifest=path, root=str(data_dir), id_column="id", path_column="file",
                     group_column="patient", split_column="fold")
    df = load_manifest(cfg, BINARY).df
    assert df["sample_id"].tolist() == ["007", "008"]  # ids stay text, leading zeros kept
    assert df["path"].iloc[0] == str(data_dir / "img" / "a.png")
    assert df["group"].tolist() == ["p1", "p1"]
    assert df["split"].tolist() == ["train", "test"]


def test_utf8_bom_header(tmp_path):
    path = _csv(tmp_path, ["sample_id", "path", "label"], [["a", "img/a.png", 1]], bom=True)
    assert fsspec.open(path, "rb").open().read(3) == b"\xef\xbb\xbf"
    assert load_manifest(DataConfig(manifest=path), BINARY).df["sample_id"].tolist() == ["a"]


def test_parquet_with_typed_columns(tmp_path):
    _media(tmp_path, ["a.png", "b.png", "c.png"])
    df = pd.DataFrame({"sample_id": [1, 2, 3], "path": ["img/a.png", "img/b.png", "img/c.png"], "y": [2, 10, 1]})
    df.to_parquet(tmp_path / "m.parquet")
    m = load_manifest(DataConfig(manifest=str(tmp_path / "m.parquet")), TaskConfig(type="multiclass", targets=["y"]))
    assert m.df["sample_id"].tolist() == ["1", "2", "3"]
    assert m.class_names == ["1", "2", "10"]  # integer labels sort numerically
    assert m.targets().tolist() == [1, 2, 0]
    assert m.targets().dtype == np.int64


def test_parquet_bool_and_nullable_int_targets(tmp_path):
    _media(tmp_path, ["a.png"])
    df = pd.DataFrame({"sample_id": ["a", "b"], "path": ["img/a.png"] * 2, "label": [True, False]})
    df["y"] = pd.array([3, 1], dtype="Int64")
    df.to_parquet(tmp_path / "m.parquet")
    cfg = DataConfig(manifest=str(tmp_path / "m.parquet"))
    assert load_manifest(cfg, BINARY).targets().tolist() == [1.0, 0.0]
    m = load_manifest(cfg, TaskConfig(type="multiclass", targets=["y"], class_names=["1", "3"]))
    assert m.targets().tolist() == [1, 0]


def test_parquet_rows_count_from_one(tmp_path):
    _media(tmp_path, ["a.png"])
    pd.DataFrame({"sample_id": ["a", "b"], "path": ["img/a.png", "img/a.png"], "label": [1, None]}).to_parquet(
        tmp_path / "m.parquet"
    )
    with pytest.raises(ManifestError, match=r"missing target 'label': 1 row\(s\): row 2 \(id 'b'\)"):
        load_manifest(DataConfig(manifest=str(tmp_path / "m.parquet")), BINARY)


def test_empty_manifest(tmp_path):
    path = write_csv(tmp_path / "m.csv", ["sample_id", "path", "label"], [])
    with pytest.raises(ManifestError, match="has no rows"):
        load_manifest(DataConfig(manifest=path), BINARY)


def test_missing_columns_say_which_exist(tmp_path):
    path = _csv(tmp_path, ["sample_id", "file", "label"], [["a", "img/a.png", 1]])
    with pytest.raises(ManifestError) as exc:
        load_manifest(DataConfig(manifest=path), TaskConfig(type="multilabel", targets=["label", "other"]))
    msg = _errors(exc)
    assert "'path' (data.path_column)" in msg and "'other' (task.targets)" in msg
    assert "it has: sample_id, file, label" in msg


def test_named_group_or_split_column_must_exist_default_may_be_absent(tmp_path):
    path = _csv(tmp_path, ["sample_id", "path", "label"], [["a", "img/a.png", 1]])
    load_manifest(DataConfig(manifest=path, group_column="group", split_column="split"), BINARY)
    with pytest.raises(ManifestError, match=r"'patient' \(data.group_column\)"):
        load_manifest(DataConfig(manifest=path, group_column="patient"), BINARY)
    with pytest.raises(ManifestError, match=r"'fold' \(data.split_column\)"):
        load_manifest(DataConfig(manifest=path, split_column="fold"), BINARY)


def test_duplicate_ids_listed_with_rows(tmp_path):
    ids = ["a", "b", "a", "c", "c"]
    rows = [[sid, f"img/{i}.png", 0] for i, sid in enumerate(ids)]
    path = _csv(tmp_path, ["sample_id", "path", "label"], rows)
    with pytest.raises(ManifestError) as exc:
        load_manifest(DataConfig(manifest=path), BINARY)
    assert "duplicate sample ids: 2 id(s): 'a' at rows 2, 4; 'c' at rows 5, 6" in _errors(exc)


def test_all_missing_files_in_one_error_truncated_after_20(tmp_path):
    rows = [[f"s{i}", f"gone/{i}.png", 0] for i in range(25)] + [["ok", "img/ok.png", 1]]
    path = _csv(tmp_path, ["sample_id", "path", "label"], rows)
    with pytest.raises(ManifestError) as exc:
        load_manifest(DataConfig(manifest=path), BINARY)
    msg = _errors(exc)
    assert "file not found: 25 row(s)" in msg
    assert "row 2 (id 's0')" in msg and "row 21 (id 's19')" in msg and "'s20'" not in msg
    assert "... and 5 more" in msg and "'ok'" not in msg


def test_nan_and_out_of_range_targets(tmp_path):
    labels = {"a": "", "b": "NA", "c": 2, "d": "yes", "e": 1}
    rows = [[sid, f"img/{sid}.png", y] for sid, y in labels.items()]
    path = _csv(tmp_path, ["sample_id", "path", "label"], rows)
    with pytest.raises(ManifestError) as exc:
        load_manifest(DataConfig(manifest=path), BINARY)
    msg = _errors(exc)
    assert "missing target 'label': 2 row(s): row 2 (id 'a'), row 3 (id 'b')" in msg
    assert "target 'label' must be 0 or 1: 1 row(s): row 4 (id 'c'): '2'" in msg
    assert "target 'label' is not a number: 1 row(s): row 5 (id 'd'): 'yes'" in msg
    assert "3 problem(s)" in msg


def test_multilabel_each_column_checked(tmp_path):
    rows = [["a", "img/a.png", 0, 1], ["b", "img/b.png", 1, 0.5]]
    path = _csv(tmp_path, ["sample_id", "path", "x", "y"], rows)
    task = TaskConfig(type="multilabel", targets=["x", "y"])
    with pytest.raises(ManifestError, match=r"target 'y' must be 0 or 1: 1 row\(s\): row 3"):
        load_manifest(DataConfig(manifest=path), task)
    write_csv(tmp_path / "m.csv", ["sample_id", "path", "x", "y"], [["a", "img/a.png", 0, 1], ["b", "img/b.png", 1, 1]])
    y = load_manifest(DataConfig(manifest=path), task).targets()
    assert y.shape == (2, 2) and y.tolist() == [[0, 1], [1, 1]]


def test_regression_must_be_finite(tmp_path):
    rows = [["a", "img/a.png", 1.5, 2], ["b", "img/b.png", "inf", 3]]
    path = _csv(tmp_path, ["sample_id", "path", "age", "size"], rows)
    task = TaskConfig(type="regression", targets=["age", "size"], primary_metric="r2/age")
    with pytest.raises(ManifestError, match=r"target 'age' is not finite: 1 row\(s\): row 3 \(id 'b'\)"):
        load_manifest(DataConfig(manifest=path), task)
    write_csv(tmp_path / "m.csv", ["sample_id", "path", "age", "size"], [["a", "img/a.png", 1.5, 2]])
    assert load_manifest(DataConfig(manifest=path), task).targets().tolist() == [[1.5, 2.0]]


def test_multiclass_given_class_names(tmp_path):
    rows = [["a", "img/a.png", "cat"], ["b", "img/b.png", "dog"], ["c", "img/c.png", "cow"]]
    path = _csv(tmp_path, ["sample_id", "path", "y"], rows)
    task = TaskConfig(type="multiclass", targets=["y"], class_names=["dog", "cat"])
    expected = r"not in task.class_names \['dog', 'cat'\]: 1 row\(s\): row 4 \(id 'c'\): 'cow'"
    with pytest.raises(ManifestError, match=expected):
        load_manifest(DataConfig(manifest=path), task)
    task = TaskConfig(type="multiclass", targets=["y"], class_names=["dog", "cat", "cow"])
    m = load_manifest(DataConfig(manifest=path), task)
    assert m.class_names == ["dog", "cat", "cow"] and m.targets().tolist() == [1, 0, 2]
    m = load_manifest(DataConfig(manifest=path), TaskConfig(type="multiclass", targets=["y"]))
    assert m.class_names == ["cat", "cow", "dog"] and m.targets(m.df.iloc[[2, 0]]).tolist() == [1, 0]


def test_class_names_refused_outside_multiclass(tmp_path):
    path = _csv(tmp_path, ["sample_id", "path", "label"], [["a", "img/a.png", 1]])
    with pytest.raises(ConfigError, match="multiclass tasks only"):
        load_manifest(DataConfig(manifest=path), TaskConfig(type="binary", targets=["label"], class_names=["n", "p"]))


def test_split_values_are_strict(tmp_path):
    rows = [["a", "img/a.png", 1, "train"], ["b", "img/b.png", 0, "validation"], ["c", "img/c.png", 0, ""]]
    path = _csv(tmp_path, ["sample_id", "path", "label", "split"], rows)
    with pytest.raises(ManifestError) as exc:
        load_manifest(DataConfig(manifest=path), BINARY)
    expected = "split ('split') not one of train, val, test: 2 row(s): row 3 (id 'b'): 'validation', row 4 (id 'c'): ''"
    assert expected in _errors(exc)


def test_all_problems_reported_together(tmp_path):
    rows = [["a", "img/a.png", 1, "g"], ["a", "missing.png", "", "g"], ["", "img/c.png", 0, ""]]
    path = _csv(tmp_path, ["sample_id", "path", "label", "group"], rows)
    with pytest.raises(ManifestError) as exc:
        load_manifest(DataConfig(manifest=path), BINARY)
    msg = _errors(exc)
    for part in ("duplicate sample ids", "empty sample id", "missing target", "empty group", "file not found"):
        assert part in msg, part
    assert "5 problem(s)" in msg


def test_memory_url_manifest_resolves_relative_paths():
    base = f"memory://manifests-{uuid.uuid4().hex}"
    for name in ("a.png", "sub/b.png"):
        with fsspec.open(f"{base}/media/{name}", "wb") as f:
            f.write(b"x")
    rows = [["a", "media/a.png", 0], ["b", "media/sub/../sub/b.png", 1]]
    url = write_csv(f"{base}/m.csv", ["sample_id", "path", "label"], rows)
    df = load_manifest(DataConfig(manifest=url), BINARY).df
    assert df["path"].tolist() == [f"{base}/media/a.png", f"{base}/media/sub/b.png"]
    write_csv(f"{base}/m.csv", ["sample_id", "path", "label"], [["a", "media/nope.png", 0]])
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(DataConfig(manifest=url), BINARY)


def test_unreadable_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(DataConfig(manifest=str(tmp_path / "none.csv")), BINARY)
    (tmp_path / "m.xlsx").write_bytes(b"x")
    with pytest.raises(ManifestError, match="unknown format"):
        load_manifest(DataConfig(manifest=str(tmp_path / "m.xlsx")), BINARY)


@pytest.mark.parametrize("task,column,rows,expected", [
    (BINARY, "label", [1, 1, 1], "target 'label' has a single class: all 3 rows hold 1"),
    (TaskConfig(type="multiclass", targets=["label"], class_names=["glioma", "normal"]), "label",
     ["glioma"] * 3, "target 'label' has a single class: all 3 rows hold 'glioma' (task.class_names also declares "
                     "['normal'], which no row holds)"),
    (TaskConfig(type="multilabel", targets=["label", "other"]), "other", [0, 0, 0],
     "multilabel target 'other' is constant: all 3 rows hold 0"),
    (TaskConfig(type="regression", targets=["label", "other"], primary_metric="r2/label"), "other", [41.5] * 3,
     "regression target 'other' has zero variance: all 3 rows hold 41.5"),
])
def test_a_target_with_nothing_to_learn_is_refused_by_name_and_value(tmp_path, task, column, rows, expected):
    varying = [0, 1, 1]
    table = [[f"s{i}", f"img/s{i}.png", *((v, varying[i]) if column == "label" else (varying[i], v))]
             for i, v in enumerate(rows)]
    path = _csv(tmp_path, ["sample_id", "path", "label", "other"], table)
    manifest = load_manifest(DataConfig(manifest=path), task)  # extraction alone needs no varying target
    with pytest.raises(ManifestError, match="nothing to learn") as excinfo:
        check_targets_vary(manifest)
    assert expected in _errors(excinfo) and _errors(excinfo).count("  - ") == 1


def test_targets_that_vary_pass(tmp_path):
    rows = [["a", "img/a.png", 0, 2.0], ["b", "img/b.png", 1, 2.5]]
    path = _csv(tmp_path, ["sample_id", "path", "label", "other"], rows)
    for task in (BINARY, TaskConfig(type="multiclass", targets=["label"]), TaskConfig(type="multilabel", targets=["label"]),
                 TaskConfig(type="regression", targets=["label", "other"], primary_metric="r2/label")):
        check_targets_vary(load_manifest(DataConfig(manifest=path), task))


def test_empty_regression_cells_need_missing_targets_mask_and_every_row_needs_one_value(tmp_path):
    rows = [["a", "img/a.png", 71.5, 28], ["b", "img/b.png", 64.0, ""], ["c", "img/c.png", "", "NA"],
            ["d", "img/d.png", "", 24]]
    path = _csv(tmp_path, ["sample_id", "path", "age", "mmse"], rows)
    task = TaskConfig(type="regression", targets=["age", "mmse"], primary_metric="r2/age")
    with pytest.raises(ManifestError, match=r"missing target 'age': 2 row\(s\).*missing_targets: mask"):
        load_manifest(DataConfig(manifest=path), task)
    masked = task.model_copy(update={"missing_targets": "mask"})
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(DataConfig(manifest=path), masked)
    assert _errors(excinfo).count("  - ") == 1  # the empty cells are fine; the row with no value at all is not
    assert "no target value at all (age, mmse): 1 row(s): row 4 (id 'c')" in _errors(excinfo)
    write_csv(tmp_path / "m.csv", ["sample_id", "path", "age", "mmse"], [r for r in rows if r[0] != "c"])
    y = load_manifest(DataConfig(manifest=path), masked).targets()
    np.testing.assert_array_equal(np.isnan(y), [[False, False], [False, True], [True, False]])
    with pytest.raises(ValidationError, match="missing_targets: mask applies to regression"):
        TaskConfig(type="binary", targets=["y"], missing_targets="mask")
