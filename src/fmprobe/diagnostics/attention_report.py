"""`fmprobe attention`: where a backbone, or a trained attentive probe, looks, and how spread out its attention is.

Backbone (``fmprobe attention CONFIG``): the first ``samples`` manifest rows go through the experiment's
encoder with attention maps on (first clip of each sample; an image encoder takes each frame as an image).
Written to ``out``:

- ``attention.json``: normalised entropy H / log K (K = keys, prefix tokens included; 1 = uniform, 0 = one key)
  per block and head, averaged over queries, frames and samples (a window-attention block, as in Qwen2.5-VL,
  reaches at most log(window) / log K); per-sample entropies summarised by label combination (last block,
  and all blocks), for classification tasks;
- ``entropy_blocks_heads.png``: that block x head matrix;
- ``attention_<sample>.png``: the input (per frame; a 3D encoder's volume as slices along its first axis, x:
  sagittal), the last block's attention from the CLS token to each patch (averaged over heads; without a CLS token,
  the mean attention each patch receives) and the attention rollout (Abnar & Zuidema 2020) read the same way.

Attentive probe (``fmprobe attention --run RUN_DIR``): every attentive head of a finished run is rebuilt from
``checkpoints/<head>/seed<k>/best.pt`` and run on the test split's cached tokens; its pooling attention gives
the entropy per attention head and query (per seed and seed-mean), per label combination, and maps over the
token grid for a few test samples (``pooler_<head>_*.png``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmprobe.atomic import write_json
from fmprobe.backbones.base import spatial_grid
from fmprobe.config import Experiment, load_config
from fmprobe.diagnostics import plots
from fmprobe.diagnostics.attention import attention_entropy, attention_rollout, entropy_by_group
from fmprobe.errors import ConfigError, FmprobeError, ReaderError

Tick = Callable[[int, int], None]  # progress: (done, total)
MAX_FRAMES = 8  # frames drawn per sample in a heatmap figure
POOLER_MAPS = 6  # test samples drawn per attentive head
BATCH = 256


def _labels(exp: Experiment, y: np.ndarray, class_names: list[str] | None) -> tuple[np.ndarray | None, dict]:
    """Labels to group by (class names for multiclass), or None with the reason for a regression task."""
    if exp.task.type == "regression":
        return None, {"skipped": "regression targets are continuous; there are no label combinations to group by"}
    if exp.task.type == "multiclass":
        return np.asarray(class_names, dtype=object)[y.astype(int)], {}
    return y, {"label_order": list(exp.task.targets)}


# ---------------------------------------------------------------------------------------------- backbone


def _blocks_to_request(encoder: Any) -> list[int | str]:
    """Qwen returns attention only for the blocks it is asked for: ask for all. HF towers return all for -1."""
    from fmprobe.backbones.qwen2_5_vl import QwenVisionEncoder

    if isinstance(encoder, QwenVisionEncoder):
        return list(range(len(encoder.visual.blocks)))
    return [-1]


def _frames(clip: torch.Tensor, mean: tuple, std: tuple) -> np.ndarray:
    """``[T, C, H, W]`` normalised input -> ``[T, H, W, 3]`` in [0, 1] for display. One channel (volume slices,
    intensities as data.intensity left them) is min-max scaled and shown gray."""
    if clip.shape[1] == 1:
        lo, hi = clip.min(), clip.max()
        return ((clip - lo) / (hi - lo if hi > lo else 1)).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (clip * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _patch_map(attn: np.ndarray, prefix: int) -> np.ndarray:
    """``[B, Q, K]`` (heads averaged) -> ``[B, K - prefix]``: the CLS row over patches, else the mean row."""
    rows = attn[:, 0] if prefix > 0 else attn.mean(axis=1)
    return rows[:, prefix:]


def encode_attention(encoder: Any, clip: torch.Tensor, requested: list[int | str] | None = None
                     ) -> tuple[torch.Tensor, Any, list[str], dict[str, np.ndarray]]:  # fmt: skip
    """One clip ``[T, 3, H, W]`` (a 3D encoder's volume ``[1, x, y, z]``) through ``encoder`` with attention maps on:
    the input as encoded (a video clip or volume, or an image encoder's frames), the encoder output, its blocks in
    order and their maps ``[B, heads, Q, K]``."""
    x = clip if encoder.input_spec.kind == "image" else clip[None]
    with torch.inference_mode():
        output = encoder.encode(x, requested or _blocks_to_request(encoder), attentions=True)
    if not output.attentions:
        raise FmprobeError(f"{encoder.name} returned no attention maps")
    blocks = sorted(output.attentions, key=int)
    return x, output, blocks, {k: output.attentions[k].float().cpu().numpy() for k in blocks}


def backbone_attention(exp: Experiment, *, samples: int = 8, out: str | Path = "fmprobe-attention",
                       progress: Tick | None = None) -> dict[str, Any]:
    """Attention entropy per block and head, grouped by labels, and heatmaps of the first ``samples`` samples;
    ``progress(done, total)`` after each sample."""
    from fmprobe.backbones.registry import load_encoder
    from fmprobe.data.dataset import MediaDataset
    from fmprobe.data.manifest import load_manifest
    from fmprobe.data.transforms import Preprocess

    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    out = Path(out)
    manifest = load_manifest(exp.data, exp.task)
    df = manifest.df.head(samples).reset_index(drop=True)
    encoder = load_encoder(exp.model)
    spec = encoder.input_spec
    dataset = MediaDataset(df, exp.data, Preprocess(spec, exp.data, train=False))
    requested = _blocks_to_request(encoder)

    ids, kept, entropies, skipped, figures = [], [], [], [], []
    blocks: list[str] = []
    rollout_note = "computed from every block"
    for i in range(len(dataset)):
        item = dataset[i]
        if item["error"] is not None:
            if exp.data.on_error == "raise":
                raise ReaderError(item["error"])
            skipped.append([item["sample_id"], item["error"]])
            continue
        clip = item["pixels"][0]  # first clip [T, 3, H, W] (a 3D encoder's volume [1, x, y, z])
        x, output, blocks, maps = encode_attention(encoder, clip, requested)
        entropies.append(np.stack([attention_entropy(maps[k], reduce="sample").mean(axis=0) for k in blocks]))
        key = str(requested[-1])
        prefix, grid = output.prefix[key].shape[1], spatial_grid(output.grid[key], key, "an attention heatmap")
        last = maps[blocks[-1]].mean(axis=1)
        panels = {"last block, CLS to patch" if prefix else "last block, mean received": _patch_map(last, prefix)}
        if blocks == [str(b) for b in range(len(blocks))]:
            panels["rollout" + (", CLS row" if prefix else ", mean row")] = _patch_map(
                attention_rollout([maps[k] for k in blocks]), prefix)
        else:
            rollout_note = f"not computed: it needs every block's attention and the encoder returned blocks {blocks}"
        t, h, w = grid
        if spec.kind == "volume":  # its slices along x (the token grid's first axis) are the frames shown
            clip = clip[0][:, None]
        n_frames = clip.shape[0]
        shown = np.unique(np.linspace(0, t * x.shape[0] - 1, min(MAX_FRAMES, t * x.shape[0])).round().astype(int))
        frame_of = shown * (n_frames // (t * x.shape[0]))  # the first input frame each token slice covers
        panels = {name: m.reshape(-1, h, w)[shown] for name, m in panels.items()}
        sid = item["sample_id"]
        figures.append(plots.attention_overlays(
            _frames(clip[frame_of], spec.mean, spec.std), panels, title=f"{encoder.name} · {sid}",
            dest=out / f"attention_{_safe(sid)}.png").name)
        ids.append(sid)
        kept.append(i)
        if progress is not None:
            progress(i + 1, len(dataset))
    if not ids:
        raise FmprobeError(f"none of the first {samples} samples could be read: {skipped}")

    per_sample = np.stack(entropies)  # [N, blocks, heads]
    mean = per_sample.mean(axis=0)
    figures.insert(0, plots.heatmap(mean, blocks, [str(h) for h in range(mean.shape[1])],
                                    title=f"{encoder.name}: normalised attention entropy", xlabel="head",
                                    ylabel="block", dest=out / "entropy_blocks_heads.png", vmin=0, vmax=1).name)
    labels, grouping = _labels(exp, manifest.targets(df.iloc[kept]), manifest.class_names)
    if labels is not None:
        grouping["last_block"] = entropy_by_group(per_sample[:, -1].mean(axis=1), labels)
        grouping["all_blocks"] = entropy_by_group(per_sample.mean(axis=(1, 2)), labels)
    result = {
        "source": "backbone", "model": encoder.name, "samples": ids, "skipped": skipped,
        "blocks": blocks, "heads": int(mean.shape[1]),
        "entropy": {
            "definition": "H / log K per query (K keys incl. prefix tokens), averaged over queries, frames, samples",
            "per_block_head": mean.tolist(), "per_block": mean.mean(axis=1).tolist(),
            "per_sample_last_block": dict(zip(ids, per_sample[:, -1].mean(axis=1).tolist())),
        },
        "by_group": grouping, "rollout": rollout_note, "figures": figures,
    }
    write_json(out / "attention.json", result)
    return result


def _safe(sample_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in sample_id)


# ---------------------------------------------------------------------------------------------- attentive probe


def pooler_attention(run_dir: str | Path, *, out: str | Path | None = None, progress: Tick | None = None
                     ) -> dict[str, Any]:  # fmt: skip
    """Entropy and maps of every attentive head of a finished run, on its test split; ``progress(done, total)``
    after each head."""
    from fmprobe.evaluate.task import ResolvedTask
    from fmprobe.features.extract import extract_features
    from fmprobe.heads import build_head

    run_dir = Path(run_dir)
    exp, metrics, manifest, rows = test_rows(run_dir)
    heads = [h for h in exp.heads if h.type == "attentive"]
    if not heads:
        raise ConfigError(f"run '{run_dir}' has no attentive head (heads: {[h.name for h in exp.heads]})")
    class_names = metrics["task"]["class_names"]
    test_ids = rows["sample_id"].astype(str).tolist()
    y_test = manifest.targets(rows)
    labels, grouping_base = _labels(exp, y_test, class_names)
    features = extract_features(exp, manifest).subset(test_ids)
    out = Path(out) if out is not None else run_dir / "attention"
    out_dim = ResolvedTask.from_config(exp.task, class_names).out_dim

    result: dict[str, Any] = {"source": "attentive probe", "run": str(run_dir), "split": "test",
                              "samples": len(test_ids), "heads": {}, "figures": []}
    for cfg in heads:
        tokens = torch.from_numpy(np.asarray(features.tokens(str(cfg.layer)), dtype=np.float32))
        t, h, w = spatial_grid(features.grid(str(cfg.layer)), str(cfg.layer), "the attentive pooler's heatmap")
        per_seed, sample_entropy, first_maps, first_entropy = {}, [], None, None
        for seed in exp.train.seeds:
            path = run_dir / "checkpoints" / cfg.name / f"seed{seed}" / "best.pt"
            if not path.exists():
                raise FmprobeError(f"checkpoint '{path}' is missing; the run did not finish for head {cfg.name}")
            head = build_head(cfg, tokens.shape[-1], out_dim)
            head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            head.eval()
            attention = []
            with torch.no_grad():
                for start in range(0, len(tokens), BATCH):
                    head(tokens[start : start + BATCH])
                    attention.append(head.last_attention.numpy())
            weights = np.concatenate(attention)  # [N, heads, Q, Ntok]
            ent = attention_entropy(weights, reduce="none")  # [N, heads, Q]
            per_seed[str(seed)] = ent.mean(axis=0).tolist()
            sample_entropy.append(ent.mean(axis=(1, 2)))
            if first_maps is None:  # the first seed's maps of a few samples: heads and queries averaged, frames too
                first_maps = weights[:POOLER_MAPS].mean(axis=(1, 2)).reshape(-1, t, h, w).mean(axis=1)
                first_entropy = ent[:POOLER_MAPS].mean(axis=(1, 2))
        stacked = np.mean([np.asarray(v) for v in per_seed.values()], axis=0)  # [heads, Q]
        queries = _query_names(cfg, stacked.shape[1], exp, class_names)
        grouping = dict(grouping_base)
        if labels is not None:
            grouping["per_sample_mean"] = entropy_by_group(np.mean(sample_entropy, axis=0), labels)
        result["heads"][cfg.name] = {
            "layer": str(cfg.layer), "grid": [t, h, w], "queries": queries,
            "entropy_per_head_query": stacked.tolist(), "entropy_per_seed": per_seed,
            "entropy_mean": float(stacked.mean()), "by_group": grouping,
        }
        result["figures"].append(plots.heatmap(
            stacked, [str(i) for i in range(stacked.shape[0])], queries, vmin=0, vmax=1,
            title=f"{cfg.name}: pooling attention entropy (test, seed mean)", xlabel="query", ylabel="attention head",
            dest=out / f"pooler_{_safe(cfg.name)}_entropy.png").name)
        assert first_maps is not None and first_entropy is not None
        shown = test_ids[: len(first_maps)]
        result["figures"].append(plots.probe_attention_maps(
            _input_frames(exp, rows.iloc[: len(shown)], features), first_maps * (h * w),
            [f"{sid}\n{_label_text(exp, y_test[i], class_names)}\nH = {first_entropy[i]:.3f}"
             for i, sid in enumerate(shown)],
            title=f"{cfg.name}: pooling attention on test samples (seed {exp.train.seeds[0]}, mean over attention "
                  f"heads and queries; H: normalised entropy, 1 = uniform)",
            dest=out / f"pooler_{_safe(cfg.name)}_maps.png").name)  # fmt: skip
        if progress is not None:
            progress(len(result["heads"]), len(heads))
    write_json(out / "attention.json", result)
    return result


def _input_frames(exp: Experiment, rows: Any, features: Any) -> np.ndarray:
    """The first frame of each row's input as the encoder saw it (resized, cropped), ``[N, H, W, 3]`` in [0, 1]."""
    from fmprobe.data.dataset import MediaDataset
    from fmprobe.data.transforms import Preprocess
    from fmprobe.probes.segmentation import stored_input_spec

    spec = stored_input_spec(features)
    dataset = MediaDataset(rows.reset_index(drop=True), exp.data, Preprocess(spec, exp.data, train=False))
    frames = []
    for i in range(len(dataset)):
        item = dataset[i]
        if item["error"] is not None:
            raise ReaderError(item["error"])
        frames.append(_frames(item["pixels"][0][:1], spec.mean, spec.std)[0])
    return np.stack(frames)


def _label_text(exp: Experiment, y: np.ndarray, class_names: list[str] | None) -> str:
    """A test sample's target as a reader names it: its class, its present labels, or its target values."""
    if exp.task.type == "multiclass":
        return str(class_names[int(y)]) if class_names else str(int(y))
    if exp.task.type == "regression":
        return "; ".join(f"{t} {v:.3g}" for t, v in zip(exp.task.targets, np.atleast_1d(y)))
    if exp.task.type == "binary":
        return f"{exp.task.targets[0]} = {int(np.atleast_1d(y)[0])}"
    present = [t for t, v in zip(exp.task.targets, np.atleast_1d(y)) if v >= 0.5]
    return ", ".join(present) or f"no {' / '.join(exp.task.targets)}"


def test_rows(run_dir: Path) -> tuple[Experiment, dict[str, Any], Any, Any]:
    """A finished run's config, metrics.json, manifest and the manifest rows of its test split (in its order)."""
    import pandas as pd

    from fmprobe.data.manifest import load_manifest

    for name in ("config.resolved.yaml", "metrics.json", "predictions.parquet"):
        if not (run_dir / name).exists():
            raise FmprobeError(f"'{run_dir}' is not a finished run directory: {name} is missing")
    exp = load_config(run_dir / "config.resolved.yaml")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    preds = pd.read_parquet(run_dir / "predictions.parquet", columns=["sample_id", "split", "head", "seed"])
    first = preds[(preds["head"] == exp.heads[0].name) & (preds["seed"] == exp.train.seeds[0])]
    test_ids = first.loc[first["split"] == "test", "sample_id"].astype(str).tolist()
    manifest = load_manifest(exp.data, exp.task)
    return exp, metrics, manifest, manifest.df.set_index("sample_id").loc[test_ids].reset_index()


def _query_names(cfg: Any, n: int, exp: Experiment, class_names: list[str] | None) -> list[str]:
    if cfg.query_per_class:
        names = class_names if exp.task.type == "multiclass" else exp.task.targets
        if len(names) == n:
            return list(names)
    return [f"q{i}" for i in range(n)]

