"""`fmprobe` (the console script) and `python -m fmprobe`: the command line as a process of its own."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from fmprobe.cli import app

# gen-1 collections between two full ones (CPython: 10)
FULL_COLLECTION_EVERY = 100


@contextmanager
def command_collector() -> Iterator[None]:
    """The cyclic garbage collector set for one command's process.

    torch, transformers, scipy, pandas and matplotlib leave ~600k objects that live until the process ends, and a
    full collection walks them all (~0.25 s each here). With CPython's thresholds the imports set one off each
    time the heap grew by a quarter (the demo: 9 full passes, 2.2 s), and shutdown walked them once more (1.5 s).
    So a full pass is considered ten times less often (the young generations, where short-lived cycles are
    freed, keep their thresholds), and what is alive when the command ends is frozen, which shutdown skips.
    Only the process's entry point does this: a library caller's collector stays its own."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
    try:
        yield
    finally:
        gc.freeze()


def main() -> None:
    with command_collector():
        app()


if __name__ == "__main__":
    main()
