"""The feature-cache key: everything that changes the stored arrays, and nothing that does not.

Covered: the encoder's fingerprint (weights + config), the extraction points, the preprocessing (the
encoder's input spec and the data fields that change pixels) and the feature fields that change what is
stored. Not covered: batch size, workers, shard size. Per-sample identity (id + content fingerprint)
lives inside the store, so adding samples extends an entry instead of making a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from fmprobe.backbones.base import InputSpec
from fmprobe.config import Experiment, ModelConfig
from fmprobe.errors import ConfigError

FORMAT_VERSION = 2  # 2: volumes oriented, resampled and windowed through MONAI (DICOM series in RAS+ too)
PIXEL_FIELDS = (
    "kind", "frames_per_clip", "frame_step", "clip_position", "num_clips", "volume_mode", "slice_axis", "window",
    "spacing", "intensity", "crop_foreground",
)
STORED_FIELDS = ("store_tokens", "token_grid", "temporal_pool")


def check_cacheable(exp: Experiment) -> None:
    """Refuse settings whose features are not a function of the sample (or not storable as asked)."""
    if exp.data.clip_position == "random":
        raise ConfigError(
            "data.clip_position: random clips cannot be cached (each epoch would need new features); "
            "use center or uniform for frozen features"
        )
    if "://" in exp.features.cache_dir:  # a remote store (features/remote.py): its filesystem must be available
        try:
            url_to_fs(exp.features.cache_dir)
        except (ImportError, ValueError) as err:
            raise ConfigError(f"features.cache_dir '{exp.features.cache_dir}' cannot be opened: {err}") from None
    grid = exp.features.token_grid
    if grid is not None and (len(grid) != 2 or min(grid) < 1):
        raise ConfigError(f"features.token_grid must be two positive integers (h, w), got {grid}")


def describe(exp: Experiment, encoder_name: str, encoder_fingerprint: str, spec: InputSpec) -> dict[str, Any]:
    """What the key covers, human-readable (written as the store's config.json)."""
    return {
        "format": FORMAT_VERSION,
        "encoder": {"name": encoder_name, "fingerprint": encoder_fingerprint, "dtype": exp.model.dtype},
        "layers": [str(layer) for layer in exp.model.layers],
        "input_spec": asdict(spec),
        "data": {field: _plain(getattr(exp.data, field)) for field in PIXEL_FIELDS},
        "features": {field: _plain(getattr(exp.features, field)) for field in STORED_FIELDS},
    }


def cache_key(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _plain(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


# --- knowing an encoder's fingerprint without loading it -------------------------------------------
# A fully cached run should not pay for loading the model. The fingerprint and input spec of a model
# config are remembered, keyed by the config plus a stat signature of the local weight files it names
# (and the Hugging Face cache ref for a hub id), so new weights at the same path are never mistaken for
# the old ones. Whenever features are actually extracted the real fingerprint is checked against this.


def _source_signature(model: ModelConfig) -> list[Any]:
    from fmprobe.backbones.offline import offline_dinov2_location
    from fmprobe.backbones.registry import OFFLINE_DINOV2

    signature: list[Any] = []
    name = str(offline_dinov2_location()) if model.name == OFFLINE_DINOV2 else model.name
    weights = model.weights
    if weights is not None and weights.startswith(("hf-hub:", "local-dir:")):
        weights = weights.split(":", 1)[1]
    for ref in (name, model.checkpoint, weights, _factory_file(model)):
        if not ref:
            continue
        path = Path(ref).expanduser()
        if path.exists():
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            signature.append([[str(f), f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ctime_ns] for f in files])
        elif "/" in ref:
            hf_home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface"))
            hub_cache = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
            refs = hub_cache.expanduser() / f"models--{ref.replace('/', '--')}" / "refs"
            signature.append(sorted((p.name, p.read_text()) for p in refs.glob("*")) if refs.is_dir() else None)
    return signature


def _factory_file(model: ModelConfig) -> str | None:
    """The source file of a ``kind: python`` factory's module (its code shapes the features), without importing it."""
    import importlib.util

    if model.factory is None:
        return None
    try:
        spec = importlib.util.find_spec(model.factory.partition(":")[0])
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _library_versions(model: ModelConfig) -> list[str | None]:
    """Versions of the library that builds a model from code (its code shapes the features)."""
    from importlib.metadata import PackageNotFoundError, version

    package = {"timm": "timm", "open_clip": "open_clip_torch", "monai": "monai"}.get(model.kind)
    try:
        return [package, version(package)] if package else []
    except PackageNotFoundError:
        return [package, None]


def identity_path(model: ModelConfig, cache_dir: Path) -> Path:
    import torch
    import transformers

    import fmprobe

    blob = json.dumps(
        [model.model_dump(mode="json"), _source_signature(model), fmprobe.__version__, torch.__version__,
         transformers.__version__, *_library_versions(model)],
        sort_keys=True,
    )
    return cache_dir / "encoders" / f"{hashlib.sha256(blob.encode()).hexdigest()}.json"


def remembered_identity(model: ModelConfig, cache_dir: Path) -> tuple[str, str, InputSpec] | None:
    """(name, fingerprint, input spec) recorded for this exact model config and weight files, if any."""
    path = identity_path(model, cache_dir)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in data["input_spec"].items()}
    return data["name"], data["fingerprint"], InputSpec(**spec)


def remember_identity(model: ModelConfig, cache_dir: Path, name: str, fingerprint: str, spec: InputSpec) -> None:
    path = identity_path(model, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"name": name, "fingerprint": fingerprint, "input_spec": asdict(spec)}))
    os.replace(tmp, path)
