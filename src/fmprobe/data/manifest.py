"""The manifest: one row per sample (id, media path, targets, optional group and split), checked up front.

Every check runs on every row before anything is read or extracted, and each problem lists all
offending rows (row numbers as a spreadsheet shows them for CSV: header = row 1, first sample =
row 2; for Parquet the first sample is row 1) with their sample ids, so a user fixes the file
once instead of once per crash.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
from fsspec.core import url_to_fs

from fmprobe.config import DataConfig, TaskConfig
from fmprobe.errors import ConfigError, ManifestError

SPLITS = ("train", "val", "test")
MAX_LISTED = 20
MISSING_TEXT = {"", "na", "nan", "n/a", "null", "none", "<na>"}  # target cells read as "no value"
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")


@dataclass
class Manifest:
    """``df`` columns: sample_id (str), path (resolved), the task's target columns, group (str),
    split (str or None), and ``clip_start`` (int64) with ``data.clip_start_column``. Multiclass target
    cells hold class names (str)."""

    df: pd.DataFrame
    task: TaskConfig
    class_names: list[str] | None
    source: str

    def targets(self, df_subset: pd.DataFrame | None = None) -> np.ndarray:
        """Targets as in CONTRACTS: binary [N] float 0/1, multiclass [N] int64 index into
        ``class_names``, multilabel [N, C] float 0/1, regression [N, C] float (NaN: no value, with
        ``task.missing_targets: mask``)."""
        df = self.df if df_subset is None else df_subset
        cols = self.task.targets
        if self.task.type == "multiclass":
            index = {name: i for i, name in enumerate(self.class_names or [])}
            return df[cols[0]].map(index).to_numpy(dtype=np.int64)
        if self.task.type == "binary":
            return df[cols[0]].to_numpy(dtype=np.float32)
        return df[cols].to_numpy(dtype=np.float32)


def load_manifest(data: DataConfig, task: TaskConfig) -> Manifest:
    """Read and check the manifest named by ``data.manifest`` (local path or fsspec URL, CSV/TSV/Parquet).

    Raises ManifestError listing every problem found; relative media paths resolve against
    ``data.root``, else the manifest's folder.
    """
    if task.class_names is not None and task.type != "multiclass":
        raise ConfigError(f"task.class_names applies to multiclass tasks only (this task is {task.type}); remove it")
    raw, first_row = _read_table(data.manifest)
    src = data.manifest
    if raw.empty:
        raise ManifestError(f"manifest '{src}' has no rows")
    group_col, split_col = data.group_column, data.split_column
    _check_columns(raw, data, task, group_col, split_col, src)
    group_col = group_col if group_col in raw.columns else None
    split_col = split_col if split_col in raw.columns else None

    rows = np.arange(len(raw)) + first_row
    ids = _text(raw[data.id_column])
    out = pd.DataFrame({"sample_id": ids})
    problems = _check_ids(ids, rows)
    where = _Where(rows, ids)

    paths = _text(raw[data.path_column])
    empty_path = paths == ""
    if empty_path.any():
        problems.append(f"empty path: {where(empty_path)}")
    base = _base_dir(data)
    out["path"] = [p if not p else _resolve(p, base) for p in paths]
    if data.mask_column:  # segmentation masks: a path like `path`, or empty / NaN for a row without one
        masks = _text(raw[data.mask_column])
        no_mask = masks.str.strip().str.lower().isin(MISSING_TEXT)
        out["mask"] = [None if none else _resolve(m.strip(), base) for m, none in zip(masks, no_mask)]
    if data.clip_start_column:
        out["clip_start"], found = _clip_starts(raw[data.clip_start_column], data.clip_start_column, where)
        problems.extend(found)

    class_names = None
    for col in task.targets:
        if task.type == "multiclass":
            out[col], class_names, found = _class_targets(raw[col], task.class_names, where)
        else:
            out[col], found = _numeric_targets(raw[col], col, task.type, where,
                                               allow_missing=task.missing_targets == "mask")  # fmt: skip
        problems.extend(found)
    if task.missing_targets == "mask":  # every row must give at least one target something to learn from
        none = out[task.targets].isna().all(axis=1)
        if none.any():
            problems.append(f"no target value at all ({', '.join(task.targets)}): {where(none)}; drop these rows")

    if group_col:
        groups = _text(raw[group_col])
        if (groups == "").any():
            problems.append(f"empty group ('{group_col}'): {where(groups == '')}")
        out["group"] = groups
    else:
        out["group"] = ids
    if split_col:
        splits = _text(raw[split_col])
        bad = ~splits.isin(SPLITS)
        if bad.any():
            problems.append(
                f"split ('{split_col}') not one of {', '.join(SPLITS)}: {where(bad, values=splits)}"
            )
        out["split"] = splits
    else:
        out["split"] = None

    missing = _missing_files(out["path"], ~empty_path)
    if missing.any():
        problems.append(f"file not found: {where(missing, values=out['path'])}")
    if data.mask_column:
        missing = _missing_files(out["mask"], out["mask"].notna())
        if missing.any():
            problems.append(f"mask file ('{data.mask_column}') not found: {where(missing, values=out['mask'])}")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ManifestError(f"manifest '{src}' has {len(problems)} problem(s):\n{listed}")
    return Manifest(df=out, task=task, class_names=class_names, source=src)


def check_targets_vary(manifest: Manifest) -> None:
    """Refuse a target a probe cannot learn from: one class, a constant multilabel column, or a regression
    target with zero variance.

    ``load_manifest`` accepts such a file (extraction alone does not need the targets); a run calls this before
    any feature is extracted, so the user fixes the manifest before the backbone spends its time, instead of
    meeting a training error about a validation split that lacks a class.
    """
    task, df = manifest.task, manifest.df
    problems = []
    for col in task.targets:
        values = df[col].dropna().unique()  # missing regression targets (task.missing_targets: mask) are no value
        if len(values) > 1:
            continue
        if len(values) == 0:
            problems.append(f"regression target '{col}' has no value in any of the {len(df)} rows")
            continue
        value = repr(values[0]) if isinstance(values[0], str) else f"{float(values[0]):g}"
        valued = int(df[col].notna().sum())
        every = f"all {valued} rows hold {value}" if valued == len(df) else f"all {valued} rows with a value hold {value}"
        if task.type == "binary":
            problems.append(f"target '{col}' has a single class: {every}; a binary target needs rows of 0 and 1")
        elif task.type == "multiclass":
            declared = [c for c in manifest.class_names or [] if c != values[0]]
            never = f" (task.class_names also declares {declared}, which no row holds)" if declared else ""
            problems.append(f"target '{col}' has a single class: {every}{never}; a multiclass target needs rows "
                            "of at least two classes")
        elif task.type == "multilabel":
            problems.append(f"multilabel target '{col}' is constant: {every}; each label needs rows of 0 and 1")
        else:
            problems.append(f"regression target '{col}' has zero variance: {every}")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ManifestError(
            f"manifest '{manifest.source}' gives the probe nothing to learn:\n{listed}\nAdd rows with other values, "
            "or remove the column from task.targets."
        )


class _Where:
    """Formats offending rows as ``row 3 (id 'a')``, at most MAX_LISTED, then a count of the rest."""

    def __init__(self, rows: np.ndarray, ids: pd.Series):
        self.rows = rows
        self.ids = ids.to_numpy()

    def __call__(self, mask: pd.Series | np.ndarray, values: pd.Series | None = None) -> str:
        picked = np.flatnonzero(np.asarray(mask))
        parts = []
        for i in picked[:MAX_LISTED]:
            item = f"row {self.rows[i]} (id '{self.ids[i]}')"
            parts.append(item if values is None else f"{item}: {values.iloc[i]!r}")
        more = f" ... and {len(picked) - MAX_LISTED} more" if len(picked) > MAX_LISTED else ""
        return f"{len(picked)} row(s): " + ", ".join(parts) + more


def _read_table(url: str) -> tuple[pd.DataFrame, int]:
    """The manifest as read, and the row number of its first sample (2 for CSV/TSV with a header, 1 for Parquet)."""
    name = posixpath.basename(url).lower()
    stem = next((name[: -len(c)] for c in _COMPRESSION if name.endswith(c)), name)
    fmt = _FORMATS.get(posixpath.splitext(stem)[1])
    if fmt is None:
        raise ManifestError(
            f"manifest '{url}': unknown format; use one of {', '.join(_FORMATS)} (optionally compressed)"
        )
    try:
        with fsspec.open(url, "rb", compression="infer") as f:
            if fmt == "parquet":
                return pd.read_parquet(f), 1
            # every cell as text: ids like "007" and "NA" stay as written; targets are parsed below
            table = pd.read_csv(
                f, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False, encoding="utf-8-sig"
            )
            return table, 2
    except FileNotFoundError:
        raise ManifestError(f"manifest '{url}' not found") from None
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ManifestError(f"cannot read manifest '{url}': {err}") from None


def _check_columns(
    raw: pd.DataFrame, data: DataConfig, task: TaskConfig, group_col: str | None, split_col: str | None, src: str
) -> None:
    needed = {data.id_column: "data.id_column", data.path_column: "data.path_column"}
    needed.update({t: "task.targets" for t in task.targets})
    # the default group/split names are optional; a name the user set must exist
    if group_col and group_col != "group":
        needed[group_col] = "data.group_column"
    if split_col and split_col != "split":
        needed[split_col] = "data.split_column"
    if data.mask_column:
        needed[data.mask_column] = "data.mask_column"
    if data.clip_start_column:
        needed[data.clip_start_column] = "data.clip_start_column"
    missing = [f"'{c}' ({key})" for c, key in needed.items() if c not in raw.columns]
    if missing:
        raise ManifestError(
            f"manifest '{src}' lacks column(s) {', '.join(missing)}; it has: {', '.join(map(str, raw.columns))}"
        )
    reserved = {"sample_id", "path", "group", "split", data.id_column, data.path_column, group_col, split_col}
    reserved |= {"mask", data.mask_column} if data.mask_column else set()
    reserved |= {"clip_start", data.clip_start_column} if data.clip_start_column else set()
    clash = [t for t in task.targets if t in reserved]
    if clash:
        raise ManifestError(
            f"target column(s) {clash} clash with the id/path/group/split columns; rename them in the manifest"
        )


def _label(value: object) -> str:
    """A cell as text; booleans become 0/1 and integral floats (ints that went through a NaN-able
    column) lose their '.0', so Parquet and CSV manifests read alike."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _text(series: pd.Series) -> pd.Series:
    return pd.Series([_label(v) for v in series], dtype=object)


