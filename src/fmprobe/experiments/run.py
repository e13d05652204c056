"""`fmprobe run CONFIG`: manifest -> splits -> cached features -> heads x seeds -> evaluated run directory.

A run directory is never overwritten:
``runs/<experiment>/<run_id>/`` holds config.resolved.yaml, env.json, predictions.parquet,
metrics.json, curves.parquet, checkpoints/ and report.html.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from fmprobe import distributed
from fmprobe.atomic import atomic_path, write_json, write_text
from fmprobe.config import Experiment, dump_config
from fmprobe.data.manifest import Manifest, check_targets_vary, load_manifest
from fmprobe.errors import ConfigError
from fmprobe.evaluate.results import SPLITS, ProbeResults, SegResults, SplitData, predictions_table
from fmprobe.evaluate.summary import summarise_run
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.experiments.environment import environment_info
from fmprobe.experiments.identity import config_hash, head_identities, previous_prediction_hashes
from fmprobe.experiments.parallel import fold_share, gather_members
from fmprobe.experiments.params import backbone_parameters, record_parameters
from fmprobe.experiments.splitting import resolve_folds
from fmprobe.features.extract import extract_features
from fmprobe.features.store import FeatureSet
from fmprobe.probes.frozen import train_arms, train_heads
from fmprobe.probes.grid import check_grid, select_members
from fmprobe.probes.segmentation import check_segmentation, segment_frozen
from fmprobe.report.html import write_run_report
from fmprobe.tracking import log_run


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict


def new_run_dir(exp: Experiment) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(exp.runs_dir).expanduser() / exp.name
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        run_dir = base / f"{stamp}-{config_hash(exp)[:8]}{'' if i == 0 else f'-{i}'}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {base}")


def _split_data(df: pd.DataFrame, manifest: Manifest) -> SplitData:
    """Ids, groups and targets per split, for the samples that were extracted."""
    ids = {s: df.loc[df["split"] == s, "sample_id"].tolist() for s in SPLITS}
    empty = [s for s, v in ids.items() if not v]
    if empty:
        raise ConfigError(f"split(s) {empty} are empty after extraction; check split settings and skipped samples")
    rows = {s: df[df["split"] == s] for s in SPLITS}
    return SplitData(ids=ids, groups={s: rows[s]["group"].astype(str).tolist() for s in SPLITS},
                     targets={s: manifest.targets(rows[s]) for s in SPLITS})


@dataclass
class RunInputs:
    """What a run reads before it trains: the manifest, its folds, the cached features and each fold's split data.
    Runs on the same data, task, split and features read the same inputs (a sweep prepares them once)."""

    manifest: Manifest
    folds: list[tuple[pd.DataFrame, dict]]  # (manifest rows with their split, split info) per fold
    features: FeatureSet
    data: list[SplitData]  # per fold, the extracted samples
    backbone_params: int | None


def prepare_inputs(exp: Experiment, *, progress: bool = True) -> RunInputs:
    """Manifest, splits and cached features (extracting what is missing), after every check that needs no
    extraction."""
    manifest = load_manifest(exp.data, exp.task)
    check_targets_vary(manifest)  # before any extraction
    folds = resolve_folds(manifest, exp.task, exp.split)
    if len(folds) > 1 and exp.adapt.strategy != "frozen":
        raise ConfigError("split.mode kfold runs frozen probes only; use split.mode generate with adapt strategies")
    check_segmentation(exp)
    check_grid(exp)
    backbone_params, encoder = backbone_parameters(exp)  # frozen: memoised; the encoder if it had to be loaded
    features = extract_features(exp, manifest, encoder, progress=progress)
    extracted = set(features.sample_ids)
    data = [_split_data(df[df["sample_id"].isin(extracted)], manifest) for df, _ in folds]
    return RunInputs(manifest, folds, features, data, backbone_params)


def run_experiment(exp: Experiment, *, progress: bool = True) -> RunResult:
    started = time.perf_counter()
    # launched by torchrun / accelerate: join the other processes (fmprobe.distributed); else nothing changes
    distributed.init(cuda=exp.adapt.strategy != "frozen" and exp.adapt.device.startswith("cuda"))
    progress = progress and distributed.is_main()
    inputs = prepare_inputs(exp, progress=progress)
    features, folds, data = inputs.features, inputs.folds, inputs.data
    extracted = set(features.sample_ids)

    run_dir = distributed.broadcast_object(new_run_dir(exp) if distributed.is_main() else None)
    if distributed.is_main():
        write_text(run_dir / "config.resolved.yaml", dump_config(exp))
    task = ResolvedTask.from_config(exp.task, inputs.manifest.class_names)
    results = ProbeResults()
    for k, fold in enumerate(data):
        if exp.adapt.strategy == "frozen":
            part = train_heads(fold_share(exp, k), task, features, fold.ids, fold.targets,
                               fold_checkpoints(run_dir, k, len(data)))  # fmt: skip
            if exp.segmentation is not None and distributed.is_main():  # its own probe on the same cached tokens
                part.segmentation = segment_frozen(exp, features, folds[0][0], fold.ids,
                                                   fold_checkpoints(run_dir, k, len(data)))  # fmt: skip
        else:  # end to end on pixels (staged: stage 1 on these cached features); writes adaptation.json
            from fmprobe.adapt.finetune import adapt_heads  # peft and friends: imported only when needed

            part = adapt_heads(exp, task, features, folds[0][0][folds[0][0]["sample_id"].isin(extracted)], fold.ids,
                               fold.targets, run_dir)
        add_fold(results, part, k, data)
    if exp.adapt.strategy == "frozen":  # several processes: each trained its share of the members
        results = gather_members(exp, results)
    if not distributed.is_main():  # process 0 alone writes the run
        return distributed.broadcast_object(None)
    result = write_run(exp, task, inputs, results, run_dir, started)
    return distributed.broadcast_object(result)


def run_arms(exps: list[Experiment]) -> list[RunResult]:
    """Runs of one ``probes.frozen.shared_training`` key (arms of a sweep) in one process: their inputs prepared
    once, their heads trained together (``probes.frozen.train_arms``), each run directory written, in order, as
    ``run_experiment`` writes it, with the same metrics bit for bit (each arm sees the arms before it, as runs one
    after the other would). An arm's ``wall_seconds`` counts from the start of the shared work."""
    started = time.perf_counter()
    inputs = prepare_inputs(exps[0], progress=False)
    task = ResolvedTask.from_config(exps[0].task, inputs.manifest.class_names)
    run_dirs = [new_run_dir(exp) for exp in exps]
    for exp, run_dir in zip(exps, run_dirs):
        write_text(run_dir / "config.resolved.yaml", dump_config(exp))
    results = [ProbeResults() for _ in exps]
    for k, fold in enumerate(inputs.data):
        parts = train_arms(exps, task, inputs.features, fold.ids, fold.targets,
                           [fold_checkpoints(run_dir, k, len(inputs.data)) for run_dir in run_dirs])  # fmt: skip
        for arm, part in zip(results, parts):
            add_fold(arm, part, k, inputs.data)
    return [write_run(exp, task, inputs, arm, run_dir, started) for exp, arm, run_dir in zip(exps, results, run_dirs)]


