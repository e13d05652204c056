"""The feature cache on an fsspec URL, tested on fsspec's in-process memory:// filesystem.

Shards are objects under unique names made to exist by a commit marker written last; reads go through a
verified local mirror and are memory-mapped. A failed writer leaves nothing committed, a rerun extracts
exactly what is missing, and the features equal a local store's bit for bit.
"""

from __future__ import annotations

import json
import threading
import uuid

import fsspec
import numpy as np
import pandas as pd
import pytest
from run_factories import base_config

from fmprobe.config import parse_config
from fmprobe.data.manifest import load_manifest
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.features import remote
from fmprobe.features.claims import WorkClaims
from fmprobe.features.extract import run_extraction
from fmprobe.features.keys import check_cacheable
from fmprobe.features.remote import RemoteFeatureStore, local_cache_dir, open_store

MEM = fsspec.filesystem("memory")
DESCRIPTION = {"layers": ["-1"], "features": {"store_tokens": True}}


@pytest.fixture
def url():
    """A fresh memory:// folder, removed afterwards (memory:// is shared by the whole process)."""
    root = f"remote-cache-{uuid.uuid4().hex}"
    yield f"memory://{root}/cache"
    if MEM.exists(f"/{root}"):
        MEM.rm(f"/{root}", recursive=True)


@pytest.fixture(autouse=True)
def mirror_home(tmp_path, monkeypatch):
    """The local mirror under tmp_path; switching FMPROBE_CACHE later plays "another machine"."""
    monkeypatch.setenv("FMPROBE_CACHE", str(tmp_path / "machine-a"))
    return tmp_path


def _rows(ids: list[str]) -> dict[str, np.ndarray]:
    nums = np.array([int(s[1:]) for s in ids], dtype=np.float32)
    return {"L0.mean": np.repeat(nums[:, None], 4, 1),
            "L0.tokens": np.broadcast_to(nums[:, None, None], (len(ids), 3, 4)).astype(np.float16)}


def _fill(store, ids: list[str], shard_size: int = 3, tag: float = 0.0) -> None:
    writer = store.writer(shard_size)
    arrays = _rows(ids)
    arrays["L0.mean"] = arrays["L0.mean"] + tag  # tag tells apart two writers' copies of one sample
    writer.add(ids, [f"fp{s}" for s in ids], arrays, {"-1": (1, 1, 3)})
    writer.flush()


def _keys(ids):
    return [(s, f"fp{s}") for s in ids]


def _store_path(url: str, key: str = "k") -> str:
    return f"{url.removeprefix('memory://')}/{key}"


def test_shards_commit_by_marker_and_read_through_a_verified_mirror(url, mirror_home, monkeypatch):
    ids = [f"s{i}" for i in range(8)]
    store = open_store(url, "k", DESCRIPTION)
    assert isinstance(store, RemoteFeatureStore)
    _fill(store, ids)
    base = _store_path(url)
    commits = MEM.ls(f"{base}/commits", detail=False)
    shards = MEM.ls(f"{base}/shards", detail=False)
    assert len(commits) == len(shards) == 3
    assert json.loads(MEM.cat_file(f"{base}/config.json")) == DESCRIPTION
    marker = json.loads(MEM.cat_file(sorted(commits)[0]))
    assert marker["meta"]["sample_ids"] == ["s0", "s1", "s2"]
    assert marker["files"]["L0.mean"]["size"] == MEM.info(f"{shards[0]}/L0.mean.npy")["size"]

    # "another machine": an empty mirror downloads, verifies and memory-maps
    monkeypatch.setenv("FMPROBE_CACHE", str(mirror_home / "machine-b"))
    fs = open_store(url, "k", DESCRIPTION).feature_set(_keys(["s7", "s0", "s4"]))
    np.testing.assert_array_equal(fs.pooled(-1)[:, 0], [7, 0, 4])
    np.testing.assert_array_equal(fs.tokens(-1)[:, 2, 3], [7, 0, 4])
    assert all(isinstance(m, np.memmap) for m in fs._catalog.maps.values())
    blobs = list((local_cache_dir(url) / "k" / "blobs").glob("*.npy"))
    assert str(local_cache_dir(url)).startswith(str(mirror_home / "machine-b")) and len(blobs) == 6

    # a truncated mirror file is fetched again; a corrupted object is refused by its checksum
    blobs[0].write_bytes(b"short")
    again = open_store(url, "k", DESCRIPTION).feature_set(_keys(ids))
    np.testing.assert_array_equal(again.pooled(-1)[:, 0], np.arange(8))
    np.testing.assert_array_equal(again.tokens(-1)[:, 0, 0], np.arange(8))
    victim = f"{sorted(shards)[1]}/L0.mean.npy"
    data = bytearray(MEM.cat_file(victim))
    data[-1] ^= 0xFF
    MEM.pipe_file(victim, bytes(data))
    monkeypatch.setenv("FMPROBE_CACHE", str(mirror_home / "machine-c"))
    with pytest.raises(FmprobeError, match=r"corrupted.*delete .*commits/"):
        open_store(url, "k", DESCRIPTION).feature_set(_keys(["s4"])).pooled(-1)


