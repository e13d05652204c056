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
import shutil
import time
import uuid
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
from fmprobe.backbones.base import Encoder, InputSpec
from fmprobe.config import FITTED_HEADS, Experiment, dump_config
from fmprobe.data.manifest import Manifest, check_targets_vary, load_manifest
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.evaluate.results import SPLITS, ProbeResults, SegResults, SplitData, predictions_table
from fmprobe.evaluate.summary import summarise_run
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.experiments.advice import upsampling_warning
from fmprobe.experiments.clock import GroupPlan, RunClock, finish_estimate
from fmprobe.experiments.efficiency import check_efficiency, efficiency_points, efficiency_table, wanted
from fmprobe.experiments.environment import environment_info
from fmprobe.experiments.identity import IDENTITY_VERSION, config_hash, head_identities
from fmprobe.experiments.index import update_index
from fmprobe.experiments.parallel import fold_share, gather_members
from fmprobe.experiments.params import backbone_parameters, record_parameters
from fmprobe.experiments.runner_up import compare_runner_up
from fmprobe.experiments.splitting import resolve_folds
from fmprobe.experiments.status import describe_error, write_status
from fmprobe.features.extract import Tick, extract_features
from fmprobe.features.keys import remembered_identity
from fmprobe.features.remote import local_cache_dir
from fmprobe.features.store import FeatureSet
from fmprobe.forks import fork_map
from fmprobe.probes.fitted import check_fitted
from fmprobe.probes.frozen import member_groups, train_arms, train_heads
from fmprobe.probes.grid import check_grid, select_members
from fmprobe.probes.segmentation import check_segmentation, segment_frozen
from fmprobe.report.html import write_run_report
from fmprobe.report.progress import Progress
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


@dataclass
class RunInputs:
    """What a run reads: the manifest, its folds, the cached features and each fold's split data. Runs on the same
    data, task, split and features read the same inputs (a sweep's arms load them once: ``run_arms``)."""

    manifest: Manifest
    folds: list[tuple[pd.DataFrame, dict]]  # (manifest rows with their split, split info) per fold
    backbone_params: int | None
    features: FeatureSet | None = None
    data: list[SplitData] | None = None  # per fold, the extracted samples


def checked_inputs(exp: Experiment) -> tuple[RunInputs, Encoder | None]:
    """Manifest and splits, after every check that needs no extraction; the encoder if counting its parameters
    loaded it."""
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
    return RunInputs(manifest, folds, backbone_params), encoder


def load_features(exp: Experiment, inputs: RunInputs, encoder: Encoder | None, progress: Tick | None) -> None:
    """The cached features (extracting what is missing; ``progress(done, total)`` after every batch) and each
    fold's split data, into ``inputs``."""
    inputs.features = extract_features(exp, inputs.manifest, encoder, progress=progress)
    extracted = set(inputs.features.sample_ids)
    inputs.data = [_split_data(df[df["sample_id"].isin(extracted)], inputs.manifest) for df, _ in inputs.folds]


def run_experiment(exp: Experiment, *, progress: bool | Progress = True) -> RunResult:
    """``progress``: draw progress and estimates on stdout (True), nothing (False), or on a given display."""
    started = time.perf_counter()
    # launched by torchrun / accelerate: join the other processes (fmprobe.distributed); else nothing changes
    distributed.init(cuda=exp.adapt.strategy != "frozen" and exp.adapt.device.startswith("cuda"))
    display = progress if isinstance(progress, Progress) else Progress(enabled=progress)
    if distributed.is_main():
        finish = finish_estimate(Path(exp.runs_dir).expanduser(), exp.task.type, len(exp.heads), display.clock)
        clock = RunClock(display, exp.name, finish=finish)
    else:
        clock = RunClock(Progress.off(), exp.name)
    clock.phase("prepare")
    inputs, encoder = checked_inputs(exp)
    warning = upsampling_warning(exp, inputs.manifest, input_spec(exp, encoder)) if distributed.is_main() else None
    if warning:
        clock.display.line(f"warning: {warning}")

    # From here on the run has a directory; a failure is recorded in it (status.json) before it propagates.
    run_dir = distributed.broadcast_object(new_run_dir(exp) if distributed.is_main() else None)
    with _Stage(run_dir, config_hash(exp)).recorded() as stage:
        if distributed.is_main():
            write_text(run_dir / "config.resolved.yaml", dump_config(exp))
        stage.name = "extract"
        clock.phase("extract")
        load_features(exp, inputs, encoder, clock.extraction(exp.name))
        assert inputs.data is not None
        stage.name = "train"
        task = ResolvedTask.from_config(exp.task, inputs.manifest.class_names)
        clock.phase("train")
        clock.plan_training(training_plan(exp, task, len(inputs.data)))
        results = _train(exp, task, inputs, run_dir, clock)
        if not distributed.is_main():  # process 0 alone writes the run
            return distributed.broadcast_object(None)
        if wanted(exp):  # every head again on labelled subsets of the training split
            results.efficiency = efficiency_points(exp, task, inputs.features, inputs.data[0], results)
        metrics = _finish(exp, task, inputs, results, stage, started, clock)
    return distributed.broadcast_object(RunResult(run_dir=run_dir, metrics=check_twins(exp, run_dir, metrics)))


