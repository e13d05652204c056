"""`fmprobe run CONFIG`: manifest -> splits -> cached features -> heads x seeds -> evaluated run directory.

A run directory is never overwritten:
``runs/<experiment>/<run_id>/`` holds config.resolved.yaml, env.json, predictions.parquet,
metrics.json, curves.parquet, checkpoints/, report.html and status.json (``experiments.status``: finished, or
failed with the stage and the error), and efficiency.parquet with the label-efficiency protocol (one row per head,
budget and repeat; the repeats' predictions and checkpoints are not kept). A finished run is compared with every
other finished run of the runs folder by the index (``experiments.twins``), which flags identical outputs in both
runs' files.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from fmprobe import distributed
from fmprobe.atomic import atomic_path, write_json, write_text
from fmprobe.config import Experiment, dump_config
from fmprobe.data.manifest import Manifest, check_targets_vary, load_manifest
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.evaluate.results import SPLITS, ProbeResults, SegResults, SplitData, predictions_table
from fmprobe.evaluate.summary import summarise_run
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.experiments.efficiency import check_efficiency, efficiency_points, efficiency_table, wanted
from fmprobe.experiments.environment import environment_info
from fmprobe.experiments.identity import IDENTITY_VERSION, config_hash, head_identities
from fmprobe.experiments.index import update_index
from fmprobe.experiments.parallel import fold_share, gather_members
from fmprobe.experiments.params import backbone_parameters, record_parameters
from fmprobe.experiments.splitting import resolve_folds
from fmprobe.experiments.status import describe_error, write_status
from fmprobe.features.extract import extract_features
from fmprobe.features.store import FeatureSet
from fmprobe.probes.fitted import check_fitted
from fmprobe.probes.frozen import train_heads
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


class _Stage:
    """Which stage a run is in; on any exception, the run directory's status.json records it as failed there."""

    def __init__(self, run_dir: Path, digest: str):
        self.run_dir, self.digest, self.name = run_dir, digest, "start"

    @contextmanager
    def recorded(self) -> Iterator[_Stage]:
        try:
            yield self
        except BaseException as err:  # interrupted runs too: they did not finish
            if distributed.is_main():
                write_status(self.run_dir, "failed", config_hash=self.digest, stage=self.name,
                             error=describe_error(err))
                err.add_note(f"run directory: {self.run_dir} (status.json records the failure; a rerun starts a "
                             "new directory)")
            raise


def run_experiment(exp: Experiment, *, progress: bool = True) -> RunResult:
    started = time.perf_counter()
    # launched by torchrun / accelerate: join the other processes (fmprobe.distributed); else nothing changes
    distributed.init(cuda=exp.adapt.strategy != "frozen" and exp.adapt.device.startswith("cuda"))
    progress = progress and distributed.is_main()
    manifest = load_manifest(exp.data, exp.task)
    check_targets_vary(manifest)  # before any extraction
    folds = resolve_folds(manifest, exp.task, exp.split)
    if len(folds) > 1 and exp.adapt.strategy != "frozen":
        raise ConfigError("split.mode kfold runs frozen probes only; use split.mode generate with adapt strategies")
    check_segmentation(exp)
    check_grid(exp)
    check_fitted(exp)
    check_efficiency(exp)
    backbone_params, encoder = backbone_parameters(exp)  # frozen: memoised; the encoder if it had to be loaded

    # From here on the run has a directory; a failure is recorded in it (status.json) before it propagates.
    run_dir = distributed.broadcast_object(new_run_dir(exp) if distributed.is_main() else None)
    with _Stage(run_dir, config_hash(exp)).recorded() as stage:
        if distributed.is_main():
            write_text(run_dir / "config.resolved.yaml", dump_config(exp))
        stage.name = "extract"
        features = extract_features(exp, manifest, encoder, progress=progress)
        extracted = set(features.sample_ids)
        data = [_split_data(df[df["sample_id"].isin(extracted)], manifest) for df, _ in folds]
        split, split_info = data[0], folds[0][1]
        stage.name = "train"
        task = ResolvedTask.from_config(exp.task, manifest.class_names)
        results = _train(exp, task, features, folds, data, extracted, run_dir)
        if not distributed.is_main():  # process 0 alone writes the run
            return distributed.broadcast_object(None)
        if wanted(exp):  # every head again on labelled subsets of the training split
            results.efficiency = efficiency_points(exp, task, features, split, results)
        stage.name = "evaluate"
        grid_record = None
        if exp.train.grid is not None:  # per head, the member with the best mean validation score over seeds
            results, grid_record = select_members(exp, task, results, split)
        record_parameters(exp, results, run_dir, backbone_params)
        if len(data) > 1:
            split_info = {**split_info, "fold": None, "fold_sizes": [info["sizes"] for _, info in folds]}
        metrics = summarise_run(
            exp, task, results, split, split_info=split_info, skipped=features.skipped, config_hash=config_hash(exp),
            head_identities=head_identities(exp), identity_version=IDENTITY_VERSION, grid=grid_record,
            wall_seconds=time.perf_counter() - started,
        )  # fmt: skip
        stage.name = "write"
        curves = _write_outputs(run_dir, exp, task, results, split, metrics)
        stage.name = "tracking"
        log_run(exp, run_dir, metrics, curves)  # opt-in (tracking: in the config); a no-op otherwise
        write_status(run_dir, "finished", config_hash=config_hash(exp))
    return distributed.broadcast_object(RunResult(run_dir=run_dir, metrics=check_twins(exp, run_dir, metrics)))


