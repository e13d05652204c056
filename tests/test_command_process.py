"""The command line as a process of its own (``fmprobe.__main__``): its garbage collector."""

from __future__ import annotations

import json
import subprocess
import sys

# A command whose imports leave 400k long-lived objects, run through the entry point or called as a library would.
PROBE = """
import gc, json, sys
import fmprobe.__main__ as entry

full_passes = []
gc.callbacks.append(lambda phase, info: full_passes.append(1) if phase == "stop" and info["generation"] == 2 else 0)
kept = []

def command():
    kept.extend([i] for i in range(400_000))  # lists: always tracked by the collector

if sys.argv[1] == "entry":
    entry.app = command
    entry.main()
else:
    command()
print(json.dumps({"full_passes": len(full_passes), "frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}))
"""


def _probe(how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_command_walks_its_long_lived_objects_rarely_and_leaves_them_frozen_for_shutdown() -> None:
    library, command = _probe("library"), _probe("entry")
    # CPython's default: a full collection each time the heap grows by a quarter
    assert library["full_passes"] >= 3 and library["frozen"] == 0
    assert library["threshold"][2] == 10
    assert command["full_passes"] <= 1
    assert command["frozen"] >= 400_000  # shutdown does not walk them again
