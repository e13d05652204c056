"""Kill and resume: SIGKILL `fmprobe extract` / `fmprobe run` at many points, resume, compare bit for bit.

After every kill: the resumed extraction encodes exactly the samples no committed shard holds (none twice),
leaves no partial shard behind, and serves features identical to an uninterrupted extraction; a rerun of
a killed `fmprobe run` writes metrics identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import fault_injection as fi


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Images, manifest, model and config, an uninterrupted reference extraction, and how long one takes."""
    root = tmp_path_factory.mktemp("fi")
    model = fi.save_tiny_dinov2(root / "model")
    fi.write_project(root / "project", model)
    warm = fresh_project(root, root / "warm-up")  # the first fork pays for lazy imports: time the second
    durations = []
    for config in (warm, root / "project" / "exp.yaml"):
        ref = fi.run_cli(["extract", str(config)], root / "ref-extract.log", batch_delay=BATCH_DELAY)
        assert ref.exitcode == 0, ref.output
        durations.append(ref.seconds)
    (root / "duration").write_text(str(min(durations)))  # what a victim takes, to place kills by time
    return root


@pytest.fixture(scope="module")
def reference(base) -> dict:
    ids, arrays, encoded = fi.stored_features(base / "project" / "exp.yaml")
    assert encoded == 0 and len(ids) == fi.N_IMAGES
    return {"ids": ids, "arrays": arrays}


def fresh_project(base: Path, dest: Path) -> Path:
    """A copy of the project with an empty cache and no runs."""
    shutil.copytree(base / "project", dest, ignore=shutil.ignore_patterns("cache", "runs"))
    return dest / "exp.yaml"


def kill_then_resume_extract(base: Path, reference: dict, work: Path, kill_when, *, save_delay=0.0) -> dict:
    """One kill point: run `fmprobe extract` until ``kill_when``, SIGKILL it, resume, check everything."""
    config = fresh_project(base, work)
    cache = work / "cache"
    duration = float((base / "duration").read_text())
    victim = fi.run_cli(["extract", str(config)], work / "victim.log", kill_when=kill_when(cache, duration),
                        batch_delay=BATCH_DELAY, save_delay=save_delay)
    assert victim.killed, victim.output
    done = fi.committed_rows(cache)
    partial = len(fi.partial_shards(cache))
    assert len(done) == len(set(done))

    resumed = fi.run_cli(["extract", str(config)], work / "resume.log")
    assert resumed.exitcode == 0, resumed.output
    extracted = int(fi.summary_value(resumed.output, "extracted"))
    cached = int(fi.summary_value(resumed.output, "cached"))
    assert (extracted, cached) == (fi.N_IMAGES - len(done), len(done)), "finished work was redone"
    rows = fi.committed_rows(cache)
    assert sorted(rows) == sorted(reference["ids"]), "a sample is missing or stored twice"
    assert not fi.partial_shards(cache), "a partial shard survived the resume"

    ids, arrays, encoded = fi.stored_features(config)
    assert encoded == 0 and ids == reference["ids"]
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, reference["arrays"][name], err_msg=name)
    return {"committed_before_resume": len(done), "partial_shards_left": partial, "extracted_on_resume": extracted,
            "victim_seconds": round(victim.seconds, 2)}


BATCH_DELAY = 0.02  # per batch in victims: 20 batches take ~0.4 s, so polling hits every step
# Kill points: by step (k shards committed; shard k half written) and by time (a fraction of an
# uninterrupted victim's duration, drawn at random with a fixed seed). 40 samples, 10 shards.
FRACTIONS = [round(float(f), 2) for f in sorted(np.random.default_rng(15).uniform(0.05, 0.6, 5))]
FAST_POINTS = [
    ("after 3 shards", lambda c, d: fi.after_shards(c, 3), {}),
    ("writing shard 5", lambda c, d: fi.during_shard_write(c, 5), {"save_delay": 0.05}),
    ("at 70% of the time", lambda c, d: fi.after_seconds(0.7 * d), {}),
]
SLOW_POINTS = (
    [(f"after {k} shards", (lambda k: lambda c, d: fi.after_shards(c, k))(k), {}) for k in (1, 2, 4, 5, 6, 7, 8, 9)]
    + [(f"writing shard {k}", (lambda k: lambda c, d: fi.during_shard_write(c, k))(k), {"save_delay": 0.05})
       for k in (1, 3, 7, 10)]
    + [("store created, no shard yet", lambda c, d: lambda _: bool(fi.store_dirs(c)), {})]
    + [(f"at {f:.0%} of the time", (lambda f: lambda c, d: fi.after_seconds(f * d))(f), {}) for f in FRACTIONS]
)


@pytest.mark.parametrize("name,kill_when,slow", FAST_POINTS, ids=[p[0] for p in FAST_POINTS])
def test_killed_extraction_resumes_bitwise_identical(base, reference, tmp_path, name, kill_when, slow):
    kill_then_resume_extract(base, reference, tmp_path / "w", kill_when, **slow)


