"""Claims on pending work, so that processes extracting into one feature store split it instead of each doing all of it.

Two ``fmprobe extract`` (or a sweep and a run) on one cache need the same samples. Each process takes its work one
batch at a time: under the store's lock it passes over the samples already committed and those claimed by a live
process, and claims the next ones. A claim is ``claims/<name>.json`` (its sample keys, pid and host) plus
``claims/<name>.lock``, which its process holds until the shard holding those rows is committed. The operating
system releases that lock when the process dies, so a killed claimant's batches are taken over by the next process
that asks, at once: no timeout to wait out, and no live claim is ever taken from a slow process. A process that
finds nothing left to claim while others still hold samples it needs waits for them (:meth:`WorkClaims.take` says
whom it waits for).

A claim is one batch of the caller's order, so every batch holds the samples it would hold in one process and the
features are the same bits however the work is split; and batches are small, so processes finish close together.

Where claims reach: every process whose ``claims_dir`` is the same folder with working ``flock`` locks. For a local
store that is every process using the cache (the folder is inside the store). A remote store (features/remote.py)
keeps its claims in this machine's mirror: processes on one machine split the work, processes on different
machines do not coordinate and may extract a sample twice (both commits are correct; readers serve the earliest).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from filelock import FileLock, Timeout

from fmprobe.features.store import FeatureStore, SampleKey


@dataclass
class Claim:
    """One claimed batch: positions in the caller's key list, and the lock that keeps the claim alive."""

    name: str
    positions: list[int]
    lock: FileLock


class WorkClaims:
    """Hands out batches of ``keys`` (the samples a process needs, in its order) that nobody has stored or claimed."""

    def __init__(self, store: FeatureStore, keys: Sequence[SampleKey], batch_size: int):
        self.store = store
        self.keys = list(keys)
        self.batch_size = batch_size
        self.folder = store.claims_dir
        self.folder.mkdir(parents=True, exist_ok=True)
        self.waiting_on: list[str] = []  # who holds the samples still pending when take() found nothing to claim
        self.done_elsewhere = 0  # samples found stored by another process
        self._next = 0  # positions from here on were never looked at
        self._held_back: list[int] = []  # earlier positions that another process held when last looked at
        self._mine: dict[str, Claim] = {}
        self._done: set[SampleKey] = set()
        self._seen_shards: set[str] = set()

    def take(self) -> Claim | None:
        """Claim the next batch, or None when every needed sample is stored or claimed by a live process (then
        ``waiting_on`` names the processes holding the rest; empty when everything is stored)."""
        with self.store.claims_lock:
            for name, meta in self.store.committed(skip=self._seen_shards):
                self._seen_shards.add(name)
                self._done.update(zip(meta["sample_ids"], meta["fingerprints"]))
                self._done.update((sample_id, fp) for sample_id, fp, _ in meta["skipped"])
            held, holders = self._live_claims()
            positions: list[int] = []
            earlier, self._held_back = self._held_back, []

            def look_at(p: int) -> None:
                if self.keys[p] in self._done:
                    self.done_elsewhere += 1
                elif self.keys[p] in held:
                    self._held_back.append(p)
                else:
                    positions.append(p)

            for i, p in enumerate(earlier):  # in order: a batch taken over from a dead process comes back whole
                if len(positions) == self.batch_size:
                    self._held_back.extend(earlier[i:])
                    break
                look_at(p)
            while len(positions) < self.batch_size and self._next < len(self.keys):
                self._next += 1
                look_at(self._next - 1)
            self.waiting_on = sorted({holders[self.keys[p]] for p in self._held_back}) if not positions else []
            return self._claim(positions) if positions else None

    def release(self, claim: Claim) -> None:
        """Drop a claim (its rows are committed, or this process gives it up); idempotent."""
        with self.store.claims_lock:
            if self._mine.pop(claim.name, None) is None:
                return
            (self.folder / f"{claim.name}.json").unlink(missing_ok=True)
            claim.lock.release()
            (self.folder / f"{claim.name}.lock").unlink(missing_ok=True)

    def release_all(self) -> None:
        for claim in list(self._mine.values()):
            self.release(claim)

    def _claim(self, positions: list[int]) -> Claim:
        name = uuid.uuid4().hex
        lock = FileLock(self.folder / f"{name}.lock", thread_local=False)  # released by the shard-writer thread
        lock.acquire(timeout=0)  # a fresh name: nobody else holds it
        record = {"pid": os.getpid(), "host": socket.gethostname(), "keys": [list(self.keys[p]) for p in positions]}
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.folder / f"{name}.json")
        claim = self._mine[name] = Claim(name, positions, lock)
        return claim

    def _live_claims(self) -> tuple[set[SampleKey], dict[SampleKey, str]]:
        """Keys claimed by live holders other than this object, and who holds each; stale claims are removed."""
        held: set[SampleKey] = set()
        holders: dict[SampleKey, str] = {}
        for lock_path in self.folder.glob("*.lock"):
            name = lock_path.stem
            if name in self._mine:
                continue
            lock = FileLock(lock_path, thread_local=False)
            try:
                lock.acquire(timeout=0)
            except Timeout:  # its process holds it: alive (and its record is complete: both are made under the lock)
                record = json.loads((self.folder / f"{name}.json").read_text())
                who = f"pid {record['pid']} on {record['host']}"
                for sample_id, fingerprint in record["keys"]:
                    held.add((sample_id, fingerprint))
                    holders[sample_id, fingerprint] = who
                continue
            try:  # nobody holds it: its process died before committing those rows
                (self.folder / f"{name}.json").unlink(missing_ok=True)
                (self.folder / f".{name}.tmp").unlink(missing_ok=True)
            finally:
                lock.release()
                lock_path.unlink(missing_ok=True)
        return held, holders


class ClaimedBatches:
    """A DataLoader batch sampler over claims: the batch of ``first``, then, as the loader asks for more, the batch of
    each next claim, until nothing is left to claim.

    The loader may run ahead of the consumer (prefetching, worker processes); :meth:`claim_of_next` gives the
    consumer, in order, the claim of each batch it receives, so it releases each claim once its rows are committed.
    """

    def __init__(self, claims: WorkClaims, first: Claim):
        self.claims = claims
        self.first = first
        self._claims: queue.SimpleQueue[Claim] = queue.SimpleQueue()  # loader thread -> consumer

    def __iter__(self) -> Iterator[list[int]]:
        claim: Claim | None = self.first
        while claim is not None:
            self._claims.put(claim)
            yield claim.positions
            claim = self.claims.take()

    def claim_of_next(self) -> Claim:
        return self._claims.get_nowait()
