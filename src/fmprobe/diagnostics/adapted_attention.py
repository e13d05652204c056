"""`fmprobe attention --run RUN` for an adapted run (lora, partial, staged): the backbone's attention before and
after adaptation, and the attentive probes on the adapted tokens.

A run's ``checkpoints/<head>/seed<k>/best.pt`` holds what trained (LoRA matrices, unfrozen blocks and modules, the
head, the standardiser), not the backbone. Each is rebuilt exactly as training built it — the encoder loaded from
the run's config, ``adapt.setup.prepare`` (LoRA injected, blocks unfrozen), the same ``AdaptModel`` — and the
checkpoint is loaded into it; a checkpoint whose entries differ from what that model trains is refused. Then:

- the backbone's attention entropy (H / log K per block and head, averaged over queries and frames) on the first
  ``samples`` test samples, of the pretrained backbone ("before") and of every seed's adapted one ("after");
- each attentive head's pooling attention on the adapted tokens of every test sample, per seed (as for a frozen
  run, whose probes read the cached tokens instead).

Figures are not drawn here; ``attention.json`` holds the numbers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmprobe.adapt.model import AdaptModel, Standardise, encoder_inputs
from fmprobe.adapt.setup import prepare
from fmprobe.atomic import write_json
from fmprobe.backbones.base import Encoder
from fmprobe.config import Experiment, HeadConfig, load_config
from fmprobe.data.dataset import MediaDataset
from fmprobe.data.transforms import Preprocess
from fmprobe.diagnostics.attention import attention_entropy, entropy_by_group
from fmprobe.diagnostics.attention_report import Tick, _labels, _query_names, encode_attention, test_rows
from fmprobe.errors import FmprobeError, ReaderError
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.heads import build_head

BATCH = 8  # samples per forward pass of the adapted model (pixels, not cached tokens)


def is_adapted_run(run_dir: str | Path) -> bool:
    return load_config(Path(run_dir) / "config.resolved.yaml").adapt.strategy != "frozen"


def adapted_attention(run_dir: str | Path, *, samples: int = 8, out: str | Path | None = None,
                      progress: Tick | None = None) -> dict[str, Any]:  # fmt: skip
    """Backbone entropy before / after adaptation, and the attentive probes on adapted tokens (module docstring);
    ``progress(done, total)`` after each head."""
    from fmprobe.backbones.registry import load_encoder
    run_dir = Path(run_dir)
    exp, metrics, manifest, rows = test_rows(run_dir)
    class_names = metrics["task"]["class_names"]
    labels, grouping = _labels(exp, manifest.targets(rows), class_names)
    out_dim = ResolvedTask.from_config(exp.task, class_names).out_dim
    pretrained = load_encoder(exp.model)
    preprocess = Preprocess(pretrained.input_spec, exp.data, train=False)
    dataset = MediaDataset(rows, exp.data, preprocess)
    shown = list(range(min(samples, len(dataset))))
    before = backbone_entropy(pretrained, dataset, shown)
    result: dict[str, Any] = {
        "source": "adapted run", "run": str(run_dir), "strategy": exp.adapt.strategy, "split": "test",
        "samples": len(rows),
        "backbone": {"definition": "H / log K per query (K keys incl. prefix tokens), averaged over queries, frames "
                                   "and samples; 1 = uniform attention",
                     "samples": [dataset.sample_ids[i] for i in shown], "blocks": before.blocks,
                     "before": before.summary(), "after": {}},
        "heads": {},
    }
    for done, cfg in enumerate(exp.heads, 1):
        attentive = cfg.type == "attentive"
        per_seed, sample_entropy = {}, []
        for seed in exp.train.seeds:
            model = rebuild(exp, pretrained, run_dir, cfg, seed, out_dim, dataset)
            after = backbone_entropy(model.encoder, dataset, shown)
            result["backbone"]["after"][f"{cfg.name}/seed{seed}"] = after.summary()
            if attentive:
                weights = _pooling_weights(model, dataset)
                ent = attention_entropy(weights, reduce="none")  # [N, heads, Q]
                per_seed[str(seed)] = ent.mean(axis=0).tolist()
                sample_entropy.append(ent.mean(axis=(1, 2)))
        if attentive:
            stacked = np.mean([np.asarray(v) for v in per_seed.values()], axis=0)
            by_group = dict(grouping)
            if labels is not None:
                by_group["per_sample_mean"] = entropy_by_group(np.mean(sample_entropy, axis=0), labels)
            result["heads"][cfg.name] = {
                "layer": str(cfg.layer), "queries": _query_names(cfg, stacked.shape[1], exp, class_names),
                "tokens": "of the adapted backbone (each seed its own)", "entropy_per_head_query": stacked.tolist(),
                "entropy_per_seed": per_seed, "entropy_mean": float(stacked.mean()), "by_group": by_group,
            }
        if progress is not None:
            progress(done, len(exp.heads))
    after_means = [a["mean"] for a in result["backbone"]["after"].values()]
    result["backbone"]["change"] = {"after_minus_before": float(np.mean(after_means) - before.summary()["mean"]),
                                    "after_mean_over_seeds": float(np.mean(after_means))}
    write_json((Path(out) if out is not None else run_dir / "attention") / "attention.json", result)
    return result


class BlockEntropy:
    """Normalised attention entropy ``[samples, blocks, heads]`` of one backbone on some samples."""

    def __init__(self, blocks: list[str], values: np.ndarray):
        self.blocks, self.values = blocks, values

    def summary(self) -> dict[str, Any]:
        mean = self.values.mean(axis=0)  # [blocks, heads]
        return {"per_block_head": mean.tolist(), "per_block": mean.mean(axis=1).tolist(), "mean": float(mean.mean()),
                "last_block": float(mean[-1].mean())}


@torch.no_grad()
def backbone_entropy(encoder: Encoder, dataset: MediaDataset, indices: list[int]) -> BlockEntropy:
    """Every block's attention entropy per head, on the first clip of each sample (one sample at a time: a video
    backbone's attention maps are large)."""
    blocks: list[str] = []
    values = []
    for i in indices:
        item = dataset[i]
        if item["error"] is not None:
            raise ReaderError(item["error"])
        _, _, blocks, maps = encode_attention(encoder, item["pixels"][0])
        values.append(np.stack([attention_entropy(maps[k], reduce="sample").mean(axis=0) for k in blocks]))
    if not values:
        raise FmprobeError("no test sample to compute the backbone's attention on")
    return BlockEntropy(blocks, np.stack(values))