def run_arms(exps: list[Experiment]) -> list[RunResult | Exception]:
    """Runs of one ``probes.frozen.shared_training`` key (arms of a sweep) in one process: their inputs loaded
    once, their heads trained together (``probes.frozen.train_arms``), then each run finished as ``run_experiment``
    finishes it, with the same metrics bit for bit, the arms side by side in forked copies of this process
    (``forks.fork_map``: bootstrap, files and figures are one core's work per arm); then, in order, each arm's
    outputs are compared with every finished run's (twin flags, as runs one after the other get them once all
    have run). An arm's ``wall_seconds`` counts from the start of the shared work.

    A failure of the shared work raises before any run directory exists (checkpoints wait in a staging folder),
    so the caller can run the arms alone and each record its own outcome; a failure while finishing an arm is
    recorded in its run and returned in its place."""
    started = time.perf_counter()
    inputs, encoder = checked_inputs(exps[0])
    load_features(exps[0], inputs, encoder, None)
    assert inputs.features is not None and inputs.data is not None
    task = ResolvedTask.from_config(exps[0].task, inputs.manifest.class_names)
    staging = Path(exps[0].runs_dir).expanduser() / exps[0].name / f".arms-{uuid.uuid4().hex}"
    try:
        results = [ProbeResults() for _ in exps]
        for k, fold in enumerate(inputs.data):
            roots = [fold_checkpoints(staging / str(i), k, len(inputs.data)) for i in range(len(exps))]
            parts = train_arms(exps, task, inputs.features, fold.ids, fold.targets, roots)
            for arm, part in zip(results, parts):
                add_fold(arm, part, k, inputs.data)

        def finish(i: int) -> RunResult | Exception:
            exp, stage = exps[i], _Stage(new_run_dir(exps[i]), config_hash(exps[i]))
            try:
                with stage.recorded():
                    write_text(stage.run_dir / "config.resolved.yaml", dump_config(exp))
                    _adopt_checkpoints(results[i], staging / str(i), stage.run_dir)
                    metrics = _finish(exp, task, inputs, results[i], stage, started, RunClock(Progress.off(), exp.name))
                return RunResult(run_dir=stage.run_dir, metrics=metrics)
            except Exception as err:  # recorded in its run; the other arms go on
                return err

        out = fork_map(finish, range(len(exps)))  # the arms finished side by side, then compared in order
        for i, done in enumerate(out):
            if isinstance(done, RunResult):
                try:
                    done.metrics = check_twins(exps[i], done.run_dir, done.metrics)
                except Exception as err:
                    out[i] = err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _adopt_checkpoints(results: ProbeResults, staged: Path, run_dir: Path) -> None:
    """Move an arm's checkpoints from the staging folder into its run directory."""
    if (staged / "checkpoints").exists():
        (staged / "checkpoints").rename(run_dir / "checkpoints")
    for run in results.runs:
        if run.checkpoint_dir is not None:
            run.checkpoint_dir = run_dir / run.checkpoint_dir.relative_to(staged)


def _train(exp: Experiment, task: ResolvedTask, inputs: RunInputs, run_dir: Path, clock: RunClock) -> ProbeResults:
    """Every head x seed (x fold), frozen on the cached features or end to end on pixels; ``clock`` hears every
    epoch (progress and the run's estimate)."""
    features, folds, data = inputs.features, inputs.folds, inputs.data
    assert features is not None and data is not None
    extracted = set(features.sample_ids)
    results = ProbeResults()
    for k, fold in enumerate(data):
        if exp.adapt.strategy == "frozen":
            part = train_heads(fold_share(exp, k), task, features, fold.ids, fold.targets,
                               fold_checkpoints(run_dir, k, len(data)), on_epoch=clock.on_epoch)  # fmt: skip
            if exp.segmentation is not None and distributed.is_main():  # its own probe on the same cached tokens
                part.segmentation = segment_frozen(exp, features, folds[0][0], fold.ids,
                                                   fold_checkpoints(run_dir, k, len(data)),
                                                   on_epoch=clock.on_epoch)  # fmt: skip
        else:  # end to end on pixels (staged: stage 1 on these cached features); writes adaptation.json
            from fmprobe.adapt.finetune import adapt_heads  # peft and friends: imported only when needed

            part = adapt_heads(exp, task, features, folds[0][0][folds[0][0]["sample_id"].isin(extracted)], fold.ids,
                               fold.targets, run_dir, on_epoch=clock.on_epoch)  # fmt: skip
        add_fold(results, part, k, data)
    clock.end_training()
    if exp.adapt.strategy == "frozen":  # several processes: each trained its share of the members
        results = gather_members(exp, results)
    return results


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
    results.training_inputs = part.training_inputs


