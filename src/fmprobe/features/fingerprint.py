"""Per-sample content fingerprints: the sample half of every feature-cache key.

A file's fingerprint is a blake2b hash of its bytes; a folder's (frame folder, DICOM series) hashes its
sorted member names with their hashes. Reading every byte on every run would be slow for large datasets,
so hashes are memoised by (url, stat stamp) in an SQLite table next to the feature stores; a stamp
that may still change within the same clock tick ("racily clean", as git calls it) is not memoised.
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
    modified = info.get("mtime", info.get("LastModified", info.get("last_modified", info.get("updated"))))
    if isinstance(modified, str):
        try:
            modified = datetime.fromisoformat(modified.replace("Z", "+00:00"))
        except ValueError:
            modified = None
    if isinstance(modified, datetime):
        modified = modified.timestamp()
    content_tag = any(info.get(k) for k in ("ETag", "etag", "md5Hash", "generation"))
    settled = content_tag or (isinstance(modified, (int, float)) and time.time() - modified > _RACY_SECONDS)
    return ";".join(parts), settled


def _hash_file(fs: Any, path: str) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Hasher:
    """Hashes files through the memo, collecting new memo rows to write in one transaction."""

    def __init__(self, memo: FingerprintMemo | None):
        self.memo = memo
        self.new_rows: list[tuple[str, str, str]] = []

    def files(self, fs: Any, infos: list[dict[str, Any]], pool: ThreadPoolExecutor) -> list[str]:
        urls = [fs.unstrip_protocol(info["name"]) for info in infos]
        stamps = [_stamp(info) for info in infos]
        known = self.memo.lookup(urls) if self.memo else {}
        todo = [i for i, url in enumerate(urls) if known.get(url, ("", ""))[0] != stamps[i][0]]
        fresh = dict(zip(todo, pool.map(lambda i: _hash_file(fs, infos[i]["name"]), todo)))
        for i, digest in fresh.items():
            if stamps[i][1]:
                self.new_rows.append((urls[i], stamps[i][0], digest))
        return [fresh[i] if i in fresh else known[urls[i]][1] for i in range(len(urls))]


def fingerprint_paths(
    paths: Sequence[str], sample_ids: Sequence[str], memo: FingerprintMemo | None = None, threads: int = 8
) -> list[str | ReaderError]:
    """Content fingerprint of each path (file or folder), or the ReaderError saying why it has none.

    Errors are returned, not raised, so the caller applies ``data.on_error`` per sample.
    """
    hasher = _Hasher(memo)
    results: list[str | ReaderError] = []
    with ThreadPoolExecutor(threads) as pool:
        infos: list[dict[str, Any] | ReaderError] = list(
            pool.map(lambda args: _info(*args), zip(paths, sample_ids))
        )
        for path, sample_id, info in zip(paths, sample_ids, infos):
            if isinstance(info, ReaderError):
                results.append(info)
                continue
            fs, _ = url_to_fs(path)
            try:
                if info["type"] == "directory":
                    members = sorted(fs.find(info["name"], detail=True).values(), key=lambda m: m["name"])
                    if not members:
                        raise ReaderError("the folder is empty", sample_id=sample_id, path=path)
                    digests = hasher.files(fs, members, pool)
                    digest = hashlib.blake2b(digest_size=20)
                    for member, member_digest in zip(members, digests):
                        relative = member["name"][len(info["name"].rstrip("/")) + 1 :]
                        digest.update(f"{relative}\0{member_digest}\n".encode())
                    results.append("d" + digest.hexdigest())
                else:
                    results.append("f" + hasher.files(fs, [info], pool)[0])
            except ReaderError as err:
                results.append(err)
            except OSError as err:
                results.append(ReaderError(f"cannot read for fingerprinting: {err}", sample_id=sample_id, path=path))
    if memo:
        memo.store(hasher.new_rows)
    return results


def _info(path: str, sample_id: str) -> dict[str, Any] | ReaderError:
    try:
        fs, stripped = url_to_fs(path)
        return fs.info(stripped)
    except FileNotFoundError:
        return ReaderError("file not found", sample_id=sample_id, path=path)
    except OSError as err:
        return ReaderError(f"cannot stat: {err}", sample_id=sample_id, path=path)