def rebuild(exp: Experiment, pretrained: Encoder, run_dir: Path, head_cfg: HeadConfig, seed: int, out_dim: int,
            dataset: MediaDataset) -> AdaptModel:  # fmt: skip
    """The adapted model of one head and seed, built as training built it, holding the run's best checkpoint."""
    path = run_dir / "checkpoints" / head_cfg.name / f"seed{seed}" / "best.pt"
    if not path.exists():
        raise FmprobeError(f"checkpoint '{path}' is missing; the run did not finish for head {head_cfg.name}")
    encoder = copy.deepcopy(pretrained)
    first = dataset[0]
    if first["error"] is not None:
        raise ReaderError(first["error"])
    with torch.no_grad():
        in_dim = encoder_inputs(encoder, first["pixels"][None], head_cfg.layer, head_cfg.pooling, exp.features).shape[-1]
    head = build_head(head_cfg, in_dim, out_dim)
    prepared = prepare(exp, encoder, head, head_cfg, steps_per_epoch=1)
    standardise = None if head_cfg.pooling == "attentive" else Standardise(np.zeros(in_dim), np.ones(in_dim))
    model = AdaptModel(encoder, head, layer=head_cfg.layer, pooling=head_cfg.pooling, features=exp.features,
                       standardise=standardise)  # fmt: skip
    trained = {id(p) for g in prepared.groups for p in g["params"]}
    expected = {k for k, p in model.named_parameters() if id(p) in trained}
    expected |= {k for k, _ in model.named_buffers() if k.startswith(("head.", "standardise."))}
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("decoder.")}  # the segmentation decoder: not read
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise FmprobeError(
            f"'{path}' does not hold what the run's config trains (strategy {exp.adapt.strategy}): entries the model "
            f"lacks {extra[:4]}, trained entries it lacks {missing[:4]}; was the run made by another fmprobe version?"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()


@torch.no_grad()
def _pooling_weights(model: AdaptModel, dataset: MediaDataset) -> np.ndarray:
    """The attentive head's pooling attention ``[N, heads, Q, Ntok]`` on every sample's adapted tokens."""
    weights = []
    for start in range(0, len(dataset), BATCH):
        items = [dataset[i] for i in range(start, min(start + BATCH, len(dataset)))]
        bad = [it["error"] for it in items if it["error"] is not None]
        if bad:
            raise ReaderError(bad[0])
        model(torch.stack([it["pixels"] for it in items]))
        weights.append(model.head.last_attention.float().cpu().numpy())
    return np.concatenate(weights)
