"""Work shared with forked copies of the process (``fmprobe.forks``): results in order, errors as the loop
raises them, nothing left running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fmprobe.forks import fork_map


def _children() -> set[int]:
    """Processes whose parent is this one (forked workers not waited for would show here, as zombies)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            out.add(int(stat.parent.name))
    return out


def test_each_items_result_comes_back_in_order_from_the_processes_that_computed_them():
    before = _children()
    results = fork_map(lambda x: (x * x, os.getpid()), range(7), processes=3)
    assert [value for value, _ in results] == [x * x for x in range(7)]
    pids = [pid for _, pid in results]
    assert pids[0::3] == [os.getpid()] * 3  # round robin: this process takes items 0, 3, 6
    assert len(set(pids)) == 3 and os.getpid() not in pids[1::3] + pids[2::3]
    assert _children() == before


def test_an_error_in_a_child_is_raised_as_the_loop_would_raise_it_with_the_childs_traceback():
    def fail_on_odd(x: int) -> int:
        if x % 2:
            raise ValueError(f"item {x} is odd")
        return x

    before = _children()
    with pytest.raises(ValueError, match="item 1 is odd") as raised:  # the first failing item, from a child
        fork_map(fail_on_odd, range(6), processes=2)
    assert any("in a forked worker" in note and "fail_on_odd" in note for note in raised.value.__notes__)
    assert _children() == before


def test_a_child_that_dies_is_an_error_that_says_so():
    def die(x: int) -> int:
        if x == 1:
            os._exit(3)
        return x

    before = _children()
    with pytest.raises(RuntimeError, match=r"ended without its results \(exit code 3\)"):
        fork_map(die, range(2), processes=2)
    assert _children() == before


def test_a_result_that_cannot_travel_fails_its_item_alone():
    def result(x: int) -> object:
        return (lambda: x) if x == 3 else x

    # the child computes items 1 and 3: the error is item 3's, so item 1's result came back
    with pytest.raises(RuntimeError, match="item 3, computed in a forked worker, could not be sent back: Can't pickle"):
        fork_map(result, range(5), processes=2)


def test_a_fork_map_inside_one_computes_its_items_in_its_own_process():
    inner = fork_map(lambda x: (os.getpid(), fork_map(lambda y: os.getpid(), range(3))), range(2), processes=2)
    for pid, nested in inner:
        assert nested == [pid] * 3
    assert inner[0][0] != inner[1][0]


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_child_dies_with_its_parent(tmp_path):
    """A killed run must not be finished behind its back by its forked workers (a rerun would finish it twice)."""
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    script = (f"import os, time\nfrom fmprobe.forks import fork_map\n"
              f"def item(i):\n"
              f"    if i == 1:\n"
              f"        open({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
              f"        os.replace({str(pid_file)!r} + '.tmp', {str(pid_file)!r})\n"
              f"    time.sleep(60)\n"
              f"fork_map(item, range(2), processes=2)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not pid_file.exists():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.02)
    child = int(pid_file.read_text())
    assert _running(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _running(child)