def _finish(exp: Experiment, task: ResolvedTask, inputs: RunInputs, results: ProbeResults, stage: _Stage,
            started: float, clock: RunClock) -> dict:  # fmt: skip
    """Evaluate (grid selection, metrics.json, the runner-up comparison), write the outputs, track; returns the
    metrics. ``clock`` shows the evaluation's progress and records the phases' timing."""
    assert inputs.features is not None and inputs.data is not None
    split, split_info, folds = inputs.data[0], inputs.folds[0][1], inputs.folds
    stage.name = "evaluate"
    grid_record = None
    if exp.train.grid is not None:  # per head, the member with the best mean validation score over seeds
        results, grid_record = select_members(exp, task, results, split)
    record_parameters(exp, results, stage.run_dir, inputs.backbone_params)
    if len(inputs.data) > 1:
        split_info = {**split_info, "fold": None, "fold_sizes": [info["sizes"] for _, info in folds]}
    clock.phase("evaluate")
    evaluation = clock.display.step(f"evaluate {exp.name}", "heads", len(exp.heads))
    metrics = summarise_run(
        exp, task, results, split, split_info=split_info, skipped=inputs.features.skipped,
        config_hash=config_hash(exp), head_identities=head_identities(exp), identity_version=IDENTITY_VERSION,
        grid=grid_record, wall_seconds=time.perf_counter() - started,
        on_head=lambda done, total: evaluation.update(done, total, detail=f"{exp.eval.bootstrap} bootstrap "
                                                                          "resamples"),
    )  # fmt: skip
    runner_up = compare_runner_up(exp, task, results, split, metrics)
    if runner_up is not None:
        metrics["selection"]["runner_up"] = runner_up
    evaluation.finish("bootstrap CIs, baselines, flags")
    stage.name = "write"
    curves = _write_outputs(stage.run_dir, exp, task, results, split, metrics, clock)
    stage.name = "tracking"
    log_run(exp, stage.run_dir, metrics, curves)  # opt-in (tracking: in the config); a no-op otherwise
    write_status(stage.run_dir, "finished", config_hash=config_hash(exp))
    return metrics


def _write_outputs(run_dir: Path, exp: Experiment, task: ResolvedTask, results: ProbeResults, split: SplitData,
                   metrics: dict, clock: RunClock) -> pd.DataFrame:  # fmt: skip
    """predictions, curves, segmentation outputs, env.json, report.html, then metrics.json (with the run's timing);
    returns the curves."""
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
    clock.phase("report")
    write_run_report(run_dir, exp, metrics, curves)
    metrics["timing"] = clock.finish()
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



def input_spec(exp: Experiment, encoder: Encoder | None) -> InputSpec | None:
    """The encoder's input without loading it: from the loaded encoder, or as remembered with the feature cache."""
    if encoder is not None:
        return encoder.input_spec
    remembered = remembered_identity(exp.model, local_cache_dir(exp.features.cache_dir))
    return None if remembered is None else remembered[2]


def training_plan(exp: Experiment, task: ResolvedTask, n_folds: int) -> list[GroupPlan]:
    """The fits this process will train, per member group, for the run's progress and estimate."""
    fits = sum(len(fold_share(exp, k).train.seeds) for k in range(n_folds))
    frozen = [GroupPlan(tuple(m.name for m in members), fits, exp.train.epochs, task.primary, task.lower_is_better)
              for members in member_groups(exp) if members[0].head.type not in FITTED_HEADS]  # fmt: skip
    strategy = exp.adapt.strategy
    if strategy == "frozen":
        plan = frozen
    else:
        epochs = exp.adapt.stage2.epochs if strategy == "staged" else exp.train.epochs
        plan = (frozen if strategy == "staged" else []) + [
            GroupPlan((h.name,), len(exp.train.seeds), epochs, task.primary, task.lower_is_better, strategy == "staged")
            for h in exp.heads]  # fmt: skip
    if exp.segmentation is not None and strategy == "frozen" and distributed.is_main():
        plan.append(GroupPlan(("segmentation",), n_folds * len(exp.train.seeds), exp.train.epochs, "miou", False))
    return plan

def write_segmentation_outputs(run_dir: Path, seg: SegResults) -> None:
    """``segmentation_curves.parquet`` and the first seed's predicted test masks (``segmentation_test_masks.npz``)."""
    curves = pd.DataFrame([{"decoder": r.name, "seed": r.seed, **row} for r in seg.runs for row in r.curves])
    with atomic_path(run_dir / "segmentation_curves.parquet") as tmp:
        curves.to_parquet(tmp, index=False)
    with atomic_path(run_dir / "segmentation_test_masks.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, sample_ids=np.array(seg.baseline.ids), **seg.test_masks)
