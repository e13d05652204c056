"""`fmprobe sweep SWEEP.yaml`: a grid of experiments, resumable, on a local process pool or on Ray.

A sweep file names a base config and a grid of dotted keys (list indices allowed: ``heads.0.type``)::

    base: config.yaml          # relative to the sweep file
    name: probe-grid           # default: the sweep file's stem
    grid:
      heads.0.type: [linear, mlp]
      train.lr: [0.001, 0.01]
      "model.layers, heads.0.layer": [[[-1], -1], [[6], 6]]   # keys joined by commas vary together
    workers: 1                 # optional; default: one per two cores
    gates: gates.yaml          # optional; verdicts shown in the sweep report

Every combination is validated before anything runs. A run is identified by ``config_hash`` and is
finished when a run directory of that hash is (``experiments.status``): finished runs are skipped, so a killed
sweep resumes where it stopped, and a failed one is run again in a new directory. Runs sharing a feature-cache entry (same model, data and feature
settings) are extracted once, first; the runs then train heads on the cached features. Frozen runs that differ
only in their heads (type, pooling, layer...) and learning rate / weight decay train together in one process
(``run.run_arms``): features loaded once, one HeadBank pass per input and seed, each run's results bit for bit
those it gets alone.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmprobe.atomic import write_json
from fmprobe.config import Experiment, parse_config, read_yaml, resolve_paths, set_dotted
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.experiments.status import describe_error, is_finished, short_error
from fmprobe.report.progress import Progress, Step

SWEEP_KEYS = ("base", "name", "grid", "workers", "gates")


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]  # the base config, paths resolved
    grid: dict[tuple[str, ...], list[Any]]  # keys varying together -> their values
    source: Path
    workers: int | None = None
    gates: Path | None = None


@dataclass
class SweepPoint:
    """One combination of the grid: its values, its validated config and its identity."""

    values: dict[str, Any]
    exp: Experiment
    config_hash: str
    run_dir: Path | None = None
    status: str = "pending"  # pending | done (finished earlier) | ran | failed
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    points: list[SweepPoint]
    runs_dir: Path
    sweep_dir: Path
    extractions: int = 0
    report: Path | None = None
    failed: list[SweepPoint] = field(default_factory=list)


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    data = read_yaml(path, "sweep") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"sweep '{path}': the top level must be a mapping with base and grid")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"sweep '{path}': unknown key(s) {unknown}; valid keys: {', '.join(SWEEP_KEYS)}")
    if "base" not in data or "grid" not in data:
        raise ConfigError(f"sweep '{path}' needs 'base' (a config file) and 'grid' (dotted key -> list of values)")
    folder = path.parent.resolve()
    base_path = folder / str(data["base"])
    base = read_yaml(base_path, f"base config of sweep '{path}':") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"base config '{base_path}' must be a mapping")
    resolve_paths(base, base_path.parent)
    workers = data.get("workers")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"sweep '{path}': workers must be a positive integer, got {workers!r}")
    return SweepSpec(
        name=str(data.get("name") or path.stem),
        base=base,
        grid=_parse_grid(data["grid"], path),
        source=path,
        workers=workers,
        gates=folder / str(data["gates"]) if data.get("gates") else None,
    )


def _parse_grid(grid: Any, path: Path) -> dict[tuple[str, ...], list[Any]]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"sweep '{path}': grid must be a non-empty mapping of dotted keys to lists of values")
    out: dict[tuple[str, ...], list[Any]] = {}
    for key, values in grid.items():
        keys = tuple(k.strip() for k in str(key).split(","))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep '{path}': grid['{key}'] must be a non-empty list of values, got {values!r}")
        if len(keys) > 1:
            bad = [v for v in values if not isinstance(v, list) or len(v) != len(keys)]
            if bad:
                raise ConfigError(
                    f"sweep '{path}': grid['{key}'] varies {len(keys)} keys together, so each value must be a "
                    f"list of {len(keys)} items (one per key); got {bad[0]!r}"
                )
        out[keys] = values
    return out


def expand(spec: SweepSpec) -> list[SweepPoint]:
    """Every grid combination as a validated Experiment (all errors are reported before anything runs)."""
    from fmprobe.experiments.identity import config_hash

    points: list[SweepPoint] = []
    errors: list[str] = []
    seen: set[str] = set()
    folder = spec.source.parent.resolve()
    for combo in itertools.product(*spec.grid.values()):
        values: dict[str, Any] = {}
        for keys, value in zip(spec.grid, combo):
            values.update(zip(keys, value) if len(keys) > 1 else [(keys[0], value)])
        data = copy.deepcopy(spec.base)
        try:
            for key, value in values.items():
                set_dotted(data, key, copy.deepcopy(value))
            resolve_paths(data, folder)  # paths given in the grid resolve against the sweep file
            exp = parse_config(data, source=f"'{spec.base.get('name', 'base')}' with {values}")
        except ConfigError as err:
            errors.append(str(err))
            continue
        digest = config_hash(exp)
        if digest not in seen:  # two combinations may resolve to the same config
            seen.add(digest)
            points.append(SweepPoint(values=values, exp=exp, config_hash=digest))
    if errors:
        raise ConfigError(f"sweep '{spec.source}': {len(errors)} grid combination(s) are invalid:\n" + "\n".join(errors))
    runs_dirs = {Path(p.exp.runs_dir).expanduser().resolve() for p in points}
    if len(runs_dirs) > 1:
        raise ConfigError(f"sweep '{spec.source}': runs_dir must be the same for every run, got {sorted(map(str, runs_dirs))}")
    return points


def finished_runs(runs_dir: Path, experiment: str) -> dict[str, Path]:
    """config hash -> the latest finished run directory of ``experiment`` (failed ones are run again, anew)."""
    out: dict[str, Path] = {}
    for metrics in sorted((runs_dir / experiment).glob("*/metrics.json")):
        if not is_finished(metrics.parent):
            continue
        try:
            digest = json.loads(metrics.read_text())["config_hash"]
        except (OSError, ValueError, KeyError):
            continue
        out[digest] = metrics.parent
    return out


def extraction_key(exp: Experiment) -> str:
    """Runs with the same key read the same feature-cache entry (model, data and feature settings)."""
    return json.dumps([exp.model.model_dump(mode="json"), exp.data.model_dump(mode="json"),
                       exp.features.model_dump(mode="json")], sort_keys=True)


def default_workers() -> int:
    """One worker per two cores: each worker's torch gets the two threads."""
    return max(1, (os.cpu_count() or 1) // 2)


# --- work done in a worker (top-level functions: they are pickled to processes or Ray) -------------


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _extract_task(exp: Experiment) -> dict[str, Any]:
    from fmprobe.data.manifest import load_manifest
    from fmprobe.features.extract import run_extraction

    try:
        result = run_extraction(exp, load_manifest(exp.data, exp.task))
    except Exception as err:  # reported per run; the other extractions go on
        return {"error": describe_error(err)}
    return {"error": None, "extracted": result.extracted, "cached": result.cached, "seconds": result.seconds}


def _run_task(exps: list[Experiment]) -> list[dict[str, Any]]:
    """Arms of one ``shared_training`` key: one run alone, several through ``run_arms`` (inputs loaded once,
    heads trained together, each run's results as it gets them alone); when their shared work fails, each arm
    alone, so every arm records its own outcome (one diverging learning rate does not fail the others)."""
    from fmprobe.experiments.run import run_arms

    outcomes = None
    if len(exps) > 1:
        try:
            outcomes = run_arms(exps)
        except Exception:  # the arms run alone below and each reports its own error
            outcomes = None
    if outcomes is None:
        outcomes = [_run_alone(exp) for exp in exps]
    return [{"error": describe_error(o), "run_dir": None} if isinstance(o, Exception)
            else {"error": None, "run_dir": str(o.run_dir)} for o in outcomes]  # fmt: skip


def _run_alone(exp: Experiment) -> Any:
    """One run's RunResult, or the exception it failed with (reported per run; the other runs go on)."""
    from fmprobe.experiments.run import run_experiment

    try:
        return run_experiment(exp, progress=False)
    except Exception as err:
        return err


def arm_batches(points: list[SweepPoint], workers: int) -> list[list[SweepPoint]]:
    """The points that train together (one ``shared_training`` key; the others alone), each batch cut into
    contiguous parts when there are fewer batches than workers, so every worker has work."""
    from fmprobe.probes.frozen import shared_training

    batches: dict[Any, list[SweepPoint]] = {}
    for i, point in enumerate(points):
        batches.setdefault(shared_training(point.exp) or i, []).append(point)
    parts = -(-workers // len(batches)) if batches else 1
    out = []
    for batch in batches.values():
        size = -(-len(batch) // min(parts, len(batch)))
        out += [batch[i : i + size] for i in range(0, len(batch), size)]
    return out


# --- executors ---------------------------------------------------------------------------------------

Task = Callable[[Any], Any]


class LocalExecutor:
    """In-process for one worker (no spawn cost); a spawn-started process pool otherwise."""

    def __init__(self, workers: int):
        self.workers = workers
        self.threads = max(1, (os.cpu_count() or 1) // workers)

    def map(self, fn: Task, items: list[Any]) -> Iterator[tuple[int, Any]]:
        if self.workers == 1 or len(items) == 1:
            for i, item in enumerate(items):
                yield i, fn(item)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(self.workers, len(items)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(self.threads,)) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            for future in as_completed(futures):
                yield futures[future], future.result()


class RayExecutor:
    """Ray tasks, on a local Ray instance or the cluster at ``address`` (paths must be shared storage)."""

    def __init__(self, address: str | None):
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray needs Ray, which is not installed: pip install ray") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address or None)
        self.workers = int(ray.cluster_resources().get("CPU", 1))

    def map(self, fn: Task, items: list[Any]) -> Iterator[tuple[int, Any]]:
        remote = self.ray.remote(fn)
        refs = {remote.remote(item): i for i, item in enumerate(items)}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield refs[done[0]], self.ray.get(done[0])


# --- the sweep ---------------------------------------------------------------------------------------


def run_sweep(
    path: str | Path,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    use_ray: bool = False,
    gates: str | Path | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Run every unfinished grid point; write sweep.json and report.html under ``<runs_dir>/_sweeps/<name>/``.
    ``progress`` shows the arms done / running / failed with the time left (nothing when None).

    Raises FmprobeError after the report is written if any run failed (the others are kept).
    """
    display = progress if progress is not None else Progress.off()
    spec = load_sweep(path)
    points = expand(spec)
    runs_dir = Path(points[0].exp.runs_dir).expanduser().resolve()
    done: dict[str, dict[str, Path]] = {}
    for point in points:
        finished = done.setdefault(point.exp.name, finished_runs(runs_dir, point.exp.name))
        if point.config_hash in finished:
            point.status, point.run_dir = "done", finished[point.config_hash]
    pending = [p for p in points if p.status == "pending"]
    executor = (RayExecutor(ray_address) if use_ray or ray_address
                else LocalExecutor(workers or spec.workers or default_workers()))
    display.line(f"sweep {spec.name}: {len(points)} arms, {len(points) - len(pending)} finished earlier, "
                 f"{len(pending)} to run")

    # 1. one extraction per feature-cache entry, so the runs after it all read the cache
    groups: dict[str, list[SweepPoint]] = {}
    for point in pending:
        groups.setdefault(extraction_key(point.exp), []).append(point)
    firsts = [members[0] for members in groups.values()]
    broken: set[str] = set()
    step = display.step(f"sweep {spec.name} features", "cache entries", len(firsts))
    for n, (i, out) in enumerate(executor.map(_extract_task, [p.exp for p in firsts]), start=1):
        key = extraction_key(firsts[i].exp)
        if out["error"]:
            broken.add(key)
            for point in groups[key]:
                point.status, point.error = "failed", f"feature extraction failed: {out['error']}"
            display.line(f"extraction failed for {len(groups[key])} arm(s): {short_error(out['error'])}")
        else:
            display.line(f"features: {out['extracted']} extracted, {out['cached']} cached ({out['seconds']:.1f} s)")
        step.update(n)
    if firsts:
        step.finish()

    # 2. the runs, on cached features; arms that differ only in their heads train together
    todo = [p for p in pending if p.status == "pending"]
    arms = ArmsProgress(display.step(f"sweep {spec.name}", "arms", len(pending)), len(pending), executor.workers,
                        display.clock)  # fmt: skip
    for _ in range(len(pending) - len(todo)):  # their extraction failed
        arms.record(failed=True)
    batches = arm_batches(todo, executor.workers)
    for i, outs in executor.map(_run_task, [[p.exp for p in batch] for batch in batches]):
        for point, out in zip(batches[i], outs):
            if out["error"]:
                point.status, point.error = "failed", out["error"]
                display.line(f"arm failed: {_label(point)}: {short_error(out['error'])}")
            else:
                point.status, point.run_dir = "ran", Path(out["run_dir"])
                display.line(f"arm done: {_label(point)} -> {point.run_dir}")
            arms.record(failed=bool(out["error"]))
    if pending:
        arms.step.finish(f"{arms.failed} failed")

    sweep_dir = runs_dir / "_sweeps" / spec.name
    result = SweepResult(spec.name, points, runs_dir, sweep_dir, extractions=len(firsts) - len(broken),
                         failed=[p for p in points if p.status == "failed"])
    write_json(sweep_dir / "sweep.json", sweep_record(spec, points))
    gates_path = Path(gates) if gates else spec.gates
    result.report = write_sweep_report(sweep_dir / "report.html", runs_dir, spec.name, points, gates_path)
    if result.failed:
        listing = "\n".join(f"  {_label(p)}: {p.error}" for p in result.failed)
        raise FmprobeError(f"{len(result.failed)} of {len(points)} sweep runs failed (report: {result.report}):\n"
                           f"{listing}\nrerun the sweep to retry them; finished runs are skipped")
    return result


@dataclass
class ArmsProgress:
    """The sweep's arms: done, running (as many as the workers, while arms wait), failed, and the time left
    (arms to go x the mean wall time per finished arm, shared by the workers)."""

    step: Step
    total: int
    workers: int  # parallel arms (Ray: the cluster's CPUs)
    clock: Callable[[], float]
    done: int = 0
    failed: int = 0

    def record(self, *, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        left = self.total - self.done
        running = min(self.workers, left) if self.workers else left
        per_arm = (self.clock() - self.step.started) / self.done  # wall time per arm, workers included
        self.step.update(self.done, detail=f"{running} running · {self.failed} failed",
                         eta=left * per_arm if left else None)


def write_sweep_report(dest: Path, runs_dir: Path, name: str, points: list[SweepPoint], gates_path: Path | None
                       ) -> Path:  # fmt: skip
    """The sweep's leaderboards (one per primary metric), its gate verdicts (also as gates.json) and failed arms."""
    from fmprobe.experiments.efficiency import wanted
    from fmprobe.experiments.gates import evaluate_gates, load_gates
    from fmprobe.experiments.leaderboard import boards_by_primary_metric
    from fmprobe.report.sweep import write_board_report

    run_dirs = [p.run_dir for p in points if p.run_dir is not None]
    boards = boards_by_primary_metric(runs_dir, run_dirs) if run_dirs else []
    verdicts = None
    if gates_path is not None and run_dirs:
        verdicts = evaluate_gates(load_gates(gates_path), runs_dir, run_dirs=run_dirs)
        write_json(dest.parent / "gates.json", verdicts.to_dict())
    failed = [{"values": _label(p), "error": p.error} for p in points if p.status == "failed"]
    curves = [(_short_label(p), json.loads((p.run_dir / "metrics.json").read_text())) for p in points
              if p.run_dir is not None and wanted(p.exp)]  # fmt: skip
    return write_board_report(dest, boards, verdicts, title=f"Sweep {name}: leaderboard", failed=failed,
                              efficiency=curves)


def sweep_record(spec: SweepSpec, points: Iterable[SweepPoint]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "source": str(spec.source),
        "grid": {", ".join(k): v for k, v in spec.grid.items()},
        "runs": [{"values": p.values, "config_hash": p.config_hash, "experiment": p.exp.name,
                  "run_dir": str(p.run_dir) if p.run_dir else None, "status": p.status, "error": p.error}
                 for p in points],
    }


def _short_label(point: SweepPoint) -> str:
    """The point's grid values, file paths by their name (a curve's legend)."""
    return ", ".join(f"{k.split('.')[-1]}={Path(str(v)).name if '/' in str(v) else v}" for k, v in point.values.items())


def _label(point: SweepPoint) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.values.items())
