"""The extraction loop: manifest -> cached features, extracting only what the cache does not hold.

Samples are fingerprinted first (cheap: memoised hashes), so a fully cached run never loads the model.
Missing samples stream through a DataLoader into shards of ``features.shard_size`` rows, so memory does
not grow with the dataset and a killed run resumes where its last shard ended. The pipeline overlaps its
stages (pipeline.py): the next batches are read and preprocessed, and finished shards written, while the
encoder runs. Processes extracting into one cache at once split the missing samples by claims (claims.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fmprobe import distributed
from fmprobe.backbones.base import Encoder, Grid, InputSpec, spatial_grid
from fmprobe.config import DataConfig, Experiment, FeatureConfig, load_config
from fmprobe.data.dataset import MediaDataset, clip_starts, collate_samples
from fmprobe.data.manifest import Manifest, load_manifest
from fmprobe.data.transforms import Preprocess
from fmprobe.devices import config_device
from fmprobe.errors import ConfigError, EncoderError, ReaderError
from fmprobe.features.claims import Claim, ClaimedBatches, WorkClaims
from fmprobe.features.fingerprint import (
    FingerprintMemo,
    fingerprint_paths,
    with_clip_start,
)
from fmprobe.features.keys import (
    cache_key,
    check_cacheable,
    describe,
    remember_identity,
    remembered_identity,
)
from fmprobe.features.pipeline import ExtractionRate, Prefetch, StageSeconds, Throughput
from fmprobe.features.remote import local_cache_dir, open_store
from fmprobe.features.store import FeatureSet, FeatureStore

Identity = tuple[str, str, InputSpec]  # encoder name, fingerprint, input spec
Tick = Callable[[int, int], None]  # progress: (samples done, samples to do), after every batch
WAIT_SECONDS = 0.2  # how often a process with nothing left to claim looks whether the others are done


@dataclass
class Extraction:
    features: FeatureSet
    key: str
    extracted: int  # rows this run stored (all processes of a distributed run)
    cached: int  # samples it did not extract: stored before, or by another extraction meanwhile
    seconds: float
    samples_per_second: float | None = None  # measured after the first batches (pipeline.Throughput); None if
    # nothing (or too little) was extracted; in a distributed run, process 0's
    stages: StageSeconds = field(default_factory=StageSeconds)  # where process 0's extraction time went


@dataclass
class _Work:
    """What one process's extraction loop did."""

    extracted: int = 0  # rows committed
    handled: int = 0  # samples it claimed and went through (rows + skipped)
    samples_per_second: float | None = None
    stages: StageSeconds = field(default_factory=StageSeconds)


def extract_features(
    exp: Experiment, manifest: Manifest, encoder: Encoder | None = None, *, progress: Tick | None = None
) -> FeatureSet:
    """Features of every manifest sample (in manifest order, skipped samples in ``.skipped``), from the
    cache where present. ``encoder`` defaults to ``load_encoder(exp.model)``, loaded only if needed.
    ``progress(done, total)`` hears the samples extracted after every batch (not called when everything is
    cached)."""
    return run_extraction(exp, manifest, encoder, progress=progress).features


def extract_command(config_path: str | Path, progress: Tick | None = None) -> dict[str, Any]:
    """``fmprobe extract CONFIG``: fill the feature cache for an experiment; returns a summary."""
    exp = load_config(config_path)
    manifest = load_manifest(exp.data, exp.task)
    result = run_extraction(exp, manifest, progress=progress)
    return {
        "experiment": exp.name,
        "store": str(result.features.store_dir),
        "key": result.key,
        "samples": len(manifest.df),
        "extracted": result.extracted,
        "cached": result.cached,
        "skipped": len(result.features.skipped),
        "layers": result.features.layers,
        "seconds": round(result.seconds, 2),
        "samples_per_second": None if result.samples_per_second is None else round(result.samples_per_second, 2),
    }


