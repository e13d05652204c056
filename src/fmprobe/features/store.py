"""FeatureStore: one cache entry on disk, written in atomic shards, read through memory maps.

Layout of ``<cache_dir>/<key>/``::

    config.json            what the key covers (human-readable)
    shard-000001/          meta.json (sample ids + fingerprints in row order, grids, skipped samples)
                           L<i>.mean.npy [n, D] f32, L<i>.cls.npy [n, D] f32 (if the encoder has a CLS),
                           L<i>.tokens.npy [n, Ntok, D] f16 (if features.store_tokens); i indexes config layers
    tmp-<uuid>/ + .lock    a shard being written; renamed to shard-<n> when complete
    claims/                batches claimed by running extractions (features/claims.py)

A shard is written in a temp dir and renamed under the store lock, so readers never see half a shard and
two processes never take the same number. A temp dir whose lock nobody holds was left by a killed
process and is discarded on the next open. Rows are identified by (sample_id, content fingerprint);
when two processes extracted the same sample, the lowest shard wins (the arrays are identical).
A cache on an fsspec URL (s3://, gs://...) is a RemoteFeatureStore (features/remote.py): same reads and
writer, shards committed by marker objects instead of renames.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from filelock import FileLock, Timeout

from fmprobe.backbones.base import Grid
from fmprobe.errors import ConfigError, EncoderError, FmprobeError

SampleKey = tuple[str, str]  # (sample_id, content fingerprint)
Pooling = Literal["mean", "cls", "cls+mean"]


def _write_atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


class FeatureStore:
    """One cache entry. Opening it discards partial shards left by killed writers."""

    def __init__(self, root: str | Path, description: dict[str, Any]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.description = description
        self.layers: list[str] = list(description["layers"])
        self.store_tokens: bool = bool(description["features"]["store_tokens"])
        self._lock = FileLock(self.root / ".lock")
        self.claims_dir = self.root / "claims"
        self.claims_lock = self._lock  # claims are taken and dropped under the lock that numbers shards
        with self._lock:
            self._discard_partial()
            config = self.root / "config.json"
            if not config.exists():
                _write_atomic_json(config, description)

    def _discard_partial(self) -> None:
        for tmp in self.root.glob("tmp-*"):
            if tmp.suffix == ".lock":
                continue
            lock = FileLock(f"{tmp}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # a live writer owns it
            try:
                shutil.rmtree(tmp, ignore_errors=True)
            finally:
                lock.release()
                Path(f"{tmp}.lock").unlink(missing_ok=True)

    def _shards(self) -> list[Path]:
        return sorted(p for p in self.root.glob("shard-*") if p.is_dir())

    def commit(self, tmp: Path) -> Path:
        """Give a finished temp shard the next number (under the store lock) by an atomic rename."""
        with self._lock:
            shards = self._shards()
            number = int(shards[-1].name.split("-")[1]) + 1 if shards else 1
            final = self.root / f"shard-{number:06d}"
            os.rename(tmp, final)
        return final

    def committed(self, skip: Container[str] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
        """(shard name, meta) of every committed shard not named in ``skip``, in the order that decides duplicates
        (first wins)."""
        for shard in self._shards():
            if shard.name not in skip:
                yield shard.name, json.loads((shard / "meta.json").read_text())

    def scan(self) -> StoreIndex:
        """Read every shard's meta: where each sample's row is, and which samples were skipped."""
        index = StoreIndex()
        for name, meta in self.committed():
            index.metas[name] = meta
            for row, key in enumerate(zip(meta["sample_ids"], meta["fingerprints"])):
                index.rows.setdefault(key, (name, row))
            for sample_id, fingerprint, reason in meta["skipped"]:
                index.skipped.setdefault((sample_id, fingerprint), reason)
        return index

    def writer(self, shard_size: int) -> ShardWriter:
        return ShardWriter(self, shard_size)

    def feature_set(
        self, keys: Sequence[SampleKey], extra_skipped: dict[str, str] | None = None
    ) -> FeatureSet:
        """The features of ``keys`` in order. Samples recorded as skipped go to ``.skipped``; so do the
        ids in ``extra_skipped`` (samples that never reached the store, e.g. an unreadable path)."""
        index = self.scan()
        extra_skipped = extra_skipped or {}
        ids, locations, skipped = [], [], []
        for key in keys:
            if key[0] in extra_skipped:
                skipped.append((key[0], extra_skipped[key[0]]))
            elif key in index.rows:
                ids.append(key[0])
                locations.append(index.rows[key])
            elif key in index.skipped:
                skipped.append((key[0], index.skipped[key]))
            else:
                raise FmprobeError(f"sample '{key[0]}' is not in the feature store {self.root}; extract it first")
        return FeatureSet(self._catalog(index.metas), ids, locations, skipped)

    def _catalog(self, metas: dict[str, dict[str, Any]]) -> _Catalog:
        return _Catalog(self.root, self.layers, self.store_tokens, metas)

    def write_shard(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Write one shard in a locked temp dir, then commit it by an atomic rename."""
        name = f"tmp-{uuid.uuid4().hex}"
        tmp = self.root / name
        lock = FileLock(self.root / f"{name}.lock")
        lock.acquire()
        try:
            tmp.mkdir()
            for file, array in arrays.items():
                _save(tmp / f"{file}.npy", array)
            _write_atomic_json(tmp / "meta.json", meta)
            self.commit(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            lock.release()
            Path(f"{tmp}.lock").unlink(missing_ok=True)


@dataclass
class StoreIndex:
    rows: dict[SampleKey, tuple[str, int]] = field(default_factory=dict)
    skipped: dict[SampleKey, str] = field(default_factory=dict)
    metas: dict[str, dict[str, Any]] = field(default_factory=dict)


class ShardWriter:
    """Buffers at most ``shard_size`` samples, then writes them as one shard in a background thread while the
    caller goes on encoding. One shard is written while the next one fills, so memory stays bounded (two shards)
    and shards are committed in the order they were filled; :meth:`after_commit` tells when rows are stored. Use
    it as a context manager: leaving it writes what is buffered and waits for every write, also on errors (what
    was computed is kept)."""

    def __init__(self, store: FeatureStore, shard_size: int):
        self.store = store
        self.shard_size = shard_size
        self._buffers: dict[str, np.ndarray] = {}
        self._ids: list[str] = []
        self._fingerprints: list[str] = []
        self._skipped: list[tuple[str, str, str]] = []
        self._grids: dict[str, Grid | None] = {}
        self._callbacks: list[Callable[[], None]] = []  # to run once the buffered rows are committed
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fmprobe-shard-writer")
        self._writes: list[Future[None]] = []
        self.committed = 0  # rows committed (counted by the writer thread; read them after close)
        self.write_seconds = 0.0  # spent writing shards (in the background)
        self.wait_seconds = 0.0  # the caller blocked on a write still running (memory bound)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(
        self,
        sample_ids: Sequence[str],
        fingerprints: Sequence[str],
        arrays: dict[str, np.ndarray],
        grids: dict[str, Grid | None],
    ) -> None:
        """Append a batch. ``arrays`` maps file names (``L0.mean``...) to ``[b, ...]`` arrays; a grid-less point's
        grid is None (stored as null)."""
        grids = {layer: _as_grid(grid) for layer, grid in grids.items()}
        for layer, grid in grids.items():
            if self._grids.get(layer, grid) != grid:
                raise EncoderError(
                    f"layer {layer}: token grid {grid} differs from {self._grids[layer]} of earlier samples; "
                    "stored tokens need one grid: give every sample the same frames (data.frames_per_clip) "
                    "or set features.temporal_pool: true"
                )
        start, total = 0, len(sample_ids)
        while start < total:
            n = len(self._ids)
            take = min(self.shard_size - n, total - start)
            self._grids = dict(grids)
            for name, array in arrays.items():
                buffer = self._buffers.get(name)
                if buffer is None:
                    buffer = self._buffers[name] = np.empty((self.shard_size, *array.shape[1:]), array.dtype)
                buffer[n : n + take] = array[start : start + take]
            self._ids.extend(sample_ids[start : start + take])
            self._fingerprints.extend(fingerprints[start : start + take])
            start += take
            if len(self._ids) == self.shard_size:
                self.submit()

    def skip(self, sample_id: str, fingerprint: str, reason: str) -> None:
        self._skipped.append((sample_id, fingerprint, reason))

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the writer thread once every row added and every skip recorded so far is committed,
        or failed to be (the error is raised by the next :meth:`submit`, :meth:`flush` or :meth:`close`)."""
        if self._ids or self._skipped:
            self._callbacks.append(callback)
        else:  # all of it was handed to the writer already: run after those writes
            self._writes.append(self._thread.submit(callback))

    def submit(self) -> None:
        """Hand what is buffered (if anything) to the background writer, without waiting for it."""
        n = len(self._ids)
        if n == 0 and not self._skipped:
            return
        meta = {
            "sample_ids": self._ids,
            "fingerprints": self._fingerprints,
            "grids": {layer: None if grid is None else list(grid) for layer, grid in self._grids.items()} if n else {},
            "cls": any(file.endswith(".cls") for file in self._buffers),
            "skipped": [list(s) for s in self._skipped],
        }
        arrays = {file: buffer[:n] for file, buffer in self._buffers.items()} if n else {}
        self._wait()  # the previous shard is written before this one: two buffers at most
        self._writes.append(self._thread.submit(self._write, arrays, meta, self._callbacks))
        self._buffers = {}  # the write owns these now
        self._ids, self._fingerprints, self._skipped, self._grids, self._callbacks = [], [], [], {}, []

    def flush(self) -> None:
        """Write what is buffered and wait until every shard is committed."""
        self.submit()
        self._wait()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._thread.shutdown(wait=True)

    def _write(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], callbacks: list[Callable[[], None]]) -> None:
        start = time.perf_counter()
        try:
            self.store.write_shard(arrays, meta)
            self.committed += len(meta["sample_ids"])
        finally:
            self.write_seconds += time.perf_counter() - start
            for callback in callbacks:
                callback()

    def _wait(self) -> None:
        """Wait for every submitted task; raise the first error."""
        start = time.perf_counter()
        try:
            while self._writes:
                self._writes.pop(0).result()
        finally:
            self.wait_seconds += time.perf_counter() - start


@dataclass
class _Catalog:
    """Shard metadata plus lazily opened memory maps, shared by a FeatureSet and its subsets."""

    root: Path | str  # a URL for a remote store (features/remote.py)
    layers: list[str]
    store_tokens: bool
    metas: dict[str, dict[str, Any]]
    maps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def path(self, shard: str, file: str) -> Path:
        """The local file to memory-map (a remote store's catalog fetches it into its mirror first)."""
        return self.root / shard / f"{file}.npy"

    def array(self, shard: str, file: str) -> np.ndarray:
        if (shard, file) not in self.maps:
            self.maps[shard, file] = np.load(self.path(shard, file), mmap_mode="r")
        return self.maps[shard, file]

    def layer_index(self, layer: int | str) -> int:
        try:
            return self.layers.index(str(layer))
        except ValueError:
            raise ConfigError(
                f"layer {layer!r} was not extracted (extracted: {self.layers}); add it to model.layers"
            ) from None


class FeatureSet:
    """Features of an ordered list of samples; rows are gathered from memory-mapped shards on demand."""

    def __init__(
        self,
        catalog: _Catalog,
        sample_ids: list[str],
        locations: list[tuple[str, int]],
        skipped: list[tuple[str, str]],
    ):
        self._catalog = catalog
        self.sample_ids = sample_ids
        self.skipped = skipped
        self._locations = locations
        self._shards = sorted({shard for shard, _ in locations})

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def store_dir(self) -> Path | str:
        return self._catalog.root

    @property
    def layers(self) -> list[str]:
        return list(self._catalog.layers)

    def _gather(self, file: str) -> np.ndarray:
        shards = np.array([shard for shard, _ in self._locations])
        rows = np.array([row for _, row in self._locations], dtype=np.int64)
        first = self._catalog.array(self._shards[0], file) if self._shards else None
        if first is None:
            return np.empty((0, 0), np.float32)
        out = np.empty((len(rows), *first.shape[1:]), first.dtype)
        for shard in self._shards:
            mask = shards == shard
            out[mask] = self._catalog.array(shard, file)[rows[mask]]
        return out

    def pooled(self, layer: int | str, pooling: Pooling = "mean") -> np.ndarray:
        """``[N, D]`` float32 (``[N, 2D]`` for cls+mean: the CLS token, then the patch-token mean)."""
        index = self._catalog.layer_index(layer)
        if pooling not in ("mean", "cls", "cls+mean"):
            raise ConfigError(f"pooling must be one of mean, cls, cls+mean for stored features, got {pooling!r}")
        if pooling != "mean" and not all(self._catalog.metas[s]["cls"] for s in self._shards):
            raise ConfigError(
                f"pooling {pooling!r} needs a CLS token, but this encoder has none; use pooling: mean "
                "(or an attentive head on tokens)"
            )
        mean = self._gather(f"L{index}.mean") if pooling != "cls" else None
        cls = self._gather(f"L{index}.cls") if pooling != "mean" else None
        if pooling == "mean":
            return mean
        if pooling == "cls":
            return cls
        return np.concatenate([cls, mean], axis=1)

    def tokens(self, layer: int | str) -> np.ndarray:
        """``[N, Ntok, D]`` float16 patch tokens in raster order (t, h, w), prefix tokens excluded."""
        index = self._catalog.layer_index(layer)
        if not self._catalog.store_tokens:
            raise ConfigError("tokens were not stored (features.store_tokens: false); set it to true and extract again")
        self.grid(layer)  # one grid for all rows, or a clear error
        return self._gather(f"L{index}.tokens")

    def grid(self, layer: int | str) -> Grid | None:
        """(t, h, w) of the stored tokens (of the encoder's tokens if tokens are not stored); None for a point whose
        tokens have no spatial grid (ask ``backbones.base.spatial_grid`` where positions are needed)."""
        self._catalog.layer_index(layer)
        key = str(layer)
        shards = self._shards or [s for s, m in self._catalog.metas.items() if m["grids"]][:1]
        if not shards:
            raise FmprobeError(f"no sample has features in {self._catalog.root}; nothing to take a grid from")
        grids = {_as_grid(self._catalog.metas[s]["grids"][key]) for s in shards}
        if len(grids) != 1:
            raise EncoderError(
                f"layer {key}: samples have different token grids {sorted(grids, key=str)}; cannot stack tokens")
        return grids.pop()

    def subset(self, sample_ids: Sequence[str]) -> FeatureSet:
        """The rows of ``sample_ids`` in that order; requested ids that were skipped stay in ``.skipped``."""
        position = {sid: i for i, sid in enumerate(self.sample_ids)}
        reasons = dict(self.skipped)
        ids, locations, skipped = [], [], []
        for sid in sample_ids:
            if sid in position:
                ids.append(sid)
                locations.append(self._locations[position[sid]])
            elif sid in reasons:
                skipped.append((sid, reasons[sid]))
            else:
                raise KeyError(f"sample '{sid}' is not in this feature set")
        return FeatureSet(self._catalog, ids, locations, skipped)


def _as_grid(grid: Sequence[int] | None) -> Grid | None:
    return None if grid is None else (int(grid[0]), int(grid[1]), int(grid[2]))
