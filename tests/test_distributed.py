"""Several processes give the numbers of one: work splitting and ordering (fast, in process), and real
2-process CPU runs (gloo) through `torchrun` and `accelerate launch` compared with 1-process runs (slow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from run_factories import base_config

from fmprobe import distributed
from fmprobe.adapt.data_parallel import DataParallel
from fmprobe.config import parse_config
from fmprobe.experiments import parallel
from fmprobe.evaluate.results import HeadRun, ProbeResults
from fmprobe.train.losses import SoftmaxFocalLoss

# --- fast: splitting, ordering, loss weights ------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_blocks_and_round_robin_partition_in_order(n, world):
    blocks = [list(distributed.block(n, r, world)) for r in range(world)]
    assert sum(blocks, []) == list(range(n))  # contiguous, earlier ranks first
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    dealt = [[f"item{i}" for i in distributed.round_robin(n, r, world)] for r in range(world)]
    assert distributed.interleave(dealt) == [f"item{i}" for i in range(n)]


def test_single_process_helpers_are_identities():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.broadcast_object("x") == "x" and distributed.all_gather_object(3) == [3]
    assert distributed.describe() == {}


def _members(world: int, seeds: list[int], folds: int, monkeypatch) -> tuple:
    """What each of ``world`` processes trains (as (fold, seed) runs of two heads, in train_heads order)."""
    exp = parse_config({"name": "x", "data": {"manifest": "m.csv"}, "task": {"type": "binary", "targets": ["y"]},
                        "train": {"seeds": seeds}})  # fmt: skip
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    parts = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        part = ProbeResults()
        for k in range(folds):
            share = parallel.fold_share(exp, k).train.seeds
            part.runs += [HeadRun(head=h, seed=s, best_epoch=1, best_val_score=0.0, stopped_early=False, curves=[],
                                  scores={}, thresholds=None, loss_info={}, trainable_params=0,
                                  fold=k if folds > 1 else None) for h in ("linear", "mlp") for s in share]  # fmt: skip
        parts.append(part)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: parts)
    return exp, parts


@pytest.mark.parametrize(("world", "seeds", "folds"), [(2, [0, 1, 2], 1), (3, [5, 7], 3), (2, [0], 1)])
def test_frozen_members_are_dealt_once_and_gathered_in_single_process_order(world, seeds, folds, monkeypatch):
    exp, parts = _members(world, seeds, folds, monkeypatch)
    counts = [len(p.runs) for p in parts]
    assert sum(counts) == 2 * len(seeds) * folds and max(counts) - min(counts) <= 2  # balanced, by (fold, seed)
    merged = parallel.gather_members(exp, ProbeResults())
    expected = [(k if folds > 1 else None, h, s) for k in range(folds) for h in ("linear", "mlp") for s in seeds]
    assert [(r.fold, r.head, r.seed) for r in merged.runs] == expected


@pytest.mark.parametrize("kind", ["weighted_ce", "focal", "bce"])
@pytest.mark.parametrize("world", [2, 3])
def test_shard_weights_rebuild_the_single_process_gradient(kind, world):
    """Sum over processes of weight x shard mean loss / world (DDP averages) == the group's single-process loss,
    for a weighted mean (class weights) too; a process with an empty shard runs a placeholder of weight 0."""
    torch.manual_seed(0)
    n, batches = 11, [[3, 0, 7, 9, 1], [4, 10, 2, 8, 6], [5]]  # the last batch is smaller than the world
    group_size = n
    if kind == "bce":
        loss, y = torch.nn.BCEWithLogitsLoss(), torch.randint(0, 2, (n, 1)).float()
        logits = torch.randn(n, 1)
    else:
        w = torch.tensor([0.5, 2.0, 1.3])
        loss = torch.nn.CrossEntropyLoss(weight=w) if kind == "weighted_ce" else SoftmaxFocalLoss(gamma=2.0, weight=w)
        y, logits = torch.randint(0, 3, (n,)), torch.randn(n, 3)
    task = "binary" if kind == "bce" else "multiclass"
    single = sum(loss(logits[b], y[b]) * len(b) / group_size for b in batches)
    total = torch.tensor(0.0)
    for r in range(world):
        dp = DataParallel(torch.nn.Linear(1, 1), loss, y, task, mix=False, device=torch.device("cpu"))
        dp.world, dp.rank = world, r
        for b in batches:
            idx = torch.tensor(dp.loads(b))
            assert len(idx) >= 1
            part = dp.take(b, idx, logits[idx], y[idx], group_size)
            assert (part.weight == 0) == (part.real == 0)
            total = total + loss(logits[part.idx], part.y) * part.weight / world
    torch.testing.assert_close(total, single, rtol=1e-6, atol=1e-7)


# --- slow: real 2-process runs on CPU (gloo) ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _launch(prefix: list[str], *args: str) -> str:
    out = subprocess.run([*prefix, "-m", "fmprobe", *args], env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout


def _torchrun(*args: str) -> str:
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port())]  # fmt: skip
    return _launch(prefix, *args)


def _one(*args: str) -> str:
    return _launch([sys.executable], *args)


def _config(folder: Path, tag: str, base: dict, **sections) -> Path:
    cfg = {**base, "runs_dir": str(folder / f"runs-{tag}"),
           "features": {**base["features"], "cache_dir": str(folder / f"cache-{tag}")}, **sections}  # fmt: skip
    path = folder / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(path: Path) -> Path:
    cfg = yaml.safe_load(path.read_text())
    (run_dir,) = (Path(cfg["runs_dir"]) / cfg["name"]).iterdir()
    return run_dir


def _metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("wall_seconds")
    metrics.pop("timing")  # the phases' wall times and the estimate
    return metrics


def _features(path: Path):
    from fmprobe.data.manifest import load_manifest
    from fmprobe.features.extract import run_extraction

    exp = parse_config(yaml.safe_load(path.read_text()))
    result = run_extraction(exp, load_manifest(exp.data, exp.task), progress=False)
    assert result.extracted == 0  # everything was in the cache
    return result.features


@pytest.mark.slow
def test_two_processes_extract_and_train_frozen_heads_exactly_as_one(tmp_path):
    base = base_config(tmp_path)
    base.update(heads=[{"type": "linear"}, {"type": "mlp", "hidden": 8}],
                train={**base["train"], "seeds": [0, 1, 2]})  # fmt: skip
    base["features"].update(batch_size=8, shard_size=16)
    one, two, acc = (_config(tmp_path, tag, base) for tag in ("one", "two", "acc"))
    _one("run", str(one), "--quiet")
    out = _torchrun("run", str(two), "--quiet")
    assert out.count("report: ") == 1  # the summary is printed by process 0 only

    # features: every process extracted whole batches of its own into one store; the bits are one process's
    a, b = _features(one), _features(two)
    assert a.sample_ids == b.sample_ids and len(a) == 72
    np.testing.assert_array_equal(a.pooled("-1", "cls+mean"), b.pooled("-1", "cls+mean"))
    np.testing.assert_array_equal(a.tokens("-1"), b.tokens("-1"))
    metas = [json.loads(m.read_text()) for m in b.store_dir.glob("shard-*/meta.json")]
    assert sorted(i for m in metas for i in m["sample_ids"]) == sorted(b.sample_ids)  # disjoint, complete

    # runs: identical metrics (wall time apart), predictions and curves; checkpoints of every member
    run_a, run_b = _run(one), _run(two)
    assert _metrics(run_a) == _metrics(run_b)
    pd.testing.assert_frame_equal(pd.read_parquet(run_a / "predictions.parquet"),
                                  pd.read_parquet(run_b / "predictions.parquet"))  # fmt: skip
    pd.testing.assert_frame_equal(pd.read_parquet(run_a / "curves.parquet"), pd.read_parquet(run_b / "curves.parquet"))
    assert len(list(run_b.glob("checkpoints/*/seed*/best.pt"))) == 6
    assert json.loads((run_b / "env.json").read_text())["distributed"] == {"world_size": 2, "backend": "gloo"}

    # `accelerate launch` runs the same code: `fmprobe extract` on 2 processes fills a cache with the same bits
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate is not installed")
    # on CPU, --multi_gpu is what starts N processes under torch's launcher (--cpu alone would start one)
    accelerate = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    out = _launch(accelerate, "extract", str(acc))
    assert "extracted: 72" in out and out.count("extracted:") == 1
    c = _features(acc)
    np.testing.assert_array_equal(a.tokens("-1"), c.tokens("-1"))


@pytest.mark.slow
def test_two_processes_train_lora_data_parallel_like_one(tmp_path):
    """DDP over shards of each global batch (16 = 8 + 8, and a last batch of 11 = 6 + 5) and sharded evaluation:
    the 2-process run follows the 1-process one up to float summation order."""
    base = base_config(tmp_path)
    sections = {"train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "seeds": [0]},
                "adapt": {"strategy": "lora", "lora": {"rank": 2}, "adapters": {"lr": 0.01}}}  # fmt: skip
    one, two = _config(tmp_path, "one", base, **sections), _config(tmp_path, "two", base, **sections)
    _one("run", str(one), "--quiet")
    _torchrun("run", str(two), "--quiet")
    run_a, run_b = _run(one), _run(two)
    pa, pb = pd.read_parquet(run_a / "predictions.parquet"), pd.read_parquet(run_b / "predictions.parquet")
    assert list(pa["sample_id"]) == list(pb["sample_id"])
    np.testing.assert_allclose(pb["p/y"], pa["p/y"], atol=1e-5)
    ca, cb = pd.read_parquet(run_a / "curves.parquet"), pd.read_parquet(run_b / "curves.parquet")
    np.testing.assert_allclose(cb[["train_loss", "val_loss", "val_auroc"]], ca[["train_loss", "val_loss", "val_auroc"]],
                               atol=1e-5)  # fmt: skip
    ma, mb = _metrics(run_a), _metrics(run_b)
    for split in ("train", "val", "test"):
        for metric, value in ma["heads"]["linear"]["splits"][split]["mean"].items():
            assert mb["heads"]["linear"]["splits"][split]["mean"][metric] == pytest.approx(value, abs=1e-5), metric
    assert (run_b / "checkpoints/linear/seed0/adapter").is_dir() and (run_b / "adaptation.json").exists()
