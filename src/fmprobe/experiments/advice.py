"""Settings that make a run slow for nothing, said before the time is spent (with the setting that helps).

The other warning, a run that will take hours on this machine, needs measured speeds: ``experiments/clock.py``.
"""

from __future__ import annotations

import math

from fmprobe.backbones.base import InputSpec
from fmprobe.config import Experiment
from fmprobe.data.manifest import Manifest
from fmprobe.data.readers import read_media
from fmprobe.errors import ReaderError

UPSAMPLE_LIMIT = 2.0  # warn when images are enlarged more than this (per side) to the model's input size
SAMPLES_LOOKED_AT = 4


def upsampling_warning(exp: Experiment, manifest: Manifest, spec: InputSpec | None) -> str | None:
    """Images much smaller than the model's input are enlarged to it: the encoder pays for tokens that add no
    detail. ``spec``: the encoder's input (None when not known without loading the model: no warning)."""
    if spec is None or exp.data.kind != "image":
        return None
    sizes = []
    for row in manifest.df.head(SAMPLES_LOOKED_AT).itertuples():
        try:
            sizes.append(read_media(str(row.path), exp.data, sample_id=str(row.sample_id)).shape[-2:])
        except ReaderError:  # extraction reports unreadable files with their reasons
            continue
    if not sizes:
        return None
    height, width = max(sizes, key=lambda s: max(s))
    side, target, patch = max(height, width), max(spec.image_size), spec.patch_size
    if target <= UPSAMPLE_LIMIT * side:
        return None
    suggested = max(2 * patch, math.ceil(side / patch) * patch)
    return (f"the images are {width}x{height} px and are enlarged to {target} px for the model "
            f"({target / side:.0f}x per side): {(target // patch) ** 2} tokens per image where "
            f"{(suggested // patch) ** 2} would hold the same detail; set model.image_size: {suggested} "
            f"(a multiple of the patch size {patch}) unless the model must see its native size")