@pytest.mark.slow
@pytest.mark.parametrize("name,kill_when,slow", SLOW_POINTS, ids=[p[0] for p in SLOW_POINTS])
def test_killed_extraction_resumes_bitwise_identical_slow(base, reference, tmp_path, name, kill_when, slow):
    kill_then_resume_extract(base, reference, tmp_path / "w", kill_when, **slow)


@pytest.mark.slow
def test_killed_fmprobe_script_extract_resumes(base, reference, tmp_path):
    """The same with the installed `fmprobe extract` script as a plain process at full speed (no slow-down)."""
    config = fresh_project(base, tmp_path / "w")
    cache = tmp_path / "w" / "cache"
    victim = fi.cli_subprocess(["extract", str(config)], kill_when=fi.after_shards(cache, 1))
    assert victim.killed, victim.output
    done = len(fi.committed_rows(cache))
    resumed = fi.cli_subprocess(["extract", str(config)])
    assert resumed.exitcode == 0 and int(fi.summary_value(resumed.output, "extracted")) == fi.N_IMAGES - done
    ids, arrays, _ = fi.stored_features(config)
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, reference["arrays"][name], err_msg=name)


@pytest.mark.slow
def test_killed_resume_is_itself_resumable(base, reference, tmp_path):
    """Kill the extraction, then kill its resume too: the second resume still finishes the job exactly."""
    config = fresh_project(base, tmp_path / "w")
    cache = tmp_path / "w" / "cache"
    for k, log in ((2, "first"), (6, "second")):
        victim = fi.run_cli(["extract", str(config)], tmp_path / f"{log}.log", kill_when=fi.after_shards(cache, k),
                            batch_delay=BATCH_DELAY)
        assert victim.killed and len(fi.committed_rows(cache)) >= k * fi.SHARD_SIZE
    done = len(fi.committed_rows(cache))
    resumed = fi.run_cli(["extract", str(config)], tmp_path / "resume.log")
    assert int(fi.summary_value(resumed.output, "extracted")) == fi.N_IMAGES - done
    assert sorted(fi.committed_rows(cache)) == sorted(reference["ids"])


# --- fmprobe run -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_metrics(base) -> dict:
    config = fresh_project(base, base / "ref-run")
    outcome = fi.run_cli(["run", str(config), "--quiet"], base / "ref-run.log")
    assert outcome.exitcode == 0, outcome.output
    (run_dir,) = fi.finished_runs(base / "ref-run" / "runs")
    return fi.comparable_metrics(run_dir)


def kill_then_rerun(base: Path, reference_metrics: dict, work: Path, kill_when) -> None:
    """Kill `fmprobe run`, run it again: features resume (nothing extracted twice), metrics are identical."""
    config = fresh_project(base, work)
    victim = fi.run_cli(["run", str(config), "--quiet"], work / "victim.log", kill_when=kill_when(work),
                        batch_delay=BATCH_DELAY)
    assert victim.killed, victim.output
    before = set(fi.finished_runs(work / "runs"))
    rerun = fi.run_cli(["run", str(config), "--quiet"], work / "rerun.log")
    assert rerun.exitcode == 0, rerun.output
    (run_dir,) = set(fi.finished_runs(work / "runs")) - before
    assert sorted(fi.committed_rows(work / "cache")) == sorted(f"s{i:03d}" for i in range(fi.N_IMAGES))
    assert fi.comparable_metrics(run_dir) == reference_metrics


RUN_POINTS = [
    ("run: extracting, after 4 shards", lambda w: fi.after_shards(w / "cache", 4)),
    ("run: training, first checkpoint", lambda w: fi.when_glob(w / "runs", "*/*/checkpoints/*/*/*.pt")),
    ("run: predictions written", lambda w: fi.when_glob(w / "runs", "*/*/predictions.parquet")),
    ("run: report written, metrics not yet", lambda w: fi.when_glob(w / "runs", "*/*/report.html")),
]


@pytest.mark.slow  # each point runs `fmprobe run` twice (test_reliability_determinism covers reruns fast)
@pytest.mark.parametrize("name,kill_when", RUN_POINTS, ids=[p[0] for p in RUN_POINTS])
def test_killed_run_reruns_to_identical_metrics(base, reference_metrics, tmp_path, name, kill_when):
    kill_then_rerun(base, reference_metrics, tmp_path / "w", kill_when)


# --- two processes, one cache ------------------------------------------------------------------------------

def test_two_processes_extracting_into_one_cache_stay_consistent(base, reference, tmp_path):
    """The fast, multi-process twin of test_extract's slow test: two `fmprobe extract` at once, and a third
    one SIGKILLed halfway while the others run; the cache ends complete and identical to the reference."""
    config = fresh_project(base, tmp_path / "w")
    cache = tmp_path / "w" / "cache"
    ctx = fi._ctx()
    workers = [ctx.Process(target=fi._victim, args=(["extract", str(config)], str(tmp_path / f"{i}.log"),
                                                     BATCH_DELAY, 0.02)) for i in range(2)]
    for worker in workers:
        worker.start()
    duration = float((base / "duration").read_text())
    killed = fi.run_cli(["extract", str(config)], tmp_path / "killed.log", kill_when=fi.after_seconds(0.5 * duration),
                        batch_delay=BATCH_DELAY, save_delay=0.05)
    for worker in workers:
        worker.join(timeout=300)
    outputs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    assert [w.exitcode for w in workers] == [0, 0], outputs
    assert all(fi.summary_value(out, "samples") == str(fi.N_IMAGES) for out in outputs)
    assert sorted(fi.committed_rows(cache)) == sorted(reference["ids"]), "a sample is missing or stored twice"
    ids, arrays, encoded = fi.stored_features(config)
    assert encoded == 0 and ids == reference["ids"]
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, reference["arrays"][name], err_msg=name)
    resumed = fi.run_cli(["extract", str(config)], tmp_path / "after.log")  # a later open sweeps the dead temp shard
    assert int(fi.summary_value(resumed.output, "extracted")) == 0 and not fi.partial_shards(cache)
    assert killed.killed


