"""`fmprobe align A B`: how alike two representations of the same samples are, with a figure.

A and B each name a representation on the command line as one of:

- ``FILE.npy`` — an array ``[N, D]`` (or ``[N, T, D]``, averaged over T); its rows are taken as the other
  side's samples in the same order (no sample ids);
- ``CONFIG.yaml[:LAYER[:POOLING]]`` — the experiment's cached features (extracted first if the cache lacks
  them), every sample of its manifest that was not skipped; LAYER is one of its ``model.layers`` (default:
  all of them), POOLING ``mean`` (default), ``cls``, ``cls+mean``, ``flat`` (the stored tokens flattened, so the
  layout counts: ``[N, tokens * D]``) or ``channels`` (every channel its own representation: its values at every
  token, ``[N, tokens]``, named ``<layer>/c<k>`` — a VAE's latent channels, for heatmaps of points x channels);
  ``flat`` and ``channels`` need ``features.store_tokens: true`` (``features.token_grid`` bounds their size);
- ``STORE_DIR[:LAYER[:POOLING]]`` — one feature-cache entry (``<features.cache_dir>/<key>``, the folder
  holding ``config.json`` and ``shard-*``), every sample stored in it.

When both sides carry sample ids, rows are matched by id (the samples both hold, in A's order). Every
array is float64 before any metric sees it. With one layer per side the result is one value per metric
(default: every metric) and a bar chart; with several layers on either side it is a layer x layer matrix
per metric (default: linear CKA) and a heatmap each. ``bootstrap`` > 0 adds CIs over the samples for the metrics
that allow one (diagnostics.alignment_ci: linear and RBF CKA, RSA, recall@k, mutual kNN, linear R^2). ``alignment.json`` records the
conventions the values depend on (k, RBF bandwidth rule, RSA dissimilarity and rank correlation, ...; see
diagnostics.alignment_conventions) next to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmprobe.atomic import write_json
from fmprobe.diagnostics import plots
from fmprobe.diagnostics.alignment import METRICS, align, layer_alignment_matrix, load_representation
from fmprobe.diagnostics.alignment_ci import BOOTSTRAPPABLE, alignment_interval
from fmprobe.diagnostics.alignment_conventions import DEFAULT, AlignmentConventions
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.features.store import FeatureSet, FeatureStore

if TYPE_CHECKING:
    from fmprobe.features.extract import Tick

POOLINGS = ("mean", "cls", "cls+mean", "flat", "channels")
MATRIX_DEFAULT = ("linear_cka",)


@dataclass
class Representation:
    """One side of a comparison: ``[N, D]`` float64 arrays per layer, and the samples' ids when known."""

    source: str
    layers: dict[str, np.ndarray]
    sample_ids: list[str] | None
    model: str | None = None  # the experiment's name when the side is a config: the model's label in gate-points

    def describe(self) -> dict[str, Any]:
        n = next(iter(self.layers.values())).shape[0]
        return {"source": self.source, "model": self.model, "layers": list(self.layers), "samples": n,
                "dims": {k: int(v.shape[1]) for k, v in self.layers.items()}}


def _split_spec(spec: str) -> tuple[Path, list[str]]:
    """The longest existing path prefix of ``spec`` and the ``:``-separated fields after it."""
    for fields in range(3):
        parts = spec.rsplit(":", fields) if fields else [spec]
        if len(parts) == fields + 1 and Path(parts[0]).expanduser().exists():
            return Path(parts[0]).expanduser(), parts[1:]
    raise ConfigError(
        f"representation '{spec}': no such file or folder; give FILE.npy, CONFIG.yaml[:LAYER[:POOLING]] or "
        "STORE_DIR[:LAYER[:POOLING]]"
    )


def load_side(spec: str, *, progress: Tick | None = None) -> Representation:
    """Resolve one command-line representation (see the module docstring); ``progress`` hears a config's
    extraction."""
    path, fields = _split_spec(spec)
    if path.suffix == ".npy":
        if fields:
            raise ConfigError(f"representation '{spec}': a .npy file has no layers or pooling to choose")
        return Representation(str(path), {path.stem: load_representation(path)}, None)
    model = None
    if path.suffix in (".yaml", ".yml"):
        features, model = _config_features(path, progress)
    elif path.is_dir() and (path / "config.json").exists():
        features = store_features(path)
    else:
        raise ConfigError(
            f"representation '{spec}': '{path}' is neither a .npy file, an experiment YAML nor a feature-store "
            "folder (one holding config.json and shard-*)"
        )
    layer = fields[0] if fields else None
    pooling = fields[1] if len(fields) > 1 else "mean"
    if pooling not in POOLINGS:
        raise ConfigError(f"representation '{spec}': pooling '{pooling}' is not one of {', '.join(POOLINGS)}")
    names = [layer] if layer is not None else features.layers
    if len(features) == 0:
        raise FmprobeError(f"representation '{spec}': no sample has features (all were skipped)")
    arrays = {key: value for name in names for key, value in _pooled(features, name, pooling).items()}
    return Representation(f"{path}" + (f":{layer}" if layer else "") + (f":{pooling}" if len(fields) > 1 else ""),
                          arrays, list(features.sample_ids), model)


def _config_features(path: Path, progress: Tick | None) -> tuple[FeatureSet, str]:
    from fmprobe.config import load_config
    from fmprobe.data.manifest import load_manifest
    from fmprobe.features.extract import extract_features

    exp = load_config(path)
    return extract_features(exp, load_manifest(exp.data, exp.task), progress=progress), exp.name


