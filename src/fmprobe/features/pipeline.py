"""The parts of the overlapped extraction pipeline: read ahead in the background, and account for the time.

The encoder should never wait. While it runs on one batch, a background thread pulls the next batches out of the
DataLoader (which reads, decodes and preprocesses them there, or collects them from its worker processes), and
finished shards are written by the store's writer thread (store.ShardWriter). What is left on the encoder's
thread is the forward pass, the pooling of its outputs and the copy into the shard buffer; :class:`StageSeconds`
says how long each stage took, so a gap between extraction and a bare forward loop can be explained.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

from fmprobe.devices import one_torch_thread_here

T = TypeVar("T")
WARMUP_BATCHES = 2  # the first batches pay for start-up (workers, lazy initialisation): not in the throughput


class Prefetch(Generic[T]):
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead of the consumer.

    ``one_torch_thread``: the thread's own torch ops (decoding, preprocessing) run on one thread, so that they take
    one core's share from an encoder running on the CPU rather than start a second OpenMP team beside its own.
    Errors raised by ``source`` are raised by ``next`` in order. Use it as a context manager: leaving it stops the
    thread (after the item it is working on). ``wait_seconds`` is how long the consumer waited for items.
    """

    _END = object()

    def __init__(self, source: Iterator[T], depth: int = 2, *, one_torch_thread: bool = False):
        self._source = source
        self._one_torch_thread = one_torch_thread
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmprobe-prefetch", daemon=True)
        self.wait_seconds = 0.0

    def __enter__(self) -> Prefetch[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def __iter__(self) -> Prefetch[T]:
        return self

    def __next__(self) -> T:
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - start
        if item is self._END:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item  # type: ignore[return-value]

    def _run(self) -> None:
        if self._one_torch_thread:
            one_torch_thread_here()
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # handed to the consumer
            self._put(_Failure(err))

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless the consumer left; False if it did."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False


@dataclass
class _Failure:
    error: BaseException


@dataclass
class StageSeconds:
    """Where an extraction's time went, in seconds summed over its batches.

    ``read``, ``preprocess`` and ``write`` run beside the encoder (DataLoader workers or the prefetch thread; the
    shard-writer thread): they cost wall time only through ``input_wait`` and ``write_wait``, the encoder's own
    waits, and through the CPU they take from the forward pass. ``forward``, ``pooling`` and ``buffer`` (copying
    outputs into the shard buffer) run on the encoder's thread. On a GPU the forward pass is asynchronous, so its
    time partly shows up in ``pooling`` (where the outputs are copied back).
    """

    read: float = 0.0  # read + decode the media
    preprocess: float = 0.0  # intensities, resize, crop, normalise
    forward: float = 0.0
    pooling: float = 0.0  # mean / CLS / token pooling and the copy to host memory
    buffer: float = 0.0
    write: float = 0.0  # shard files written and committed
    input_wait: float = 0.0  # the encoder waiting for its next batch
    write_wait: float = 0.0  # the encoder waiting for a shard write (at most one shard is written at a time)

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in asdict(self).items()}


@dataclass
class ExtractionRate:
    """What :func:`~fmprobe.features.extract.run_extraction` reports after each batch (its ``on_batch``)."""

    done: int  # samples this process has encoded (or found unreadable)
    total: int  # samples this process set out to extract (other processes on the cache may take some)
    samples_per_second: float | None  # see Throughput


class Throughput:
    """Samples per second of the extraction loop after its first ``WARMUP_BATCHES`` batches, counting the time
    between consecutive batches (so waits for input and for writes count; time spent waiting for other
    processes between passes does not). None until a batch after the warm-up has finished."""

    def __init__(self, total: int, on_batch: Callable[[ExtractionRate], None] | None = None):
        self.total = total
        self.on_batch = on_batch
        self.done = 0
        self._batches = 0
        self._samples = 0
        self._seconds = 0.0
        self._last = time.perf_counter()

    def start_pass(self) -> None:
        """Start the clock for a pass over the loader (the time before it is not extraction)."""
        self._last = time.perf_counter()

    def batch(self, samples: int) -> None:
        now = time.perf_counter()
        self._batches += 1
        self.done += samples
        if self._batches > WARMUP_BATCHES:
            self._samples += samples
            self._seconds += now - self._last
        self._last = now
        if self.on_batch is not None:
            self.on_batch(ExtractionRate(self.done, self.total, self.samples_per_second))

    @property
    def samples_per_second(self) -> float | None:
        return self._samples / self._seconds if self._seconds > 0 else None