def run_extraction(
    exp: Experiment,
    manifest: Manifest,
    encoder: Encoder | None = None,
    *,
    progress: Tick | None = None,
    on_batch: Callable[[ExtractionRate], None] | None = None,
) -> Extraction:
    """Like :func:`extract_features`, plus the key, how many samples were extracted vs served from the cache, the
    measured throughput and where the time went. ``on_batch`` is called after every batch with the samples done so
    far and the throughput measured after the first batches (for a time estimate while the work runs)."""
    start = time.perf_counter()
    check_cacheable(exp)
    distributed.init()
    cache_dir = local_cache_dir(exp.features.cache_dir)  # this machine's state (a remote cache's mirror)
    df = manifest.df
    ids = df["sample_id"].astype(str).tolist()
    paths = df["path"].astype(str).tolist()

    part = distributed.block(len(paths))  # several processes: each hashes its block of samples
    prints = distributed.gather_blocks(_fingerprints(cache_dir, [paths[i] for i in part], [ids[i] for i in part]))
    unreadable: dict[str, str] = {}
    for found in prints:
        if isinstance(found, ReaderError):
            if exp.data.on_error == "raise":
                raise found
            unreadable[found.sample_id] = found.reason
    starts = clip_starts(df, exp.data)  # a window of a long video: part of the sample's identity
    keys = [(sid, with_clip_start(fp, start) if isinstance(fp, str) else "")
            for sid, fp, start in zip(ids, prints, starts)]

    # One process decides the key and what is missing, so that all processes agree on it.
    plan = _plan(exp, cache_dir, encoder, keys, unreadable, paths) if distributed.is_main() else None
    identity, todo = distributed.broadcast_object(None if plan is None else plan[:2])
    encoder = plan[2] if plan is not None else encoder
    store = open_store(exp.features.cache_dir, cache_key(describe(exp, *identity)), describe(exp, *identity))
    # Each process extracts whole batches, dealt round-robin: every batch holds the samples it would hold
    # in one process, so the features are the same bits.
    size = exp.features.batch_size
    mine = [i for b in distributed.round_robin(math.ceil(len(todo) / size)) for i in todo[b * size : (b + 1) * size]]
    work = _Work()
    if mine:
        if encoder is None:  # a process other than 0 (which loaded it while planning)
            encoder = _load(exp)
            if _identity(exp, cache_dir, encoder) != identity:
                raise EncoderError(f"process {distributed.rank()} loaded another model than process 0 did "
                                   f"({encoder.name}); every process must see the same model files")
        work = _extract(exp, encoder, store, [keys[i] for i in mine], [paths[i] for i in mine],
                        [starts[i] for i in mine], progress if distributed.is_main() else None, on_batch)
    counts = distributed.all_gather_object((work.extracted, work.handled))  # also waits until all is committed
    features = store.feature_set(keys, unreadable)
    cached = len(keys) - len(unreadable) - sum(handled for _, handled in counts)
    return Extraction(features, cache_key(store.description), sum(extracted for extracted, _ in counts), cached,
                      time.perf_counter() - start, work.samples_per_second, work.stages)


def _fingerprints(cache_dir: Path, paths: list[str], ids: list[str]) -> list[str | ReaderError]:
    memo = FingerprintMemo(cache_dir)
    try:
        return fingerprint_paths(paths, ids, memo)
    finally:
        memo.close()


def _plan(
    exp: Experiment, cache_dir: Path, encoder: Encoder | None, keys: list[tuple[str, str]], unreadable: dict[str, str],
    paths: list[str],
) -> tuple[Identity, list[int], Encoder | None]:
    """The encoder identity that keys the store, the positions of the samples the store lacks, and the
    encoder if it had to be loaded (a fully cached run never loads it)."""
    identity = None if encoder is not None else remembered_identity(exp.model, cache_dir)
    if identity is None:
        encoder = encoder if encoder is not None else _load(exp)
        identity = _identity(exp, cache_dir, encoder)
    check_compatible(exp.data, identity[2], identity[0], exp.features)
    todo = _missing(exp, cache_dir, identity, keys, unreadable, paths)
    if todo and encoder is None:
        encoder = _load(exp)
        actual = _identity(exp, cache_dir, encoder)
        if actual != identity:  # the remembered identity was stale: key by the real one
            identity, todo = actual, _missing(exp, cache_dir, actual, keys, unreadable, paths)
    return identity, todo, encoder


def _load(exp: Experiment) -> Encoder:
    from fmprobe.backbones.registry import load_encoder

    return load_encoder(exp.model)


def _identity(exp: Experiment, cache_dir: Path, encoder: Encoder) -> Identity:
    """The encoder's identity, remembered for its model config however it was loaded (here, or by a run counting
    its parameters), so that the next fully cached run of that model need not load it."""
    identity = (encoder.name, encoder.fingerprint(), encoder.input_spec)
    remember_identity(exp.model, cache_dir, *identity)
    return identity


def _missing(
    exp: Experiment,
    cache_dir: Path,
    identity: Identity,
    keys: list[tuple[str, str]],
    unreadable: dict[str, str],
    paths: list[str],
) -> list[int]:
    """The positions of the samples the store for this identity lacks."""
    description = describe(exp, *identity)
    index = open_store(exp.features.cache_dir, cache_key(description), description).scan()
    todo = []
    for i, sample in enumerate(keys):
        if sample[0] in unreadable or sample in index.rows:
            continue
        if sample in index.skipped:
            if exp.data.on_error == "raise":
                reason = f"{index.skipped[sample]} (recorded by an earlier run)"
                raise ReaderError(reason, sample_id=sample[0], path=paths[i])
            continue
        todo.append(i)
    return todo


