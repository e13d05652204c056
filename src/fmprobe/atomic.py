"""Atomic writes: a reader never sees a half-written artifact.

Everything is written to a temporary file (or folder) in the destination folder, flushed, then renamed over
the destination (rename is atomic on POSIX within one filesystem). Temporaries are created the way ``open()``
and ``mkdir()`` create files, so the umask decides who may read the result (``tempfile.mkstemp`` and
``mkdtemp`` would make every artifact private to its owner whatever the umask, since the rename keeps the mode).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temporary_name(dest: Path) -> Path:
    """A fresh hidden name next to ``dest`` (random, so concurrent writers never share it)."""
    return dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest``, on error it is removed.

    The temporary file exists (empty) when yielded, created with mode 0666 less the umask like any new file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temporary_name(dest)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        tmp_path.replace(dest)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a new empty folder next to ``dest``; on success it replaces ``dest`` (an older ``dest`` is removed
    first), on error it is removed. The folder gets mode 0777 less the umask, like any new folder."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(dest)
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: str | Path, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, allow_nan=True, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
