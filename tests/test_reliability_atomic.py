"""Atomic writes: a reader never sees a half-written artifact, and a write that fails leaves the old file.

Also an audit of the source: every call that writes a file goes through fmprobe.atomic, writes into a
temporary path that is renamed afterwards, or is listed below with the reason it is safe.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fmprobe.atomic import atomic_path, write_json
from fmprobe.experiments import probing
from fmprobe.features import store as store_module
from fmprobe.features.store import FeatureStore

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
    ("cli.py", "board.to_csv(csv)"): "Leaderboard.to_csv writes atomically",
    ("experiments/leaderboard.py", "def to_csv"): "a definition",
    ("experiments/segmenting.py", "np.savez_compressed(f"): "into an atomic_path temp file",
    ("features/remote.py", 'open(staged, "wb")'): "a .tmp staging file, os.replace'd once hashed",
    ("features/remote.py", "np.save(hashing, array)"): "into the same staging file",
    ("features/remote.py", "np.save writes into it"): "a docstring",
    ("standin/models.py", "model.save_pretrained(folder)"): "stand-in models, rebuilt by re-running the generator",
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
        probing.save_checkpoints(tmp_path / "linear" / "seed0", state, state)
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
