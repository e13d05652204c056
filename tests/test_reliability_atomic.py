"""Atomic writes: a reader never sees a half-written artifact, and a write that fails leaves the old file.

Also an audit of the source: every call that writes a file goes through fmprobe.atomic, writes into a
temporary path that is renamed afterwards, or is listed below with the reason it is safe.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fmprobe.atomic import atomic_dir, atomic_path, write_json, write_text
from fmprobe.config import parse_config
from fmprobe.diagnostics import plots
from fmprobe.probes import frozen
from fmprobe.features import store as store_module
from fmprobe.features.store import FeatureStore
from fmprobe.experiments.run import run_experiment

SRC = Path(__file__).parents[1] / "src" / "fmprobe"
WRITES = re.compile(r"open\([^)]*['\"](w|wb|a|ab|w\+)['\"]|\.to_parquet\(|\.to_csv\(|np\.save|torch\.save\(|"
                    r"json\.dump\(|\.write_text\(|\.write_bytes\(|\.savefig\(|save_pretrained\(|\.save\(")
# (file, text on the line): why the write is safe without fmprobe.atomic
SAFE = {
    ("atomic.py", "tmp.write_text"): "the atomic writer itself",
    ("features/store.py", 'open(path, "wb")'): "writes into a tmp-<uuid> shard folder renamed when complete",
    ("features/store.py", "np.save(f, array)"): "inside _save, the same temp shard folder",
    ("features/store.py", "tmp.write_text"): "temp file + os.replace",
    ("features/keys.py", "tmp.write_text"): "temp file + os.replace",
    ("backbones/offline.py", "save_pretrained(out)"): "converted into a temp folder renamed into place once verified",
    ("backbones/offline.py", '(out / "conversion.json")'): "same temp folder",
    ("backbones/vjepa2_native.py", "torch.save({{"): "text of a hint printed to the user",
    ("backbones/registry.py", "re-save the model with save_pretrained"): "text of an error message",
    ("adapt/lora.py", "save_pretrained(tmp)"): "temp folder renamed into place",
    ("demo/dataset.py", "img.save("): "the manifest, written last and atomically, marks a complete dataset",
    ("diagnostics/shapes.py", "np.savez_compressed("): "the manifest, written last and atomically, marks a complete "
                                                       "dataset",
    ("diagnostics/shapes.py", "_save_png("): "the manifest, written last and atomically, marks a complete dataset",
    ("diagnostics/shapes.py", ").save(path)"): "the manifest, written last and atomically, marks a complete dataset",
    ("report/plots.py", "savefig(buf"): "into memory",
    ("forks.py", "os.fdopen(write, \"wb\")"): "a pipe to the parent process, not a file",
    ("cli.py", "board.to_csv(csv)"): "Leaderboard.to_csv writes atomically",
    ("experiments/leaderboard.py", "def to_csv"): "a definition",
    ("experiments/run.py", "np.savez_compressed(f"): "into an atomic_path temp file",
    ("features/remote.py", 'open(staged, "wb")'): "a .tmp staging file, os.replace'd once hashed",
    ("features/remote.py", "np.save(hashing, array)"): "into the same staging file",
    ("features/remote.py", "np.save writes into it"): "a docstring",
    ("standin/models.py", "model.save_pretrained(folder)"): "stand-in models, rebuilt by re-running the generator",
    ("standin/models.py", "fast.save_pretrained(folder)"): "stand-in tokenizers, rebuilt by re-running the generator",
}


def test_every_file_write_in_the_source_is_atomic_or_listed():
    unsafe = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not WRITES.search(line) or line.lstrip().startswith("#"):
                continue
            if "tmp" in line or any(rel == f and text in line for f, text in SAFE):
                continue
            unsafe.append(f"{rel}:{number}: {line.strip()}")
    assert not unsafe, ("write through fmprobe.atomic (write_text, write_json, atomic_path) or list the line in "
                        "SAFE with the reason:\n" + "\n".join(unsafe))


def test_a_concurrent_reader_never_sees_a_half_written_json(tmp_path):
    dest = tmp_path / "metrics.json"
    payloads = [{"v": [i] * 20_000} for i in range(2)]
    write_json(dest, payloads[0])
    stop = threading.Event()
    seen, bad = set(), []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(json.loads(dest.read_text())["v"][0])
            except ValueError as err:  # a torn file
                bad.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(40):
        write_json(dest, payloads[i % 2])
    stop.set()
    reader.join()
    assert not bad and seen and seen <= {0, 1}


def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path):
    dest = tmp_path / "predictions.parquet"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half of the new fi")
            raise RuntimeError("disk full")
    assert dest.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [dest]


def test_a_checkpoint_that_fails_mid_write_is_never_visible(tmp_path, monkeypatch):
    def torn_save(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("killed mid-write")

    monkeypatch.setattr(torch, "save", torn_save)
    state = {"w": torch.ones(3)}
    with pytest.raises(OSError):
        frozen.save_checkpoints(tmp_path / "linear" / "seed0", state, state)
    assert not list((tmp_path / "linear" / "seed0").iterdir())


def test_a_shard_that_fails_mid_write_is_never_visible(tmp_path, monkeypatch):
    description = {"layers": ["-1"], "features": {"store_tokens": False}}
    store = FeatureStore(tmp_path, description)

    def write(ids: list[str]) -> None:
        with store.writer(len(ids)) as writer:  # shards are written in the background: leaving it waits for them
            writer.add(ids, ["fp"] * len(ids), {"L0.mean": np.ones((len(ids), 4), np.float32),
                                                 "L0.cls": np.zeros((len(ids), 4), np.float32)}, {"-1": (1, 2, 2)})

    write(["a", "b"])
    real_save, calls = store_module._save, []

    def torn_save(path, array):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"\x93NUMPY half")
            raise OSError("killed mid-write")
        real_save(path, array)

    monkeypatch.setattr(store_module, "_save", torn_save)
    with pytest.raises(OSError):
        write(["c", "d"])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["config.json", "shard-000001"]
    index = FeatureStore(tmp_path, description).scan()
    assert sorted(index.rows) == [("a", "fp"), ("b", "fp")]


# ------------------------------------------------------------------------------------------ file modes


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_folders_get_the_mode_the_umask_gives(tmp_path, umask):
    """mkstemp / mkdtemp would make them 0600 / 0700 whatever the umask (the rename keeps the mode)."""
    write_text(tmp_path / "config.resolved.yaml", "name: x\n")
    write_json(tmp_path / "metrics.json", {"a": 1})
    with atomic_path(tmp_path / "predictions.parquet") as tmp:
        pd.DataFrame({"p": [0.5]}).to_parquet(tmp)
    plots.bars(["linear_cka"], [0.5], title="t", dest=tmp_path / "attention" / "map.png")
    with atomic_dir(tmp_path / "adapter") as folder:
        (folder / "adapter_model.safetensors").write_bytes(b"w")
    for name in ("config.resolved.yaml", "metrics.json", "predictions.parquet", "attention/map.png"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert _mode(tmp_path / "adapter") == 0o777 & ~umask
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_atomic_dir_replaces_an_older_folder_and_leaves_it_on_error(tmp_path):
    dest = tmp_path / "adapter"
    with atomic_dir(dest) as folder:
        (folder / "old").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as folder:
            (folder / "half").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and (dest / "old").exists()
    with atomic_dir(dest) as folder:
        (folder / "new").write_text("3")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]


def test_every_file_of_a_run_follows_the_umask(toy_study, umask):
    exp = parse_config(toy_study("binary", n=36, train={"epochs": 2, "seeds": [0]}, eval={"bootstrap": 20}))
    run_dir = run_experiment(exp, progress=False).run_dir
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"metrics.json", "report.html", "predictions.parquet", "config.resolved.yaml", "env.json",
            "best.pt"} <= {p.name for p in files}
    wrong = {str(p.relative_to(run_dir)): oct(_mode(p)) for p in files if _mode(p) != 0o666 & ~umask}
    wrong |= {str(p.relative_to(run_dir)): oct(_mode(p)) for p in [run_dir, *run_dir.rglob("*")]
              if p.is_dir() and _mode(p) != 0o777 & ~umask}
    assert not wrong


def test_no_source_file_creates_temporaries_through_mkstemp_or_mkdtemp():
    """They create owner-only files; fmprobe.atomic creates temporaries that follow the umask."""
    found = [f"{p.relative_to(SRC)}:{n}" for p in sorted(SRC.rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"(mkstemp|mkdtemp|NamedTemporaryFile|TemporaryDirectory)\(", line)]
    assert not found, found
