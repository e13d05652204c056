"""A feature store on an fsspec URL (``s3://``, ``gs://``, ``memory://``...): object stores have no rename.

Layout of ``<cache_url>/<key>/``::

    config.json              what the key covers (as in the local store)
    shards/<name>/L0.mean.npy ...   each object written whole, once, under its final unique name
    commits/<name>.json      written last: the shard's meta plus size and sha256 of each file

A shard exists only once its commit marker does, so a killed writer leaves objects nobody reads (deleted
by a later open once ``ORPHAN_SECONDS`` old). ``<name>`` is ``<writer's UTC ns clock>-<uuid4>``: unique
across machines and ordered by commit time; when two writers stored the same sample, the earliest commit
wins for every reader, so a sample read once never changes under a later commit.

Reads go through a local mirror, ``$FMPROBE_CACHE`` (default ``~/.cache/fmprobe``)
``/mirror/<hash of cache url>/<key>/``: commit markers (immutable) are copied once, and each shard file is
downloaded once into ``blobs/<sha256>.npy``, its size and sha256 checked against the marker, then
memory-mapped like a local shard (a mirrored file is re-downloaded if its size is wrong). The writer puts
what it uploads into the mirror, so its own shards are never downloaded again. The fingerprint memo and the
remembered encoder identities live in the mirror too (they describe this machine's files). The mirror
can be deleted at any time.

Across machines sharing one store: no writer overwrites or deletes another's committed shard, readers
never see a partial shard, and a corrupted object is refused by its checksum. Two machines that extract
the same sample both commit it; which copy is served is fixed (earliest commit). The key covers the
weights, model config, extraction points and preprocessing but not the torch build or hardware, so the
two copies are bitwise equal on identical software and hardware, and may differ in the last bits
otherwise (the served copy is still the same for everyone). Commit order follows the writers' clocks.

Concurrent extractions split the work through claims (features/claims.py) kept in the mirror, with local file
locks: processes on one machine never extract a sample twice, but an object store offers no lock, so processes on
different machines do not see each other's claims and may both extract a sample, with the outcome above (correct,
only duplicated work).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from filelock import FileLock
from fsspec.core import url_to_fs

from fmprobe.errors import FmprobeError
from fmprobe.features.store import FeatureStore, _Catalog

ORPHAN_SECONDS = 24 * 3600  # an uncommitted shard this old was left by a killed writer
_CHUNK = 8 << 20


def is_remote(cache_dir: str) -> bool:
    return "://" in cache_dir


def _fmprobe_cache() -> Path:
    return Path(os.environ.get("FMPROBE_CACHE") or "~/.cache/fmprobe").expanduser()


def local_cache_dir(cache_dir: str) -> Path:
    """Where this machine keeps the cache's local state: the cache itself, or the mirror of a remote one."""
    if not is_remote(cache_dir):
        return Path(cache_dir).expanduser()
    url = cache_dir.rstrip("/")
    return _fmprobe_cache() / "mirror" / hashlib.sha256(url.encode()).hexdigest()[:16]


def open_store(cache_dir: str, key: str, description: dict[str, Any]) -> FeatureStore:
    """The store of ``key`` under ``features.cache_dir``, local or remote."""
    if is_remote(cache_dir):
        return RemoteFeatureStore(f"{cache_dir.rstrip('/')}/{key}", description, local_cache_dir(cache_dir) / key)
    return FeatureStore(Path(cache_dir).expanduser() / key, description)


