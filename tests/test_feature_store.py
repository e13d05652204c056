"""FeatureStore shards, FeatureSet reads, fingerprints and cache keys (no model involved)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from fmprobe.backbones.base import InputSpec
from fmprobe.config import parse_config
from fmprobe.errors import ConfigError, EncoderError
from fmprobe.features import fingerprint as fp_module
from fmprobe.features.claims import WorkClaims
from fmprobe.features.fingerprint import FingerprintMemo, fingerprint_paths
from fmprobe.features.keys import cache_key, check_cacheable, describe
from fmprobe.features.store import FeatureStore

D, NTOK = 8, 6
SPEC = InputSpec(kind="image", image_size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, patch_size=4)


def _description(store_tokens: bool = True) -> dict:
    return {"layers": ["-1", "2"], "features": {"store_tokens": store_tokens}}


def _batch(ids: list[str], with_cls: bool = True) -> dict[str, np.ndarray]:
    """Arrays whose values encode the sample number, so any misplaced row is visible."""
    nums = np.array([int(s[1:]) for s in ids], dtype=np.float32)
    arrays = {}
    for i in range(2):
        arrays[f"L{i}.mean"] = np.repeat(nums[:, None] + i, D, 1)
        if with_cls:
            arrays[f"L{i}.cls"] = -np.repeat(nums[:, None] + i, D, 1)
        arrays[f"L{i}.tokens"] = np.broadcast_to(nums[:, None, None] + i, (len(ids), NTOK, D)).astype(np.float16)
    return arrays


GRIDS = {"-1": (1, 2, 3), "2": (1, 2, 3)}


def _fill(store: FeatureStore, ids: list[str], shard_size: int, batch: int = 4, with_cls: bool = True) -> None:
    writer = store.writer(shard_size)
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        writer.add(chunk, [f"fp{s}" for s in chunk], _batch(chunk, with_cls), GRIDS)
    writer.flush()


def test_shards_bound_rows_and_gather_in_requested_order(tmp_path):
    store = FeatureStore(tmp_path / "k", _description())
    ids = [f"s{i}" for i in range(11)]
    _fill(store, ids, shard_size=3)
    shards = sorted(p.name for p in (tmp_path / "k").glob("shard-*"))
    assert shards == [f"shard-{i:06d}" for i in range(1, 5)]
    assert [len(store.scan().metas[s]["sample_ids"]) for s in shards] == [3, 3, 3, 2]

    order = ["s7", "s0", "s10", "s3"]
    fs = store.feature_set([(s, f"fp{s}") for s in order])
    assert fs.sample_ids == order
    mean = fs.pooled(-1, "mean")
    assert mean.dtype == np.float32 and mean.shape == (4, D)
    np.testing.assert_array_equal(mean[:, 0], [7, 0, 10, 3])
    np.testing.assert_array_equal(fs.pooled("2", "mean")[:, 0], [8, 1, 11, 4])
    both = fs.pooled(-1, "cls+mean")
    assert both.shape == (4, 2 * D)
    np.testing.assert_array_equal(both[:, :D], fs.pooled(-1, "cls"))
    np.testing.assert_array_equal(both[:, D:], mean)
    tokens = fs.tokens(-1)
    assert tokens.dtype == np.float16 and tokens.shape == (4, NTOK, D)
    np.testing.assert_array_equal(tokens[:, 3, 5], [7, 0, 10, 3])
    assert fs.grid(-1) == (1, 2, 3)
    sub = fs.subset(["s3", "s7"])
    np.testing.assert_array_equal(sub.pooled(-1)[:, 0], [3, 7])


def test_reads_are_memory_mapped(tmp_path):
    store = FeatureStore(tmp_path / "k", _description())
    _fill(store, [f"s{i}" for i in range(5)], shard_size=8)
    fs = store.feature_set([("s1", "fps1")])
    fs.tokens(-1)
    maps = list(fs._catalog.maps.values())
    assert maps and all(isinstance(m, np.memmap) for m in maps)


def test_unknown_layer_missing_cls_and_unstored_tokens_are_clear_errors(tmp_path):
    store = FeatureStore(tmp_path / "k", _description(store_tokens=False))
    _fill(store, ["s0", "s1"], shard_size=8, with_cls=False)
    fs = store.feature_set([("s0", "fps0"), ("s1", "fps1")])
    with pytest.raises(ConfigError, match="CLS"):
        fs.pooled(-1, "cls+mean")
    with pytest.raises(ConfigError, match="not extracted"):
        fs.pooled(5)
    with pytest.raises(ConfigError, match="store_tokens"):
        fs.tokens(-1)
    with pytest.raises(KeyError, match="s9"):
        fs.subset(["s9"])


def test_one_grid_per_layer(tmp_path):
    writer = FeatureStore(tmp_path / "k", _description()).writer(8)
    writer.add(["s0"], ["f"], _batch(["s0"]), GRIDS)
    with pytest.raises(EncoderError, match="temporal_pool"):
        writer.add(["s1"], ["f"], _batch(["s1"]), {"-1": (2, 2, 3), "2": (1, 2, 3)})


def test_skips_are_recorded_with_reasons(tmp_path):
    store = FeatureStore(tmp_path / "k", _description())
    writer = store.writer(8)
    writer.add(["s0"], ["fps0"], _batch(["s0"]), GRIDS)
    writer.skip("s1", "fps1", "cannot decode PNG")
    writer.flush()
    fs = FeatureStore(tmp_path / "k", _description()).feature_set([("s0", "fps0"), ("s1", "fps1")])
    assert fs.sample_ids == ["s0"]
    assert fs.skipped == [("s1", "cannot decode PNG")]
    assert fs.subset(["s1", "s0"]).skipped == [("s1", "cannot decode PNG")]


def test_partial_shard_of_a_dead_writer_is_discarded_but_a_live_one_is_kept(tmp_path):
    root = tmp_path / "k"
    store = FeatureStore(root, _description())
    _fill(store, ["s0", "s1"], shard_size=8)
    dead = root / "tmp-dead"
    dead.mkdir()
    (dead / "L0.mean.npy").write_bytes(b"truncated")
    live = root / "tmp-live"
    live.mkdir()
    with FileLock(f"{live}.lock"):
        FeatureStore(root, _description())
        assert not dead.exists()
        assert live.exists()
    FeatureStore(root, _description())
    assert not live.exists()
    assert [p.name for p in root.glob("shard-*")] == ["shard-000001"]


def test_concurrent_writers_get_distinct_shards(tmp_path):
    root = tmp_path / "k"
    FeatureStore(root, _description())
    errors = []

    def work(offset: int) -> None:
        try:
            _fill(FeatureStore(root, _description()), [f"s{offset + i}" for i in range(20)], shard_size=2, batch=3)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(100 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(list(root.glob("shard-*"))) == 40 and not list(root.glob("tmp-*"))
    keys = [(f"s{100 * i + j}", f"fps{100 * i + j}") for i in range(4) for j in range(20)]
    fs = FeatureStore(root, _description()).feature_set(keys)
    np.testing.assert_array_equal(fs.pooled(-1)[:, 0], [int(k[0][1:]) for k in keys])


def test_writer_commits_in_the_background_then_calls_back_and_raises_write_errors(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path / "k", _description())
    seen = []

    def shards_when_called(label):
        return lambda: seen.append((label, sorted(p.name for p in (tmp_path / "k").glob("shard-*"))))

    with store.writer(4) as writer:
        ids = [f"s{i}" for i in range(6)]
        writer.add(ids[:4], [f"fp{s}" for s in ids[:4]], _batch(ids[:4]), GRIDS)  # fills shard 1: handed over
        writer.after_commit(shards_when_called("first 4"))
        writer.add(ids[4:], [f"fp{s}" for s in ids[4:]], _batch(ids[4:]), GRIDS)  # buffered
        writer.after_commit(shards_when_called("all 6"))
        assert seen in ([], [("first 4", ["shard-000001"])])  # shard 2 is not written before the writer is left
    assert seen == [("first 4", ["shard-000001"]), ("all 6", ["shard-000001", "shard-000002"])]
    assert writer.committed == 6

    def broken(arrays, meta):
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_shard", broken)
    with pytest.raises(OSError, match="disk full"):
        with store.writer(2) as writer:
            writer.add(["s7"], ["fps7"], _batch(["s7"]), GRIDS)


# --- claims: extractions on one store split the work --------------------------------------------------


def _keys(n: int) -> list[tuple[str, str]]:
    return [(f"s{i}", f"fps{i}") for i in range(n)]


def test_claims_split_the_pending_samples_and_pass_over_stored_ones(tmp_path):
    root = tmp_path / "k"
    _fill(FeatureStore(root, _description()), ["s0", "s1"], shard_size=8)  # stored before
    a = WorkClaims(FeatureStore(root, _description()), _keys(10), batch_size=4)
    b = WorkClaims(FeatureStore(root, _description()), _keys(10), batch_size=4)  # another process (its own locks)
    first, second = a.take(), b.take()
    assert first.positions == [2, 3, 4, 5] and second.positions == [6, 7, 8, 9] and a.done_elsewhere == 2
    assert a.take() is None and a.waiting_on == [f"pid {os.getpid()} on {socket.gethostname()}"]  # b holds the rest
    _fill(FeatureStore(root, _description()), [f"s{i}" for i in second.positions], shard_size=8)
    b.release(second)
    assert a.take() is None and a.waiting_on == []  # all stored or its own: nothing to wait for
    a.release(first)
    assert not list((root / "claims").iterdir())


def test_a_dead_claimants_batch_is_taken_over_at_once(tmp_path):
    root = tmp_path / "k"
    dead = WorkClaims(FeatureStore(root, _description()), _keys(6), batch_size=4)
    batch = dead.take()
    alive = WorkClaims(FeatureStore(root, _description()), _keys(6), batch_size=4)
    assert alive.take().positions == [4, 5]  # passes over the live claim
    assert alive.take() is None and alive.waiting_on == [f"pid {os.getpid()} on {socket.gethostname()}"]
    batch.lock.release()  # what the operating system does when the claimant dies; its claim file stays
    assert alive.take().positions == [0, 1, 2, 3]  # the whole batch, as the dead process had it
    assert not (root / "claims" / f"{batch.name}.json").exists()


# --- fingerprints --------------------------------------------------------------------------------------


def _age(path: Path, seconds: float = 60) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_fingerprint_follows_content_not_path(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    c.write_bytes(b"other bytes")
    fa, fb, fc, missing = fingerprint_paths([str(a), str(b), str(c), str(tmp_path / "x.png")], ["a", "b", "c", "x"])
    assert fa == fb != fc
    assert "sample 'x'" in str(missing) and "x.png" in str(missing)


def test_folder_fingerprint_covers_member_names_and_contents(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:03d}.png").write_bytes(bytes([i]) * 10)
    before = fingerprint_paths([str(folder)], ["v"])[0]
    (folder / "001.png").write_bytes(b"\x07" * 10)
    changed = fingerprint_paths([str(folder)], ["v"])[0]
    (folder / "001.png").rename(folder / "009.png")
    renamed = fingerprint_paths([str(folder)], ["v"])[0]
    assert len({before, changed, renamed}) == 3


def test_memo_skips_rehashing_unchanged_settled_files(tmp_path, monkeypatch):
    calls = []
    real = fp_module._hash_file
    monkeypatch.setattr(fp_module, "_hash_file", lambda fs, path: calls.append(path) or real(fs, path))
    settled, fresh = tmp_path / "old.png", tmp_path / "new.png"
    settled.write_bytes(b"old")
    _age(settled)
    fresh.write_bytes(b"new")
    memo = FingerprintMemo(tmp_path / "cache")
    first = fingerprint_paths([str(settled), str(fresh)], ["o", "n"], memo)
    second = fingerprint_paths([str(settled), str(fresh)], ["o", "n"], memo)
    assert first == second
    assert calls.count(str(settled)) == 1  # memoised
    assert calls.count(str(fresh)) == 2  # racily clean: its stamp may not change with the next write
    settled.write_bytes(b"OLD")  # same size, new content
    _age(settled, 30)
    assert fingerprint_paths([str(settled)], ["o"], memo)[0] != first[0]


# --- cache keys --------------------------------------------------------------------------------------


def _exp(**data):
    task = {"type": "binary", "targets": ["y"]}
    return parse_config({"name": "e", "data": {"manifest": "m.csv", **data}, "task": task})


def _key(exp) -> str:
    return cache_key(describe(exp, "tiny", "abc", SPEC))


def test_key_covers_what_changes_arrays_and_nothing_else():
    base = _exp()
    same = _exp(num_workers=4)
    same.features.batch_size = 3
    same.features.shard_size = 7
    assert _key(base) == _key(same)
    frames = _exp(frames_per_clip=8)
    tokens = _exp()
    tokens.features.token_grid = [2, 2]
    layers = _exp()
    layers.model.layers = [-1, 4]
    assert len({_key(base), _key(frames), _key(tokens), _key(layers)}) == 4
    assert cache_key(describe(base, "tiny", "abd", SPEC)) != _key(base)
    other_spec = InputSpec(kind="image", image_size=(16, 16), mean=(0.4,) * 3, std=(0.5,) * 3, patch_size=4)
    assert cache_key(describe(base, "tiny", "abc", other_spec)) != _key(base)


def test_random_clips_cannot_be_cached():
    with pytest.raises(ConfigError, match="center or uniform"):
        check_cacheable(_exp(kind="video", clip_position="random"))