def _train(exp: Experiment, task: ResolvedTask, features: FeatureSet, folds: list, data: list[SplitData],
           extracted: set[str], run_dir: Path) -> ProbeResults:  # fmt: skip
    """Every head x seed (x fold), frozen on the cached features or end to end on pixels."""
    results = ProbeResults()
    for k, fold in enumerate(data):
        if exp.adapt.strategy == "frozen":
            ckpt = run_dir / "checkpoints" / (f"fold{k}" if len(data) > 1 else "")
            part = train_heads(fold_share(exp, k), task, features, fold.ids, fold.targets, ckpt)
            if exp.segmentation is not None and distributed.is_main():  # its own probe on the same cached tokens
                part.segmentation = segment_frozen(exp, features, folds[0][0], fold.ids, ckpt)
        else:  # end to end on pixels (staged: stage 1 on these cached features); writes adaptation.json
            from fmprobe.adapt.finetune import adapt_heads  # peft and friends: imported only when needed

            part = adapt_heads(exp, task, features, folds[0][0][folds[0][0]["sample_id"].isin(extracted)], fold.ids,
                               fold.targets, run_dir)
        if len(data) > 1:
            for r in part.runs:
                r.fold, r.data = k, fold
        results.runs += part.runs
        results.standardisation.update(part.standardisation)
        results.segmentation = part.segmentation
        results.training_inputs = part.training_inputs
    if exp.adapt.strategy == "frozen":  # several processes: each trained its share of the members
        results = gather_members(exp, results)
    return results


def _write_outputs(run_dir: Path, exp: Experiment, task: ResolvedTask, results: ProbeResults, split: SplitData,
                   metrics: dict) -> pd.DataFrame:  # fmt: skip
    """predictions, curves, segmentation outputs, env.json, report.html, then metrics.json; returns the curves."""
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
    if "efficiency" in metrics:
        with atomic_path(run_dir / "efficiency.parquet") as tmp:
            pd.DataFrame(efficiency_table(metrics)).to_parquet(tmp, index=False)
    write_json(run_dir / "env.json", environment_info(seeds=exp.train.seeds, config_hash=config_hash(exp),
                                                      **distributed.describe()))
    write_run_report(run_dir, exp, metrics, curves)
    write_json(run_dir / "metrics.json", metrics)  # after everything it summarises
    return curves


def check_twins(exp: Experiment, run_dir: Path, metrics: dict) -> dict:
    """Compare this run's test outputs with every finished run's (the index does it under its write lock, so
    runs finishing together see each other) and return its metrics.json as the check left it: with
    ``identical_predictions`` / ``reproduced`` flags when it has twins (theirs are added to their files too)."""
    runs_dir = Path(exp.runs_dir).expanduser()
    try:
        update_index(runs_dir)
    except FmprobeError as err:  # the run itself is finished and recorded; the check reruns with the index
        warnings.warn(f"the run finished, but its outputs could not be compared with the other runs' ({err}); "
                      f"`fmprobe leaderboard --runs {runs_dir}` makes the comparison once that is fixed", stacklevel=2)
        return metrics
    return json.loads((run_dir / "metrics.json").read_text())


def write_segmentation_outputs(run_dir: Path, seg: SegResults) -> None:
    """``segmentation_curves.parquet`` and the first seed's predicted test masks (``segmentation_test_masks.npz``)."""
    curves = pd.DataFrame([{"decoder": r.name, "seed": r.seed, **row} for r in seg.runs for row in r.curves])
    with atomic_path(run_dir / "segmentation_curves.parquet") as tmp:
        curves.to_parquet(tmp, index=False)
    with atomic_path(run_dir / "segmentation_test_masks.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, sample_ids=np.array(seg.baseline.ids), **seg.test_masks)