class RemoteFeatureStore(FeatureStore):
    """One cache entry on an fsspec URL; reads memory-map a verified local mirror of each shard file."""

    def __init__(self, url: str, description: dict[str, Any], mirror: Path):
        self.root = url
        self.fs, self._path = url_to_fs(url)
        self.mirror = mirror
        self.description = description
        self.layers = list(description["layers"])
        self.store_tokens = bool(description["features"]["store_tokens"])
        for folder in ("commits", "blobs"):
            (mirror / folder).mkdir(parents=True, exist_ok=True)
        self.claims_dir = mirror / "claims"  # claims reach the processes of this machine only (see the module doc)
        self.claims_lock = FileLock(mirror / ".lock")
        config = f"{self._path}/config.json"
        if not self.fs.exists(config):  # identical content for a key: concurrent writers cannot disagree
            self.fs.pipe_file(config, json.dumps(description, indent=2).encode())
        self._discard_orphans()

    def _list(self, folder: str) -> list[str]:
        """Names in ``<store>/<folder>``, listed afresh (another machine may have committed meanwhile)."""
        path = f"{self._path}/{folder}"
        self.fs.invalidate_cache(path)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def _commit_names(self) -> list[str]:
        return [n[: -len(".json")] for n in self._list("commits") if n.endswith(".json")]

    def _discard_orphans(self) -> None:
        shards = self._list("shards")  # listed before the commits: a shard committed in between is not an orphan
        committed = set(self._commit_names())
        now_ns = time.time_ns()
        for name in shards:
            if name not in committed and now_ns - _name_ns(name) > ORPHAN_SECONDS * 1e9:
                try:
                    self.fs.rm(f"{self._path}/shards/{name}", recursive=True)
                except OSError:  # tidying only: a reader without delete rights still reads
                    pass

    def committed(self, skip: Container[str] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
        """Committed shards not named in ``skip``, in commit order; markers are fetched once (in one batch) into
        the mirror."""
        names = [n for n in self._commit_names() if n not in skip]
        local = self.mirror / "commits"
        missing = [n for n in names if not (local / f"{n}.json").is_file()]
        if missing:
            fetched = self.fs.cat([f"{self._path}/commits/{n}.json" for n in missing])
            for path, data in fetched.items():
                _write_local(local / path.rsplit("/", 1)[-1], data)
        for name in names:
            commit = json.loads((local / f"{name}.json").read_text())
            yield name, {**commit["meta"], "files": commit["files"]}

    def _catalog(self, metas: dict[str, dict[str, Any]]) -> _Catalog:
        return _MirroredCatalog(self, metas)

    def write_shard(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Upload each file under the shard's unique name, then the commit marker that makes it exist."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}"
        shard = f"{self._path}/shards/{name}"
        files: dict[str, dict[str, Any]] = {}
        staged: Path | None = None
        try:
            for file, array in arrays.items():
                staged = self.mirror / "blobs" / f".{uuid.uuid4().hex}.tmp"
                with open(staged, "wb") as f:
                    hashing = _Hashing(f)
                    np.save(hashing, array)
                self.fs.put_file(str(staged), f"{shard}/{file}.npy")
                digest = hashing.digest.hexdigest()
                os.replace(staged, self.mirror / "blobs" / f"{digest}.npy")
                staged = None
                files[file] = {"sha256": digest, "size": hashing.size}
            commit = json.dumps({"shard": name, "meta": meta, "files": files}).encode()
            self.fs.pipe_file(f"{self._path}/commits/{name}.json", commit)
        except BaseException:
            if staged is not None:
                staged.unlink(missing_ok=True)
            try:  # tidy up; if this fails too (or the process is killed), the objects are orphans nobody reads
                self.fs.rm(shard, recursive=True)
            except Exception:
                pass
            raise
        _write_local(self.mirror / "commits" / f"{name}.json", commit)

    def local_file(self, shard: str, file: str, entry: dict[str, Any]) -> Path:
        """The mirrored copy of one shard file, downloaded and checked against its marker if needed."""
        blob = self.mirror / "blobs" / f"{entry['sha256']}.npy"
        if blob.is_file() and blob.stat().st_size == entry["size"]:
            return blob
        url = f"{self.root}/shards/{shard}/{file}.npy"
        tmp = blob.with_name(f".{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open(f"{self._path}/shards/{shard}/{file}.npy", "rb") as src, open(tmp, "wb") as dst:
                hashing = _Hashing(dst)
                while chunk := src.read(_CHUNK):
                    hashing.write(chunk)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            raise FmprobeError(
                f"feature store {self.root}: shard {shard} is committed but its file {url} is missing (the store was "
                f"changed outside fmprobe); delete {self.root}/commits/{shard}.json and extract again"
            ) from None
        if (hashing.size, hashing.digest.hexdigest()) != (entry["size"], entry["sha256"]):
            tmp.unlink(missing_ok=True)
            raise FmprobeError(
                f"feature store {self.root}: {url} has {hashing.size} bytes and sha256 {hashing.digest.hexdigest()}, "
                f"but its commit marker says {entry['size']} bytes and {entry['sha256']}: the object is corrupted; "
                f"delete {self.root}/commits/{shard}.json and extract again"
            )
        os.replace(tmp, blob)
        return blob


class _MirroredCatalog(_Catalog):
    """A catalog whose files are fetched into the local mirror before they are memory-mapped."""

    def __init__(self, store: RemoteFeatureStore, metas: dict[str, dict[str, Any]]):
        super().__init__(store.root, store.layers, store.store_tokens, metas)
        self._store = store

    def path(self, shard: str, file: str) -> Path:
        return self._store.local_file(shard, file, self.metas[shard]["files"][file])


class _Hashing:
    """A write-only file wrapper that counts and hashes what passes through (np.save writes into it)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._f.write(data)


def _name_ns(name: str) -> int:
    """The commit clock a shard name starts with (now for a name fmprobe did not write: never deleted)."""
    stamp = name.split("-", 1)[0]
    return int(stamp) if stamp.isdigit() else time.time_ns()


def _write_local(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