def check_compatible(data: DataConfig, spec: InputSpec, name: str, features: FeatureConfig | None = None) -> None:
    """A volume goes in as a slice stack (video encoders), as single slices (image encoders) or whole (3D encoders,
    whose token grid is (x, y, z): there is no time axis to pool, and ``token_grid`` would pool two of three axes)."""
    if spec.kind == "volume":  # the data side is checked by Preprocess, which every path builds
        if features is not None and (features.temporal_pool or features.token_grid is not None):
            raise ConfigError(f"features.temporal_pool / token_grid pool a (time, height, width) grid, but {name}'s "
                              "tokens lie on an (x, y, z) grid; remove them")
        return
    if data.kind != "volume":
        return
    if data.volume_mode == "stack" and spec.kind != "video":
        raise ConfigError(
            f"data.volume_mode: stack feeds each volume as a slice stack, which needs a video encoder, but {name} "
            "is an image encoder; set data.volume_mode: slices (or use a video model)"
        )
    if data.volume_mode == "slices" and spec.kind != "image":
        raise ConfigError(
            f"data.volume_mode: slices feeds single 2D slices, which needs an image encoder, but {name} is a "
            "video encoder; set data.volume_mode: stack (or use an image model)"
        )


def _extract(
    exp: Experiment,
    encoder: Encoder,
    store: FeatureStore,
    keys: list[tuple[str, str]],
    paths: list[str],
    starts: list[int | None],
    progress: Tick | None,
    on_batch: Callable[[ExtractionRate], None] | None,
) -> _Work:
    """Extract the samples of ``keys`` into ``store``, sharing them with any other process extracting into it.

    Work is claimed one batch at a time (claims.py); each pass streams claimed batches through the loader until
    nothing is left to claim and hands its last rows to the writer, then the process waits for the batches others
    still hold (taking over those of a process that died) and makes another pass if any came free.
    """
    rows = pd.DataFrame({"sample_id": [k[0] for k in keys], "path": paths, "clip_start": starts})
    dataset = MediaDataset(rows, exp.data, Preprocess(encoder.input_spec, exp.data, train=False))
    device = config_device(exp.features.device, "features.device")
    claims = WorkClaims(store, keys, exp.features.batch_size)
    work = _Work()
    rate = Throughput(len(keys), on_batch)
    was_training = encoder.training
    encoder.eval().to(device)
    try:
        with torch.inference_mode(), store.writer(exp.features.shard_size) as writer:
            while (first := _next_batch(claims)) is not None:
                sampler = ClaimedBatches(claims, first)
                loader = DataLoader(dataset, batch_sampler=sampler, num_workers=exp.data.num_workers,
                                    collate_fn=collate_samples, pin_memory=device.type == "cuda")
                rate.start_pass()
                # on the CPU, decoding and preprocessing take one core's share from the encoder's threads; on a
                # GPU the cores are theirs
                with Prefetch(iter(loader), one_torch_thread=device.type == "cpu") as batches:
                    for batch in batches:
                        for index, sample_id, message in batch["errors"]:
                            reason = _reason(message, sample_id, paths[index])
                            if exp.data.on_error == "raise":
                                raise ReaderError(reason, sample_id=sample_id, path=paths[index])
                            writer.skip(sample_id, keys[index][1], reason)
                        if batch["pixels"] is not None:
                            arrays, grids = encode_batch(encoder, batch["pixels"], exp.model.layers, exp.features,
                                                         work.stages)
                            buffering = time.perf_counter()
                            writer.add(batch["sample_id"], [keys[i][1] for i in batch["index"].tolist()], arrays, grids)
                            work.stages.buffer += time.perf_counter() - buffering
                        n = len(batch["sample_id"]) + len(batch["errors"])
                        work.handled += n
                        work.stages.read += batch["seconds"][0]
                        work.stages.preprocess += batch["seconds"][1]
                        rate.batch(n)
                        if progress:  # None (or False, as callers that want no progress pass)
                            progress(rate.done + claims.done_elsewhere, len(keys))
                        writer.after_commit(partial(claims.release, sampler.claim_of_next()))
                work.stages.input_wait += batches.wait_seconds
                writer.submit()  # others may wait for these rows' claims while this process waits for theirs
    finally:
        claims.release_all()  # after the writer committed what was computed (also on errors)
        encoder.train(was_training)
    work.extracted = writer.committed
    work.stages.write, work.stages.write_wait = writer.write_seconds, writer.wait_seconds
    work.samples_per_second = rate.samples_per_second
    return work


def _next_batch(claims: WorkClaims) -> Claim | None:
    """Claim the next batch, waiting while other processes hold the samples still missing; None when all are stored."""
    while (claim := claims.take()) is None and claims.waiting_on:
        time.sleep(WAIT_SECONDS)
    return claim


