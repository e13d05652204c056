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


def test_a_result_that_cannot_travel_fails_its_item():
    with pytest.raises(RuntimeError, match="could not be sent back: Can't pickle local object"):
        fork_map(lambda x: (lambda: x), range(2), processes=2)


def test_a_fork_map_inside_one_computes_its_items_in_its_own_process():
    inner = fork_map(lambda x: (os.getpid(), fork_map(lambda y: os.getpid(), range(3))), range(2), processes=2)
    for pid, nested in inner:
        assert nested == [pid] * 3
    assert inner[0][0] != inner[1][0]