def _check_ids(ids: pd.Series, rows: np.ndarray) -> list[str]:
    problems = []
    empty = (ids == "").to_numpy()
    if empty.any():
        listed = ", ".join(str(r) for r in rows[empty][:MAX_LISTED])
        problems.append(f"empty sample id: {int(empty.sum())} row(s): rows {listed}")
    dup = ids.duplicated(keep=False).to_numpy() & ~empty
    if dup.any():
        by_id: dict[str, list[int]] = {}
        for sid, row in zip(ids[dup], rows[dup]):
            by_id.setdefault(sid, []).append(int(row))
        listed = "; ".join(f"'{sid}' at rows {', '.join(map(str, r))}" for sid, r in list(by_id.items())[:MAX_LISTED])
        more = f" ... and {len(by_id) - MAX_LISTED} more" if len(by_id) > MAX_LISTED else ""
        problems.append(f"duplicate sample ids: {len(by_id)} id(s): {listed}{more}")
    return problems


def _numeric_targets(
    column: pd.Series, name: str, task_type: str, where: _Where, *, allow_missing: bool = False
) -> tuple[pd.Series, list[str]]:
    """Target values (NaN where empty: allowed only with ``task.missing_targets: mask``) and the problems found."""
    text = _text(column)
    missing = text.str.strip().str.lower().isin(MISSING_TEXT)
    values = pd.to_numeric(text.where(~missing), errors="coerce").astype(float)
    problems = []
    if missing.any() and not allow_missing:
        hint = "; a regression target may be left empty with task.missing_targets: mask" if task_type == "regression" \
            else ""
        problems.append(f"missing target '{name}': {where(missing)}{hint}")
    not_number = values.isna() & ~missing
    if not_number.any():
        problems.append(f"target '{name}' is not a number: {where(not_number, values=text)}")
    if task_type == "regression":
        bad = ~np.isfinite(values) & ~values.isna()
        rule = "is not finite"
        huge = np.isfinite(values) & (np.abs(values) > np.finfo(np.float32).max)  # targets are float32
        if huge.any():
            problems.append(f"target '{name}' is beyond the float32 range (3.4e38): {where(huge, values=text)}")
    else:
        bad = ~values.isin([0.0, 1.0]) & ~values.isna()
        rule = "must be 0 or 1"
    if bad.any():
        problems.append(f"target '{name}' {rule}: {where(bad, values=text)}")
    return values, problems


