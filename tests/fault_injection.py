"""Fault-injection harness: run fmprobe CLI commands as real processes, SIGKILL them at chosen moments.

Victims are forked from a multiprocessing *forkserver* that has already imported torch, transformers and
fmprobe, so a kill point costs a fork instead of a ~10 s import; each victim is still a separate process
that runs the real CLI (``fmprobe.cli.app([...])``) and dies by SIGKILL from outside, exactly as a user's
``kill -9`` or an OOM killer would do it. ``cli_subprocess`` runs the installed ``fmprobe`` script instead,
import and all, at full speed.

A project is ~40 tiny PNGs, a manifest with given splits, a random tiny Dinov2 saved with
``save_pretrained`` and a YAML config; features go to ``<dir>/cache``, runs to ``<dir>/runs``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fmprobe.experiments.twins import TWIN_FLAGS

N_IMAGES = 40
SHARD_SIZE = 4
BATCH_SIZE = 2  # divides SHARD_SIZE: a resumed extraction sees the same batches as an uninterrupted one

_PRELOAD = ["fmprobe.cli", "fmprobe.features.extract", "fmprobe.experiments.run", "fmprobe.backbones.registry",
            "transformers.models.dinov2.modeling_dinov2", "fault_injection"]
_context = None


# --- a tiny project ------------------------------------------------------------------------------------

def save_tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    from run_factories import write_model  # the same tiny Dinov2 the sweep tests use

    return write_model(folder, seed)


def write_project(root: Path, model_dir: Path, n: int = N_IMAGES, **config: dict) -> Path:
    """PNGs + manifest.csv + exp.yaml under ``root``; ``config`` updates top-level config sections."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = images / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
        split = "train" if i < int(n * 0.6) else "val" if i < int(n * 0.8) else "test"
        rows.append({"sample_id": f"s{i:03d}", "path": f"images/{path.name}", "y": i % 2, "split": split})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    exp = {
        "name": "fi",
        "data": {"manifest": "manifest.csv", "group_column": None},
        "task": {"type": "binary", "targets": ["y"]},
        "model": {"name": str(model_dir)},
        "features": {"cache_dir": "cache", "batch_size": BATCH_SIZE, "shard_size": SHARD_SIZE},
        "heads": [{"type": "linear"}, {"type": "mlp", "hidden": 8}],
        "train": {"epochs": 3, "batch_size": 8, "seeds": [0, 1]},
        "eval": {"bootstrap": 200},
        "runs_dir": "runs",
    }
    for section, values in config.items():
        exp[section] = {**exp[section], **values} if isinstance(values, dict) else values
    import yaml

    (root / "exp.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    return root / "exp.yaml"


# --- victims ----------------------------------------------------------------------------------------------

def _victim(argv: list[str], out: str, batch_delay: float, save_delay: float) -> None:
    """Body of a forked victim: the real CLI, optionally slowed so kill points can be hit precisely."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)  # the same arithmetic in every victim, resume and reference
    import fmprobe.features.extract as extract
    import fmprobe.features.store as store

    if batch_delay:
        real_encode = extract.encode_batch

        def slow_encode(*a, **k):
            time.sleep(batch_delay)
            return real_encode(*a, **k)

        extract.encode_batch = slow_encode
    if save_delay:
        real_save = store._save

        def slow_save(path, array):
            time.sleep(save_delay)
            real_save(path, array)

        store._save = slow_save
    from fmprobe.cli import app

    code = 0
    try:
        app(argv, prog_name="fmprobe")
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _ctx() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        tests = str(Path(__file__).parent)
        if tests not in sys.path:
            sys.path.insert(0, tests)
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


@dataclass
class Outcome:
    killed: bool
    exitcode: int | None
    output: str
    seconds: float


def run_cli(argv: list[str], out: Path, *, kill_when: Callable[[float], bool] | None = None,
            batch_delay: float = 0.0, save_delay: float = 0.0, timeout: float = 300) -> Outcome:
    """Run ``fmprobe <argv>`` in a forked process; SIGKILL it the first time ``kill_when(elapsed)`` is true
    (polled every millisecond). Returns whether it was killed, its exit code and its output."""
    proc = _ctx().Process(target=_victim, args=(argv, str(out), batch_delay, save_delay))
    start = time.perf_counter()
    proc.start()
    killed = False
    while proc.is_alive():
        elapsed = time.perf_counter() - start
        if kill_when is not None and kill_when(elapsed):
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        if elapsed > timeout:
            proc.kill()
            raise TimeoutError(f"fmprobe {' '.join(argv)} ran over {timeout} s")
        time.sleep(0.001)
    proc.join()
    output = out.read_text() if out.exists() else ""  # killed before it opened its log
    return Outcome(killed and proc.exitcode == -signal.SIGKILL, proc.exitcode, output, time.perf_counter() - start)


def cli_subprocess(argv: list[str], *, kill_when: Callable[[float], bool] | None = None,
                   timeout: float = 300) -> Outcome:
    """The installed ``fmprobe <argv>`` script as a plain subprocess (import included, no slow-down), SIGKILLed the
    first time ``kill_when(elapsed)`` is true."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("fmprobe")), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    killed = False
    while kill_when is not None and proc.poll() is None:
        if kill_when(time.perf_counter() - start):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.001)
    out, _ = proc.communicate(timeout=timeout)
    return Outcome(killed and proc.returncode == -signal.SIGKILL, proc.returncode, out,
                   time.perf_counter() - start)


