"""Per-sample content fingerprints: the sample half of every feature-cache key.

A file's fingerprint is a blake2b hash of its bytes; a folder's (frame folder, DICOM series) hashes its
sorted member names with their hashes; a row's clip start (a window in a long video) is appended to it.
Reading every byte on every run would be slow for large datasets, so hashes are memoised by (url, stat
stamp) in an SQLite table next to the feature stores; a stamp that may still change within the same clock
tick ("racily clean", as git calls it) is not memoised.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from fmprobe.errors import ReaderError

_CHUNK = 4 << 20
_RACY_SECONDS = 2.0
# info fields that change when a file is rewritten (local stat, S3, GCS, Azure)
_STAMP_FIELDS = ("size", "mtime", "created", "ino", "ETag", "etag", "LastModified", "last_modified",
                 "updated", "generation", "md5Hash")


class FingerprintMemo:
    """(url, stamp) -> hash, shared by all feature stores under one cache dir; safe across processes."""

    def __init__(self, cache_dir: str | Path):
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(Path(cache_dir) / "fingerprints.sqlite", timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS memo (url TEXT PRIMARY KEY, stamp TEXT, digest TEXT)")
        self._db.commit()

    def lookup(self, urls: Sequence[str]) -> dict[str, tuple[str, str]]:
        found: dict[str, tuple[str, str]] = {}
        unique = list(dict.fromkeys(urls))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            rows = self._db.execute(
                f"SELECT url, stamp, digest FROM memo WHERE url IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update({url: (stamp, digest) for url, stamp, digest in rows})
        return found

    def store(self, rows: list[tuple[str, str, str]]) -> None:
        if rows:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO memo VALUES (?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()


def _stamp(info: dict[str, Any]) -> tuple[str, bool]:
    """A string that changes when the file does, and whether it is old enough to trust."""
    parts = [f"{k}={info[k]}" for k in _STAMP_FIELDS if info.get(k) is not None]
    times = []
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        value = info.get(key)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            value = value.timestamp()
        if isinstance(value, (int, float)):
            times.append(float(value))
    content_tag = any(info.get(k) for k in ("ETag", "etag", "md5Hash", "generation"))
    settled = content_tag or (bool(times) and time.time() - max(times) > _RACY_SECONDS)
    return ";".join(parts), settled


def _hash_file(fs: Any, path: str) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_paths(
    paths: Sequence[str], sample_ids: Sequence[str], memo: FingerprintMemo | None = None, threads: int = 8
) -> list[str | ReaderError]:
    """Content fingerprint of each path (file or folder), or the ReaderError saying why it has none.

    Errors are returned, not raised, so the caller applies ``data.on_error`` per sample.
    """
    with ThreadPoolExecutor(threads) as pool:
        listed = list(pool.map(lambda args: _members(*args), zip(paths, sample_ids)))
        flat = [(fs, info) for entry in listed if not isinstance(entry, ReaderError) for fs, info in entry[1]]
        urls = [fs.unstrip_protocol(info["name"]) for fs, info in flat]
        stamps = [_stamp(info) for _, info in flat]
        known = memo.lookup(urls) if memo else {}
        todo = [i for i, url in enumerate(urls) if known.get(url, ("", ""))[0] != stamps[i][0]]
        hashed = list(pool.map(lambda i: _try_hash(*flat[i]), todo))
    fresh = dict(zip(todo, hashed))
    if memo:
        memo.store([(urls[i], stamps[i][0], d) for i, d in fresh.items() if isinstance(d, str) and stamps[i][1]])
    digests = [fresh[i] if i in fresh else known[urls[i]][1] for i in range(len(flat))]

    results: list[str | ReaderError] = []
    pos = 0
    for path, sample_id, entry in zip(paths, sample_ids, listed):
        if isinstance(entry, ReaderError):
            results.append(entry)
            continue
        base, members = entry
        mine = digests[pos : pos + len(members)]
        pos += len(members)
        failed = next((d for d in mine if isinstance(d, OSError)), None)
        if failed is not None:
            results.append(ReaderError(f"cannot read for fingerprinting: {failed}", sample_id=sample_id, path=path))
        elif base is None:
            results.append("f" + mine[0])
        else:
            digest = hashlib.blake2b(digest_size=20)
            for (_, info), member_digest in zip(members, mine):
                digest.update(f"{info['name'][len(base) + 1:]}\0{member_digest}\n".encode())
            results.append("d" + digest.hexdigest())
    return results


def with_clip_start(fingerprint: str, clip_start: int | None) -> str:
    """A sample's fingerprint with its clip window (``data.clip_start_column``): two rows of one long video are
    two samples, and moving a row's start makes its cached features stale."""
    return fingerprint if clip_start is None else f"{fingerprint}@{clip_start}"


def _try_hash(fs: Any, info: dict[str, Any]) -> str | OSError:
    try:
        return _hash_file(fs, info["name"])
    except OSError as err:
        return err


def _members(path: str, sample_id: str) -> tuple[str | None, list[tuple[Any, dict[str, Any]]]] | ReaderError:
    """(folder name or None for a file, [(fs, info) of each file to hash]) or why the path has none."""
    try:
        fs, stripped = url_to_fs(path)
        info = fs.info(stripped)
        if info["type"] != "directory":
            return None, [(fs, info)]
        base = info["name"].rstrip("/")
        members = sorted(fs.find(base, detail=True).values(), key=lambda m: m["name"])
        if not members:
            return ReaderError("the folder is empty", sample_id=sample_id, path=path)
        return base, [(fs, m) for m in members]
    except FileNotFoundError:
        return ReaderError("file not found", sample_id=sample_id, path=path)
    except OSError as err:
        return ReaderError(f"cannot read for fingerprinting: {err}", sample_id=sample_id, path=path)