def _pooled(features: FeatureSet, layer: str, pooling: str) -> dict[str, np.ndarray]:
    """One layer's representation(s), float64 ``[N, D]``, named."""
    if pooling not in ("flat", "channels"):
        return {layer: np.asarray(features.pooled(layer, pooling), dtype=np.float64)}
    tokens = np.asarray(features.tokens(layer), dtype=np.float64)  # [N, tokens, D]
    if pooling == "flat":
        return {layer: tokens.reshape(len(tokens), -1)}
    return {f"{layer}/c{k}": tokens[:, :, k] for k in range(tokens.shape[2])}


def store_features(root: Path) -> FeatureSet:
    """Every sample stored in one feature-cache entry, in shard order."""
    description = json.loads((root / "config.json").read_text())
    store = FeatureStore(root, description)
    index = store.scan()
    keys = sorted(index.rows, key=lambda key: index.rows[key])
    ids = [sid for sid, _ in keys]
    if len(set(ids)) != len(ids):
        repeated = sorted({sid for sid in ids if ids.count(sid) > 1})
        raise FmprobeError(
            f"feature store {root} holds samples {repeated[:5]} more than once (their files changed between "
            "extractions); compare through the experiment YAML instead, which picks the current version"
        )
    return store.feature_set(keys)


def pair_rows(a: Representation, b: Representation) -> tuple[Representation, Representation, dict[str, int]]:
    """Match rows by sample id when both sides have ids; otherwise insist on equal row counts."""
    if a.sample_ids is None or b.sample_ids is None:
        na, nb = (next(iter(r.layers.values())).shape[0] for r in (a, b))
        if na != nb:
            raise FmprobeError(
                f"A ({a.source}) has {na} rows and B ({b.source}) has {nb}; without sample ids on both sides the "
                "rows must be the same samples in the same order"
            )
        return a, b, {"a": 0, "b": 0}
    in_b = {sid: i for i, sid in enumerate(b.sample_ids)}
    common = [sid for sid in a.sample_ids if sid in in_b]
    if not common:
        raise FmprobeError(f"A ({a.source}) and B ({b.source}) share no sample id; nothing to compare")
    in_a = {sid: i for i, sid in enumerate(a.sample_ids)}
    ia = np.array([in_a[s] for s in common])
    ib = np.array([in_b[s] for s in common])
    a2 = Representation(a.source, {k: v[ia] for k, v in a.layers.items()}, common, a.model)
    b2 = Representation(b.source, {k: v[ib] for k, v in b.layers.items()}, common, b.model)
    return a2, b2, {"a": len(a.sample_ids) - len(common), "b": len(b.sample_ids) - len(common)}


def align_command(
    spec_a: str, spec_b: str, metrics: list[str] | None = None, *, out: str | Path = "fmprobe-align", seed: int = 0,
    progress: Tick | None = None, bootstrap: int = 0, ci: float = 0.95, conventions: AlignmentConventions = DEFAULT,
) -> dict[str, Any]:
    """Compare A and B; write ``alignment.json`` and the figure(s) to ``out``; return the JSON dict.

    ``conventions`` holds every choice the metrics depend on; the JSON records them under ``conventions``.
    With ``bootstrap`` resamples, ``intervals`` (one pair) or each matrix's ``ci`` holds ``[lo, hi]`` for the
    metrics in ``BOOTSTRAPPABLE`` (None for the others)."""
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {bootstrap}")
    unknown = [m for m in metrics or [] if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown alignment metric(s) {unknown}; choose from {', '.join(METRICS)}")
    a, b, dropped = pair_rows(load_side(spec_a, progress=progress), load_side(spec_b, progress=progress))
    out = Path(out)
    result: dict[str, Any] = {"a": a.describe(), "b": b.describe(), "samples": a.describe()["samples"],
                              "unmatched_samples": dropped, "seed": seed, "bootstrap": bootstrap,
                              "ci_level": ci if bootstrap else None, "conventions": conventions.record(),
                              "figures": []}

    def interval(x: np.ndarray, y: np.ndarray, metric: str) -> list[float] | None:
        if not bootstrap or metric not in BOOTSTRAPPABLE:
            return None
        return alignment_interval(x, y, metric, n_resamples=bootstrap, ci=ci, seed=seed, conventions=conventions)

    if len(a.layers) == 1 and len(b.layers) == 1:
        chosen = list(metrics) if metrics else list(METRICS)
        values = align(next(iter(a.layers.values())), next(iter(b.layers.values())), chosen, seed=seed,
                       conventions=conventions)
        result["metrics"] = values
        if bootstrap:
            xa, xb = next(iter(a.layers.values())), next(iter(b.layers.values()))
            result["intervals"] = {m: interval(xa, xb, m) for m in values}
        fig = plots.bars(list(values), list(values.values()), title=f"A: {a.source}\nB: {b.source}",
                         dest=out / "alignment.png")
        result["figures"].append(fig.name)
    else:
        result["matrices"] = {}
        for metric in metrics or MATRIX_DEFAULT:
            matrix, rows, cols = layer_alignment_matrix(a.layers, b.layers, metric, seed=seed, conventions=conventions)
            result["matrices"][metric] = {"rows": rows, "cols": cols, "values": matrix.tolist()}
            if bootstrap:
                result["matrices"][metric]["ci"] = [[interval(a.layers[r], b.layers[c], metric) for c in cols]
                                                    for r in rows]
            fig = plots.heatmap(matrix, rows, cols, title=metric, xlabel=f"B: {b.source}", ylabel=f"A: {a.source}",
                                dest=out / f"alignment_{metric}.png")
            result["figures"].append(fig.name)
    write_json(out / "alignment.json", result)
    return result