# --- what a kill left behind -----------------------------------------------------------------------------

def store_dirs(cache: Path) -> list[Path]:
    return sorted(p.parent for p in cache.glob("*/config.json"))


def shards(cache: Path) -> list[Path]:
    return sorted(s for store in store_dirs(cache) for s in store.glob("shard-*") if s.is_dir())


def partial_shards(cache: Path) -> list[Path]:
    return [p for store in store_dirs(cache) for p in store.glob("tmp-*") if p.is_dir()]


def committed_rows(cache: Path) -> list[str]:
    """Sample ids in committed shards, with repeats (a sample extracted twice shows up twice)."""
    return [sid for s in shards(cache) for sid in json.loads((s / "meta.json").read_text())["sample_ids"]]


def summary_value(output: str, key: str) -> str:
    """A ``key: value`` line of ``fmprobe extract``'s summary."""
    for line in output.splitlines():
        if line.startswith(f"{key}: "):
            return line.split(": ", 1)[1].strip()
    raise AssertionError(f"no '{key}:' line in the output:\n{output[-3000:]}")


# --- kill conditions -------------------------------------------------------------------------------------

def after_shards(cache: Path, k: int) -> Callable[[float], bool]:
    """True once ``k`` shards are committed."""
    return lambda _: len(shards(cache)) >= k


def during_shard_write(cache: Path, k: int) -> Callable[[float], bool]:
    """True while shard ``k`` (1-based) is half written: its temp dir holds some but not all files."""
    def check(_: float) -> bool:
        if len(shards(cache)) != k - 1:
            return False
        return any(any(p.glob("*.npy")) for p in partial_shards(cache))
    return check


def after_seconds(t: float) -> Callable[[float], bool]:
    return lambda elapsed: elapsed >= t


def when_glob(folder: Path, pattern: str) -> Callable[[float], bool]:
    """True once a file matching ``pattern`` exists under ``folder`` (e.g. a run's first checkpoint)."""
    return lambda _: any(folder.glob(pattern))


# --- features as stored --------------------------------------------------------------------------------

def stored_features(config: Path) -> tuple[list[str], dict[str, np.ndarray], int]:
    """Ids and arrays served from the cache for ``config`` (in this process, from the cache only), and how
    many samples had to be encoded to serve them (0 when the cache was complete)."""
    from fmprobe.config import load_config
    from fmprobe.data.manifest import load_manifest
    from fmprobe.features.extract import run_extraction

    exp = load_config(config)
    result = run_extraction(exp, load_manifest(exp.data, exp.task), progress=False)
    fs = result.features
    arrays = {"mean": fs.pooled(-1, "mean"), "cls": fs.pooled(-1, "cls"), "tokens": np.asarray(fs.tokens(-1))}
    return fs.sample_ids, arrays, result.extracted


def comparable_metrics(run_dir: Path) -> dict:
    """metrics.json without what differs between two runs of the same config by nature: the wall time and the
    timing of its phases, the config and head hashes, which cover absolute paths (each kill point works in its own copy of the project),
    and the identical-outputs flags, which name the other runs of the folder. The hashes of the outputs themselves
    are kept: they must match."""
    text = (run_dir / "metrics.json").read_text()
    metrics = json.loads(text.replace(json.loads(text)["config_hash"], "<config hash>"))
    metrics.pop("wall_seconds", None)
    metrics.pop("timing", None)
    for holder in [metrics, *metrics["heads"].values()]:
        holder["flags"] = [f for f in holder["flags"] if f["name"] not in TWIN_FLAGS]
    for pair in metrics.get("prediction_hashes", {}).values():
        pair[0] = "<head hash>"
    return metrics


def finished_runs(runs_dir: Path) -> list[Path]:
    return sorted(p.parent for p in runs_dir.glob("*/*/metrics.json"))
