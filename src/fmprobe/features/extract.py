"""The extraction loop: manifest -> cached features, extracting only what the cache does not hold.

Samples are fingerprinted first (cheap: memoised hashes), so a fully cached run never loads the model.
Missing samples stream through a DataLoader into shards of ``features.shard_size`` rows, so memory does
not grow with the dataset and a killed run resumes where its last shard ended.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text
from torch.utils.data import DataLoader

from fmprobe import distributed
from fmprobe.backbones.base import Encoder, InputSpec
from fmprobe.config import DataConfig, Experiment, FeatureConfig, load_config
from fmprobe.data.dataset import MediaDataset, clip_starts, collate_samples
from fmprobe.data.manifest import Manifest, load_manifest
from fmprobe.data.transforms import Preprocess
from fmprobe.devices import config_device
from fmprobe.errors import ConfigError, EncoderError, ReaderError
from fmprobe.features.fingerprint import FingerprintMemo, fingerprint_paths, with_clip_start
from fmprobe.features.keys import cache_key, check_cacheable, describe, remember_identity, remembered_identity
from fmprobe.features.remote import local_cache_dir, open_store
from fmprobe.features.store import FeatureSet, FeatureStore

Identity = tuple[str, str, InputSpec]  # encoder name, fingerprint, input spec


@dataclass
class Extraction:
    features: FeatureSet
    key: str
    extracted: int
    cached: int
    seconds: float


def extract_features(
    exp: Experiment, manifest: Manifest, encoder: Encoder | None = None, *, progress: bool = True
) -> FeatureSet:
    """Features of every manifest sample (in manifest order, skipped samples in ``.skipped``), from the
    cache where present. ``encoder`` defaults to ``load_encoder(exp.model)``, loaded only if needed."""
    return run_extraction(exp, manifest, encoder, progress=progress).features


def extract_command(config_path: str | Path) -> dict[str, Any]:
    """``fmprobe extract CONFIG``: fill the feature cache for an experiment; returns a summary."""
    exp = load_config(config_path)
    manifest = load_manifest(exp.data, exp.task)
    result = run_extraction(exp, manifest, progress=True)
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
    }


def run_extraction(
    exp: Experiment, manifest: Manifest, encoder: Encoder | None = None, *, progress: bool = True
) -> Extraction:
    """Like :func:`extract_features`, plus the key and how many samples were extracted vs served from the cache."""
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
    extracted = 0
    if mine:
        if encoder is None:  # a process other than 0 (which loaded it while planning)
            encoder = _load(exp, cache_dir)
            if (encoder.name, encoder.fingerprint(), encoder.input_spec) != identity:
                raise EncoderError(f"process {distributed.rank()} loaded another model than process 0 did "
                                   f"({encoder.name}); every process must see the same model files")
        extracted = _extract(exp, encoder, store, mine, [paths[i] for i in mine], [keys[i] for i in mine],
                             progress and distributed.is_main(), [starts[i] for i in mine])
    extracted = sum(distributed.all_gather_object(extracted))  # also waits until every shard is committed
    features = store.feature_set(keys, unreadable)
    cached = len(keys) - len(unreadable) - len(todo)
    return Extraction(features, cache_key(store.description), extracted, cached, time.perf_counter() - start)


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
    if encoder is not None:
        identity: Identity = (encoder.name, encoder.fingerprint(), encoder.input_spec)
    else:
        remembered = remembered_identity(exp.model, cache_dir)
        if remembered is None:
            encoder = _load(exp, cache_dir)
            remembered = (encoder.name, encoder.fingerprint(), encoder.input_spec)
        identity = remembered
    check_compatible(exp.data, identity[2], identity[0], exp.features)
    todo = _missing(exp, cache_dir, identity, keys, unreadable, paths)
    if todo and encoder is None:
        encoder = _load(exp, cache_dir)
        actual = (encoder.name, encoder.fingerprint(), encoder.input_spec)
        if actual != identity:  # the remembered identity was stale: key by the real one
            identity, todo = actual, _missing(exp, cache_dir, actual, keys, unreadable, paths)
    return identity, todo, encoder


def _load(exp: Experiment, cache_dir: Path) -> Encoder:
    from fmprobe.backbones.registry import load_encoder

    encoder = load_encoder(exp.model)
    remember_identity(exp.model, cache_dir, encoder.name, encoder.fingerprint(), encoder.input_spec)
    return encoder


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
    todo: list[int],
    paths: list[str],
    keys: list[tuple[str, str]],
    progress: bool,
    starts: list[int | None],
) -> int:
    """Extract the ``todo`` samples into ``store``; returns how many rows were written."""
    rows = pd.DataFrame({"sample_id": [k[0] for k in keys], "path": paths, "clip_start": starts})
    dataset = MediaDataset(rows, exp.data, Preprocess(encoder.input_spec, exp.data, train=False))
    loader = DataLoader(
        dataset,
        batch_size=exp.features.batch_size,
        num_workers=exp.data.num_workers,
        collate_fn=collate_samples,
        persistent_workers=False,
    )
    writer = store.writer(exp.features.shard_size)
    was_training = encoder.training
    encoder.eval().to(config_device(exp.features.device, "features.device"))
    bar = Progress(
        TextColumn("extracting {task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
        TimeRemainingColumn(), disable=not progress,
    )
    try:
        with bar, torch.inference_mode():
            task = bar.add_task(encoder.name, total=len(todo))
            for batch in loader:
                for index, sample_id, message in batch["errors"]:
                    reason = _reason(message, sample_id, paths[index])
                    if exp.data.on_error == "raise":
                        raise ReaderError(reason, sample_id=sample_id, path=paths[index])
                    writer.skip(sample_id, keys[index][1], reason)
                if batch["pixels"] is not None:
                    arrays, grids = encode_batch(encoder, batch["pixels"], exp.model.layers, exp.features)
                    writer.add(batch["sample_id"], [keys[i][1] for i in batch["index"].tolist()], arrays, grids)
                bar.advance(task, len(batch["sample_id"]) + len(batch["errors"]))
    finally:
        writer.flush()  # also on errors: what was computed is kept
        encoder.train(was_training)
    return writer.committed


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
    encoder: Encoder, pixels: torch.Tensor, layers: list[int | str], features: FeatureConfig
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int, int]]]:
    """Encode a batch of samples (see :func:`encoder_batch`) into the arrays a shard stores (see store.py), per layer.

    A video (volume) encoder takes each clip (volume); an image encoder takes each frame, its tokens stacked along
    t and its CLS tokens averaged over frames. The K clips of a sample are averaged.
    """
    b, k, t = pixels.shape[:3]
    pixels = pixels.to(next(encoder.parameters()).device)
    video = encoder.input_spec.kind != "image"
    out = encoder.encode(encoder_batch(encoder, pixels), list(layers))
    arrays: dict[str, np.ndarray] = {}
    grids: dict[str, tuple[int, int, int]] = {}
    for i, layer in enumerate(layers):
        name = str(layer)
        tokens = out.tokens[name].float()
        n, d = tokens.shape[1:]
        grid = tuple(out.grid[name])
        if not video:
            grid = (t * grid[0], grid[1], grid[2])
        tokens = tokens.reshape(b, k, -1, d).mean(1)  # [B, Ntok, D], clips averaged
        arrays[f"L{i}.mean"] = tokens.mean(1).cpu().numpy()
        prefix = out.prefix.get(name)
        if prefix is not None and prefix.shape[1] > 0:
            arrays[f"L{i}.cls"] = prefix[:, 0].float().reshape(b, -1, d).mean(1).cpu().numpy()
        if features.store_tokens:
            tokens, grid = pool_tokens(tokens, grid, features.token_grid, features.temporal_pool)
            arrays[f"L{i}.tokens"] = tokens.to(torch.float16).cpu().numpy()
        grids[name] = grid
    return arrays, grids


def pool_tokens(
    tokens: torch.Tensor, grid: tuple[int, int, int], token_grid: list[int] | None, temporal_pool: bool
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Average ``[B, t*h*w, D]`` tokens over time and/or adaptively down to ``token_grid`` (h, w)."""
    b, _, d = tokens.shape
    t, h, w = grid
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


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.1f} samples/s" if task.speed else "- samples/s")

