"""The demo's medical dataset, built offline from the MNI152 template that nilearn's wheel ships.

2D patches of axial T1 slices, written as PNG files with a manifest. Targets come from the tissue
probability maps, so they are real anatomy, not noise:
- multilabel "which tissues are present": grey matter, white matter, outside the brain;
- regression "grey-matter fraction": the mean grey-matter probability over the patch.
Samples are grouped by slab: all patches of a slice (and the slices skipped around it) form one group,
so no slice is ever on two sides of a split.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fmprobe.errors import FmprobeError

TISSUES = ("grey_matter", "white_matter", "outside_brain")


@dataclass(frozen=True)
class DemoDatasetSpec:
    patch: int = 64  # patch side in 1-mm voxels
    stride: int = 40  # between patch origins within a slice
    slice_step: int = 4  # every n-th axial slice: sampled slices are 4 mm apart
    slices_per_group: int = 1  # sampled slices per group: one 4-mm slab per group (34 groups)
    min_brain: float = 0.15  # keep patches with at least this fraction of brain voxels
    # A tissue is "present" when it covers at least this fraction of the patch; set near each
    # tissue's median coverage so every label is informative (prevalence near one half).
    presence: tuple[float, float, float] = (0.30, 0.15, 0.45)


# nilearn's MNI152 ICBM 2009a files (its wheel's datasets/data folder), as load_mni152_*_template(resolution=1) reads them
MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
BRAIN_MASK_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask: the rescaled T1 template above 0.2


def mni152_file(key: str) -> Path:
    """A template file in the installed nilearn, found without importing nilearn (``nilearn.datasets`` imports
    scikit-learn, joblib and its whole image stack: as long as the rest of the demo's imports together)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FmprobeError("the demo's brain patches come from the MNI152 template in nilearn, which is not installed; "
                           "run `pip install nilearn`")  # fmt: skip
    for location in spec.submodule_search_locations:
        path = Path(location) / "datasets" / "data" / MNI152_FILES[key]
        if path.is_file():
            return path
    raise FmprobeError(f"the installed nilearn has no datasets/data/{MNI152_FILES[key]}; reinstall it with "
                       "`pip install --force-reinstall nilearn`")  # fmt: skip


def _template(key: str) -> np.ndarray:
    """A template rescaled to [0, 1] in float32, as nilearn's ``load_mni152_*_template(resolution=1)`` gives it."""
    import nibabel as nib

    data = np.asanyarray(nib.load(mni152_file(key)).dataobj).astype("float32")
    data /= data.max()
    return data


def _load_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, grey-matter and white-matter probability maps, and the brain mask (a test checks them against
    nilearn's loaders)."""
    t1 = _template("t1")
    mask = t1 > BRAIN_MASK_THRESHOLD
    return t1, _template("gm"), _template("wm"), mask


def build_demo_dataset(out_dir: str | Path, spec: DemoDatasetSpec = DemoDatasetSpec()) -> Path:
    """Write PNG patches and ``manifest.csv`` under ``out_dir``; return the manifest path.

    Idempotent: an existing complete manifest is reused.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.csv"
    if manifest_path.exists():
        return manifest_path
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    t1, gm, wm, mask = _load_volumes()
    scale = float(np.percentile(t1[mask], 99.5))
    nx, ny, nz = t1.shape
    brain_slices = [z for z in range(nz) if mask[:, :, z].mean() > 0.05]
    rows = []
    for k, z in enumerate(brain_slices[:: spec.slice_step]):
        group = f"slab{k // spec.slices_per_group:02d}"
        for x in range(0, nx - spec.patch + 1, spec.stride):
            for y in range(0, ny - spec.patch + 1, spec.stride):
                win = (slice(x, x + spec.patch), slice(y, y + spec.patch), z)
                brain = mask[win]
                if brain.mean() < spec.min_brain:
                    continue
                coverage = ((gm[win] > 0.5).mean(), (wm[win] > 0.5).mean(), (~brain).mean())
                labels = {t: float(c >= p) for t, c, p in zip(TISSUES, coverage, spec.presence)}
                pixels = np.clip(t1[win] / scale, 0, 1)
                # Radiological display: rotate so anterior is up.
                img = Image.fromarray((np.rot90(pixels) * 255).round().astype(np.uint8), mode="L")
                sample_id = f"z{z:03d}_x{x:03d}_y{y:03d}"
                img.save(images / f"{sample_id}.png")
                rows.append(
                    {"sample_id": sample_id, "path": f"images/{sample_id}.png", "group": group, **labels,
                     "gm_fraction": float(gm[win].mean())}
                )
    df = pd.DataFrame(rows)
    tmp = manifest_path.with_suffix(".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(manifest_path)
    return manifest_path