def fold_checkpoints(run_dir: Path, fold: int, n_folds: int) -> Path:
    return run_dir / "checkpoints" / (f"fold{fold}" if n_folds > 1 else "")


def add_fold(results: ProbeResults, part: ProbeResults, fold: int, data: list[SplitData]) -> None:
    """Append one fold's results (tagged with their fold when there are several)."""
    if len(data) > 1:
        for r in part.runs:
            r.fold, r.data = fold, data[fold]
    results.runs += part.runs
    results.standardisation.update(part.standardisation)
    results.segmentation = part.segmentation


def write_run(exp: Experiment, task: ResolvedTask, inputs: RunInputs, results: ProbeResults, run_dir: Path,
              started: float) -> RunResult:  # fmt: skip
    """Grid selection, predictions, curves, metrics.json (last) and the report of a trained run."""
    split, split_info, folds = inputs.data[0], inputs.folds[0][1], inputs.folds
    grid_record = None
    if exp.train.grid is not None:  # per head, the member with the best mean validation score over seeds
        results, grid_record = select_members(exp, task, results, split)
    record_parameters(exp, results, run_dir, inputs.backbone_params)
    if len(inputs.data) > 1:
        split_info = {**split_info, "fold": None, "fold_sizes": [info["sizes"] for _, info in folds]}
    preds = predictions_table(results, split, task.score_names, list(task.targets))
    with atomic_path(run_dir / "predictions.parquet") as tmp:
        preds.to_parquet(tmp, index=False)
    curves = pd.DataFrame(
        [{"head": r.head, "fold": -1 if r.fold is None else r.fold, "seed": r.seed, **row}
         for r in results.runs for row in r.curves]
    )
    with atomic_path(run_dir / "curves.parquet") as tmp:
        curves.to_parquet(tmp, index=False)
    if results.segmentation is not None:
        write_segmentation_outputs(run_dir, results.segmentation)

    metrics = summarise_run(
        exp, task, results, split, split_info=split_info, skipped=inputs.features.skipped,
        config_hash=config_hash(exp), head_identities=head_identities(exp),
        other_runs=previous_prediction_hashes(Path(exp.runs_dir).expanduser(), run_dir),
        grid=grid_record, wall_seconds=time.perf_counter() - started,
    )  # fmt: skip
    write_json(run_dir / "env.json", environment_info(seeds=exp.train.seeds, config_hash=config_hash(exp),
                                                      **distributed.describe()))
    write_run_report(run_dir, exp, metrics, curves)
    # metrics.json last: its presence is what marks a run finished (sweeps skip it, the index lists it).
    write_json(run_dir / "metrics.json", metrics)
    log_run(exp, run_dir, metrics, curves)  # opt-in (tracking: in the config); a no-op otherwise
    return RunResult(run_dir=run_dir, metrics=metrics)


def write_segmentation_outputs(run_dir: Path, seg: SegResults) -> None:
    """``segmentation_curves.parquet`` and the first seed's predicted test masks (``segmentation_test_masks.npz``)."""
    curves = pd.DataFrame([{"decoder": r.name, "seed": r.seed, **row} for r in seg.runs for row in r.curves])
    with atomic_path(run_dir / "segmentation_curves.parquet") as tmp:
        curves.to_parquet(tmp, index=False)
    with atomic_path(run_dir / "segmentation_test_masks.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, sample_ids=np.array(seg.baseline.ids), **seg.test_masks)
