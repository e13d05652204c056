"""Independent pieces of CPU work at the end of a run (a report's figures, a sweep's arms being finished) shared
with forked copies of this process, so that one core does not draw while the others idle.

A fork shares the parent's memory: inputs, imported modules and drawing state reach a child without pickling or
importing anything. Each child computes its share, sends the results back pickled and ends at once
(``os._exit``: no atexit handlers, none of the parent's buffers flushed twice). The results are the items' in
order, each computed by the same function on the same inputs as in this process, so forking changes no number.

Forks are made on Linux only, where fork is the native start and the libraries used after training (numpy,
scikit-learn, pandas/pyarrow, matplotlib) are fork-safe; elsewhere, in a child, or with one core, the items are
computed here, in order. A child uses one torch thread (forked OpenMP pools are not usable) and freezes its
collector: walking the parent's objects would copy every page they are on.
"""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
_nested = False  # in a child, or in the parent's own share: a fork_map inside runs its items here


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fork_map(fn: Callable[[T], R], items: Sequence[T], processes: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, the items dealt round-robin to this process and ``processes - 1``
    forked children (default: one process per core, at most one per item). An exception is raised as the loop
    would raise it: the first failing item's, with the child's traceback as a note; every child is waited for."""
    items = list(items)
    count = min(len(items), processes or cores())
    if count <= 1 or _nested or sys.platform != "linux":
        return [fn(item) for item in items]
    sys.stdout.flush()
    sys.stderr.flush()
    children: list[tuple[int, int]] = []
    parent = os.getpid()
    try:
        for k in range(1, count):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                _child(fn, items, k, count, write, parent)
            os.close(write)
            children.append((pid, read))
        outcomes = dict(_own_share(fn, items, count))
        while children:
            pid, read = children.pop(0)
            outcomes.update(_collect(pid, read))
    finally:
        for pid, read in children:  # interrupted: the other children are not waited for
            os.close(read)
            _end(pid)
    for i in range(len(items)):
        ok, value = outcomes[i]
        if not ok:
            raise value
    return [outcomes[i][1] for i in range(len(items))]


def _share(fn: Callable[[T], R], items: list[T], k: int, count: int) -> list[tuple[int, tuple[bool, object]]]:
    """Items k, k + count, ...: (index, (True, result)) or (index, (False, the exception))."""
    out: list[tuple[int, tuple[bool, object]]] = []
    for i in range(k, len(items), count):
        try:
            out.append((i, (True, fn(items[i]))))
        except Exception as err:
            out.append((i, (False, err)))
    return out


def _own_share(fn: Callable[[T], R], items: list[T], count: int) -> list[tuple[int, tuple[bool, object]]]:
    """The parent's share, nested fork_maps kept in this process (the cores are the children's)."""
    global _nested
    _nested = True
    try:
        return _share(fn, items, 0, count)
    finally:
        _nested = False


def _child(fn: Callable[[T], R], items: list[T], k: int, count: int, write: int, parent: int) -> None:
    """A child's whole life: its share, the results down the pipe, then ``os._exit``. It dies with its parent: a
    killed run or sweep must not be finished behind its back (a rerun would finish it twice)."""
    global _nested
    _nested = True
    status = 0
    try:
        _die_with(parent)
        gc.freeze()
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        outcomes = [_travelling(i, ok, value if ok else _portable(value)) for i, (ok, value) in
                    _share(fn, items, k, count)]  # fmt: skip
        with os.fdopen(write, "wb") as pipe:
            pipe.write(pickle.dumps(outcomes))
    except KeyboardInterrupt:  # the parent was interrupted too, and says so
        status = 130
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        os._exit(status)


def _travelling(i: int, ok: bool, value: object) -> tuple[int, tuple[bool, object]]:
    """An item's outcome as it can be sent to the parent: a result that cannot be pickled fails that item alone."""
    try:
        pickle.dumps(value)
    except Exception as err:
        return i, (False, RuntimeError(f"the result of item {i}, computed in a forked worker, could not be sent back: "
                                       f"{err}"))  # fmt: skip
    return i, (ok, value)


def _die_with(parent: int) -> None:
    """SIGKILL this process when its parent ends (Linux's PR_SET_PDEATHSIG); a parent already gone ends it now."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def _portable(err: BaseException) -> BaseException:
    """The exception as the parent can receive it (its own type when it pickles), noting the child's traceback."""
    note = "in a forked worker:\n" + "".join(traceback.format_exception(err)).rstrip()
    try:
        copy = pickle.loads(pickle.dumps(err))
    except Exception:
        copy = RuntimeError(f"{type(err).__name__}: {err}")
    copy.add_note(note)
    return copy


def _collect(pid: int, read: int) -> list[tuple[int, tuple[bool, object]]]:
    with os.fdopen(read, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not payload:
        raise RuntimeError(f"a forked worker (pid {pid}) ended without its results (exit code "
                           f"{os.waitstatus_to_exitcode(status)}); its output above says why")
    return pickle.loads(payload)


def _end(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