def _reason(message: str, sample_id: str, path: str) -> str:
    """The dataset's message without the "sample ..., file ...: " prefix that ReaderError adds again."""
    prefix = str(ReaderError("", sample_id=sample_id, path=path))
    return message[len(prefix) :] if message.startswith(prefix) else message


def encoder_batch(encoder: Encoder, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, K, T, 3, H, W]`` samples (``[B, K, 1, x, y, z]`` for a 3D encoder) -> what the encoder takes: whole
    clips or volumes ``[B*K, ...]`` (video and volume encoders) or frames ``[B*K*T, 3, H, W]`` (image encoders)."""
    b, k, t = pixels.shape[:3]
    if encoder.input_spec.kind == "image":
        return pixels.reshape(b * k * t, *pixels.shape[3:])
    return pixels.reshape(b * k, *pixels.shape[2:])


def encode_batch(
    encoder: Encoder,
    pixels: torch.Tensor,
    layers: list[int | str],
    features: FeatureConfig,
    stages: StageSeconds | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Grid | None]]:
    """Encode a batch of samples (see :func:`encoder_batch`) into the arrays a shard stores (see store.py), per layer.

    A video (volume) encoder takes each clip (volume); an image encoder takes each frame, its tokens stacked along
    t and its CLS tokens averaged over frames. The K clips of a sample are averaged. The forward and pooling time
    are added to ``stages`` when given.
    """
    start = time.perf_counter()
    b, k, t = pixels.shape[:3]
    pixels = pixels.to(next(encoder.parameters()).device, non_blocking=True)  # asynchronous from pinned memory
    video = encoder.input_spec.kind != "image"
    out = encoder.encode(encoder_batch(encoder, pixels), list(layers))
    forward_end = time.perf_counter()
    arrays: dict[str, np.ndarray] = {}
    grids: dict[str, Grid | None] = {}
    for i, layer in enumerate(layers):
        name = str(layer)
        tokens = out.tokens[name].float()
        n, d = tokens.shape[1:]
        grid = frames_grid(out.grid[name], t, video)
        tokens = tokens.reshape(b, k, -1, d).mean(1)  # [B, Ntok, D], clips averaged
        arrays[f"L{i}.mean"] = tokens.mean(1).cpu().numpy()
        prefix = out.prefix.get(name)
        if prefix is not None and prefix.shape[1] > 0:
            arrays[f"L{i}.cls"] = prefix[:, 0].float().reshape(b, -1, d).mean(1).cpu().numpy()
        if features.store_tokens:
            tokens, grid = pool_tokens(tokens, grid, features.token_grid, features.temporal_pool, point=name)
            arrays[f"L{i}.tokens"] = tokens.to(torch.float16).cpu().numpy()
        grids[name] = grid
    if stages is not None:
        stages.forward += forward_end - start
        stages.pooling += time.perf_counter() - forward_end
    return arrays, grids


def frames_grid(grid: Grid | None, frames: int, video: bool) -> Grid | None:
    """A point's grid over a sample: an image encoder's per-frame tokens are stacked along t (a grid-less token set
    stays one, its frames' sets concatenated)."""
    if grid is None or video:
        return None if grid is None else tuple(grid)
    return frames * grid[0], grid[1], grid[2]


def pool_tokens(
    tokens: torch.Tensor, grid: Grid | None, token_grid: list[int] | None, temporal_pool: bool, *, point: str
) -> tuple[torch.Tensor, Grid | None]:
    """Average ``[B, t*h*w, D]`` tokens over time and/or adaptively down to ``token_grid`` (h, w); a grid-less
    token set passes unchanged, and is refused when asked to be pooled over positions."""
    if grid is None and token_grid is None and not temporal_pool:
        return tokens, None
    b, _, d = tokens.shape
    t, h, w = spatial_grid(grid, point, "features.token_grid / temporal_pool")
    x = tokens.reshape(b, t, h, w, d)
    if temporal_pool:
        x, t = x.mean(1, keepdim=True), 1
    if token_grid is not None and tuple(token_grid) != (h, w):
        gh, gw = token_grid
        if gh > h or gw > w:
            raise ConfigError(
                f"features.token_grid {token_grid} is larger than the encoder's token grid ({h}, {w}); "
                f"pooling can only shrink it: use at most [{h}, {w}] or remove token_grid"
            )
        x = F.adaptive_avg_pool2d(x.permute(0, 1, 4, 2, 3).reshape(b * t, d, h, w), (gh, gw))
        x, h, w = x.reshape(b, t, d, gh, gw).permute(0, 1, 3, 4, 2), gh, gw
    return x.reshape(b, t * h * w, d), (t, h, w)