def test_two_extractions_on_one_cache_split_the_work(base, reference, tmp_path):
    """Two `fmprobe extract` started together on one cache claim the missing samples unit by unit: each sample is
    encoded and stored once, both processes do part of the work, and the features are the reference's bits."""
    config = fresh_project(base, tmp_path / "w")
    ctx = fi._ctx()
    delay = 0.1  # per batch: 2 s of work, so the second process starts well before the first could finish alone
    workers = [ctx.Process(target=fi._victim, args=(["extract", str(config)], str(tmp_path / f"{i}.log"), delay, 0.0))
               for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    outputs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    assert [w.exitcode for w in workers] == [0, 0], outputs
    extracted = [int(fi.summary_value(out, "extracted")) for out in outputs]
    cached = [int(fi.summary_value(out, "cached")) for out in outputs]
    assert sum(extracted) == fi.N_IMAGES and min(extracted) > 0, extracted
    assert [e + c for e, c in zip(extracted, cached)] == [fi.N_IMAGES] * 2
    assert sorted(fi.committed_rows(tmp_path / "w" / "cache")) == sorted(reference["ids"]), "a sample stored twice"
    ids, arrays, encoded = fi.stored_features(config)
    assert encoded == 0 and ids == reference["ids"]
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, reference["arrays"][name], err_msg=name)


# --- fmprobe sweep ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_sweep(base) -> list[dict]:
    spec = sweep_project(base, base / "ref-sweep")
    outcome = fi.run_cli(["sweep", str(spec), "--workers", "1"], base / "ref-sweep.log")
    assert outcome.exitcode == 0, outcome.output
    return sorted_metrics(base / "ref-sweep" / "runs")


def sweep_project(base: Path, dest: Path) -> Path:
    fresh_project(base, dest)
    spec = dest / "sweep.yaml"
    spec.write_text("base: exp.yaml\nname: grid\ngrid:\n  train.lr: [0.001, 0.01]\n  train.weight_decay: [0.0, 0.01]\n")
    return spec


def sorted_metrics(runs: Path) -> list[dict]:
    return sorted((fi.comparable_metrics(d) for d in fi.finished_runs(runs)), key=lambda m: json.dumps(m))


def kill_then_resume_sweep(base: Path, reference_sweep: list[dict], work: Path, kill_when) -> None:
    """Kill `fmprobe sweep`, rerun it: finished runs are skipped (never run twice), the rest complete, and
    every run's metrics equal an uninterrupted sweep's."""
    spec = sweep_project(base, work)
    victim = fi.run_cli(["sweep", str(spec), "--workers", "1"], work / "victim.log", kill_when=kill_when(work),
                        batch_delay=BATCH_DELAY)
    assert victim.killed, victim.output
    finished = len(fi.finished_runs(work / "runs"))
    resumed = fi.run_cli(["sweep", str(spec), "--workers", "1"], work / "resume.log")
    assert resumed.exitcode == 0, resumed.output
    assert f"4 arms, {finished} finished earlier, {4 - finished} to run" in resumed.output
    hashes = [json.loads((d / "metrics.json").read_text())["config_hash"] for d in fi.finished_runs(work / "runs")]
    assert len(hashes) == len(set(hashes)) == 4, "a finished run was run again"
    assert sorted(fi.committed_rows(work / "cache")) == sorted(f"s{i:03d}" for i in range(fi.N_IMAGES))
    assert sorted_metrics(work / "runs") == reference_sweep


def after_runs(k: int):
    return lambda w: lambda _: len(fi.finished_runs(w / "runs")) >= k


SWEEP_POINTS = [
    ("sweep: extracting, after 3 shards", lambda w: fi.after_shards(w / "cache", 3)),
    ("sweep: after 1 finished run", after_runs(1)),
    ("sweep: after 2 finished runs", after_runs(2)),
    ("sweep: after 3 finished runs", after_runs(3)),
]


@pytest.mark.slow  # each point runs a 4-run sweep twice
@pytest.mark.parametrize("name,kill_when", SWEEP_POINTS, ids=[p[0] for p in SWEEP_POINTS])
def test_killed_sweep_resumes_without_rerunning_finished_runs(base, reference_sweep, tmp_path, name, kill_when):
    kill_then_resume_sweep(base, reference_sweep, tmp_path / "w", kill_when)