def _clip_starts(column: pd.Series, name: str, where: _Where) -> tuple[pd.Series, list[str]]:
    """Each row's first frame (``data.clip_start_column``): a whole number >= 0, never guessed when missing."""
    text = _text(column).str.strip()
    missing = text.str.lower().isin(MISSING_TEXT)
    values = pd.to_numeric(text.where(~missing), errors="coerce").astype(float)
    whole = np.isfinite(values) & (values == np.round(values)) & (values.abs() < 2**53)
    problems = []
    if missing.any():
        problems.append(f"missing clip start ('{name}'): {where(missing)}")
    bad = ~whole & ~missing
    if bad.any():
        problems.append(f"clip start ('{name}') is not a whole number: {where(bad, values=text)}")
    negative = whole & (values < 0)
    if negative.any():
        problems.append(f"clip start ('{name}') is negative (frames count from 0): {where(negative, values=text)}")
    return pd.Series(np.where(whole, values, -1).astype(np.int64)), problems


def _class_targets(
    column: pd.Series, given: list[str] | None, where: _Where
) -> tuple[pd.Series, list[str], list[str]]:
    """Multiclass labels as text, the class names (given, or the sorted labels found) and problems."""
    labels = _text(column)
    name = column.name
    missing = labels.str.strip().str.lower().isin(MISSING_TEXT)
    problems = []
    if missing.any():
        problems.append(f"missing target '{name}': {where(missing)}")
    if given is not None:
        if len(set(given)) != len(given):
            raise ConfigError(f"task.class_names has duplicates: {given}")
        class_names = list(given)
        unknown = ~labels.isin(class_names) & ~missing
        if unknown.any():
            problems.append(
                f"target '{name}' not in task.class_names {class_names}: {where(unknown, values=labels)}"
            )
    else:
        found = sorted(set(labels[~missing]))
        numeric = all(re.fullmatch(r"[+-]?\d+", v) for v in found)
        class_names = sorted(found, key=int) if numeric else found
    return labels, class_names, problems


def _base_dir(data: DataConfig) -> str:
    """Where relative media paths start: data.root, else the manifest's folder."""
    if data.root:
        return data.root if "://" in data.root else os.path.abspath(os.path.expanduser(data.root))
    if "://" in data.manifest:
        protocol, rest = data.manifest.split("://", 1)
        return f"{protocol}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(os.path.expanduser(data.manifest)))


def _resolve(path: str, base: str) -> str:
    if "://" in path:
        return path
    local = os.path.expanduser(path)
    if os.path.isabs(local):
        return local
    if "://" in base:
        protocol, rest = base.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, path))}"
    return os.path.normpath(os.path.join(base, local))


def _missing_files(paths: pd.Series, check: pd.Series) -> np.ndarray:
    missing = np.zeros(len(paths), dtype=bool)
    for i in np.flatnonzero(check.to_numpy()):
        fs, path = url_to_fs(paths.iloc[i])
        missing[i] = not fs.exists(path)
    return missing