def test_a_failed_writer_leaves_nothing_committed_and_old_orphans_go(url, monkeypatch):
    store = open_store(url, "k", DESCRIPTION)
    _fill(store, ["s0", "s1", "s2"])
    real_put = MEM.put_file
    calls = []

    def killed(lpath, rpath, **kwargs):  # the second file of the next shard never arrives
        calls.append(rpath)
        if len(calls) == 2:
            raise OSError("connection reset")
        return real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(MEM, "put_file", killed)
    monkeypatch.setattr(MEM, "rm", lambda *a, **k: (_ for _ in ()).throw(OSError("no tidy-up after a kill")))
    with pytest.raises(OSError, match="connection reset"):
        _fill(store, ["s3", "s4"])
    monkeypatch.undo()
    base = _store_path(url)
    assert len(MEM.ls(f"{base}/shards")) == 2 and len(MEM.ls(f"{base}/commits")) == 1  # an orphan
    reopened = open_store(url, "k", DESCRIPTION)
    index = reopened.scan()
    assert sorted(k[0] for k in index.rows) == ["s0", "s1", "s2"]
    assert len(MEM.ls(f"{base}/shards")) == 2  # young: its writer might still be uploading
    monkeypatch.setattr(remote, "ORPHAN_SECONDS", 0)
    open_store(url, "k", DESCRIPTION)
    assert len(MEM.ls(f"{base}/shards")) == 1  # the orphan is gone, the committed shard stays
    _fill(reopened, ["s3", "s4"])
    fs = open_store(url, "k", DESCRIPTION).feature_set(_keys(["s4", "s3", "s0"]))
    np.testing.assert_array_equal(fs.pooled(-1)[:, 0], [4, 3, 0])


def test_concurrent_writers_keep_every_shard_and_agree_on_duplicates(url):
    open_store(url, "k", DESCRIPTION)
    errors = []

    def work(tag: int) -> None:
        try:  # every writer stores s0..s5, marking its copy with its tag
            _fill(open_store(url, "k", DESCRIPTION), [f"s{i}" for i in range(6)] + [f"s{100 * tag + 10}"],
                  shard_size=2, tag=tag / 8)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(MEM.ls(f"{_store_path(url)}/commits")) == 4 * 4
    store = open_store(url, "k", DESCRIPTION)
    first = store.scan()
    served = store.feature_set(_keys(["s0", "s5", "s110", "s410"])).pooled(-1)[:, 0]
    np.testing.assert_array_equal(served[2:], [110.125, 410.5])
    assert served[0] in (0.125, 0.25, 0.375, 0.5)  # one writer's copy, whole
    # a duplicate is served from the earliest commit, whoever reads it
    earliest = min(n for n, m in first.metas.items() if "s0" in m["sample_ids"])
    assert first.rows[("s0", "fps0")] == (earliest, 0)
    later = open_store(url, "k", DESCRIPTION)
    _fill(later, ["s0"], tag=0.75)  # a newer copy never replaces the one already served
    assert later.scan().rows[("s0", "fps0")] == (earliest, 0)
    assert later.feature_set(_keys(["s0"])).pooled(-1)[0, 0] == served[0]


def test_claims_on_a_remote_store_reach_the_processes_of_one_machine_only(url, mirror_home, monkeypatch):
    keys = _keys([f"s{i}" for i in range(8)])
    here = WorkClaims(open_store(url, "k", DESCRIPTION), keys, batch_size=4)
    same_machine = WorkClaims(open_store(url, "k", DESCRIPTION), keys, batch_size=4)
    first = here.take()
    assert (first.positions, same_machine.take().positions) == ([0, 1, 2, 3], [4, 5, 6, 7])
    _fill(open_store(url, "k", DESCRIPTION), [k[0] for k in keys[:4]], shard_size=4)  # `here` commits its batch
    here.release(first)
    monkeypatch.setenv("FMPROBE_CACHE", str(mirror_home / "machine-b"))  # its claims live in another mirror
    other_machine = WorkClaims(open_store(url, "k", DESCRIPTION), keys, batch_size=4)
    assert other_machine.take().positions == [4, 5, 6, 7]  # committed work is seen, claims are not: duplicate work


def test_cache_url_needs_a_known_filesystem():
    task = {"type": "binary", "targets": ["y"]}
    exp = parse_config({"name": "e", "data": {"manifest": "m.csv"}, "task": task,
                        "features": {"cache_dir": "nosuchfs://bucket/cache"}})
    with pytest.raises(ConfigError, match="nosuchfs://bucket/cache.*cannot be opened"):
        check_cacheable(exp)
    exp.features.cache_dir = "memory://bucket/cache"
    check_cacheable(exp)


# --- extraction and a whole run with everything on memory:// ----------------------------------------


def _to_memory(cfg: dict, base: str) -> dict:
    """Copy the images and manifest of ``cfg`` under ``memory://<base>`` and point the config there."""
    df = pd.read_csv(cfg["data"]["manifest"])
    for row in df.itertuples():
        MEM.pipe_file(f"/{base}/img/{row.sample_id}.png", open(row.path, "rb").read())
    df["path"] = [f"img/{s}.png" for s in df["sample_id"]]
    with MEM.open(f"/{base}/manifest.csv", "w") as f:
        df.to_csv(f, index=False)
    cfg["data"]["manifest"] = f"memory://{base}/manifest.csv"
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny project, its manifest and media copied to memory://, a local reference extraction."""
    folder = tmp_path_factory.mktemp("remote-project")
    cfg = base_config(folder)
    cfg["features"].update({"shard_size": 16, "batch_size": 8})
    local = parse_config(cfg)
    reference = run_extraction(local, load_manifest(local.data, local.task), progress=False).features
    base = f"remote-project-{uuid.uuid4().hex}"
    yield {"cfg": _to_memory(cfg, base), "reference": reference}
    MEM.rm(f"/{base}", recursive=True)


def _remote_exp(tiny, url):
    cfg = json.loads(json.dumps(tiny["cfg"]))
    cfg["features"]["cache_dir"] = url
    return parse_config(cfg)


def _assert_same_features(features, reference):
    assert features.sample_ids == reference.sample_ids
    for name in ("mean", "cls"):
        np.testing.assert_array_equal(features.pooled(-1, name), reference.pooled(-1, name))
    np.testing.assert_array_equal(features.tokens(-1), reference.tokens(-1))


def test_extraction_into_memory_url_resumes_and_equals_the_local_store(tiny, url, mirror_home, monkeypatch):
    exp = _remote_exp(tiny, url)
    manifest = load_manifest(exp.data, exp.task)
    n = len(manifest.df)
    real_put = MEM.put_file
    calls = []

    def dies_in_shard_3(lpath, rpath, **kwargs):  # 3 files per shard: the 8th upload is shard 3's second file
        calls.append(rpath)
        if len(calls) >= 8:  # and nothing after it (the final flush's retry fails too)
            raise RuntimeError("writer killed")
        return real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(MEM, "put_file", dies_in_shard_3)
    with pytest.raises(RuntimeError, match="writer killed"):
        run_extraction(exp, manifest, progress=False)
    monkeypatch.setattr(MEM, "put_file", real_put)
    assert len(MEM.glob(f"{url.removeprefix('memory://')}/*/commits/*.json")) == 2  # shards 1 and 2

    resumed = run_extraction(exp, manifest, progress=False)
    assert (resumed.extracted, resumed.cached) == (n - 32, 32)  # nothing already committed was redone
    _assert_same_features(resumed.features, tiny["reference"])
    again = run_extraction(exp, manifest, progress=False)
    assert (again.extracted, again.cached) == (0, n)

    monkeypatch.setenv("FMPROBE_CACHE", str(mirror_home / "machine-b"))  # another machine, same store
    other = run_extraction(exp, manifest, progress=False)
    assert (other.extracted, other.cached) == (0, n)
    _assert_same_features(other.features, tiny["reference"])


def test_a_run_with_manifest_media_and_cache_on_memory_urls(tiny, url, tmp_path):
    from fmprobe.experiments.run import run_experiment

    exp = _remote_exp(tiny, url)
    exp.runs_dir = str(tmp_path / "runs")
    result = run_experiment(exp, progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert sum(metrics["split"]["sizes"].values()) == len(tiny["reference"].sample_ids)
    assert MEM.glob(f"{url.removeprefix('memory://')}/*/commits/*.json")
    assert (result.run_dir / "report.html").exists() and (result.run_dir / "predictions.parquet").exists()
