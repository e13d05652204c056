"""Stand-in for the brain MRI recipe: synthetic T1w volumes, tiny BLIP-2 (a full checkpoint: tower, Q-Former,
language projection, OPT) and CLIP, stand-in copies of the YAMLs.

    python examples/brain_mri/make_standin.py [OUT]      (default OUT: examples/brain_mri/standin/)

The volumes are the MNI152 template (shipped by nilearn) made into subjects, in the real study's layout
(BIDS-like ``sub-XXX/ses-YY/anat/*_T1w.nii.gz`` with a 1-line-per-session manifest grouped by ``subject``):
- age enlarges the ventricles and thins the cortex (CSF replaces tissue), plus a per-subject atrophy factor;
- MMSE falls with age and with that atrophy factor, plus noise (so MMSE is partly, not fully, age); as in the
  study it was assessed in fewer sessions than age is known for: the others have an empty ``mmse`` cell;
- sex changes head size (men ~7% larger, with individual spread);
- some subjects have a second session two years later: nearly the same image with nearly the same targets, which
  is exactly what leaks when sessions of one subject land on both sides of a split.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.special import expit

from fmprobe.standin import models
from fmprobe.standin.configs import standin_yaml

HERE = Path(__file__).resolve().parent
REAL_BLIP2 = "Salesforce/blip2-opt-2.7b"
REAL_CLIP = "openai/clip-vit-large-patch14-336"
SUBJECTS = 100
SECOND_SESSION = 0.3  # share of subjects with a follow-up session
MMSE_SHARE = 0.45  # share of subjects with MMSE assessed (the study: 1,905 of 4,201 sessions); the rest: empty cells
SHAPE = (40, 48, 40)  # stand-in grid (x, y, z), RAS
VOXEL_MM = 4.8
ARMS = "model.name, model.layers, heads.0.layer, adapt"  # the sweeps' grid key of the encoder arms
PROJECTOR_ARMS = (3, 4, 5)  # the sweeps' projector arms, one per projector learning rate
# what the stand-in changes in the real YAMLs besides model ids, paths and hardware: sizes, and a larger learning
# rate for the far fewer optimiser steps of ~90 training volumes (stage 2 of the ln_vision arm kept short, of the
# three projector arms shorter still: one epoch each, the projector's warmup included)
STANDIN_SET = {"data.frames_per_clip": 4, "data.frame_step": 2, "train.lr": 0.01, "train.epochs": 40,
               "eval.bootstrap": 200}
STANDIN_SWEEP_SET = {("grid", ARMS, 1, 3, "stage2", "epochs"): 2, "workers": 1,
                     **{("grid", ARMS, arm, 3, "stage2", "epochs"): 1 for arm in PROJECTOR_ARMS}}


def _blocks(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k x k blocks (a coarser grid without resampling artefacts)."""
    a = a[: a.shape[0] // k * k, : a.shape[1] // k * k, : a.shape[2] // k * k]
    return a.reshape(a.shape[0] // k, k, a.shape[1] // k, k, a.shape[2] // k, k).mean(axis=(1, 3, 5))


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """Tissue maps and distances on a 4-mm grid: grey/white matter, CSF, brain mask, distance to the brain's
    surface and to the ventricles (both in 4-mm voxels; the ventricles are found on the 2-mm grid)."""
    from nilearn import datasets

    def load(fn) -> np.ndarray:  # noqa: ANN001
        return _blocks(np.asarray(fn(resolution=1).dataobj, dtype=np.float32), 2)

    gm, wm = load(datasets.load_mni152_gm_template), load(datasets.load_mni152_wm_template)
    mask = load(datasets.load_mni152_brain_mask)
    csf = np.clip(mask - gm - wm, 0, 1)
    inside = ndimage.distance_transform_edt(mask > 0.5)  # 2-mm voxels to the brain's surface
    ventricles = (csf > 0.5) & (inside > 8)  # deep CSF
    maps = {"gm": gm, "wm": wm, "csf": csf, "mask": mask, "inside": inside / 2,
            "to_ventricle": ndimage.distance_transform_edt(~ventricles) / 2}  # fmt: skip
    return {k: _blocks(v.astype(np.float32), 2) for k, v in maps.items()}


def _volume(t: dict[str, np.ndarray], atrophy: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    """One T1w-like volume on the stand-in grid: atrophy widens ventricles and sulci, scale sets head size."""
    vent = expit((0.25 + 1.75 * atrophy - t["to_ventricle"]) / 0.25) * (t["inside"] > 2)
    cortex = expit((0.15 + 0.75 * atrophy - t["inside"]) / 0.25) * t["gm"]
    csf = np.maximum(vent, cortex)
    tissue = 0.95 * t["wm"] + 0.6 * t["gm"] + 0.2 * t["csf"]
    t1 = (tissue * (1 - csf) + 0.15 * csf * t["mask"]).astype(np.float32)
    # output voxel -> 4-mm template voxel: centred, scaled by head size, shifted by up to a voxel
    zoom = VOXEL_MM / 4.0 / scale
    centre_in, centre_out = (np.array(t1.shape) - 1) / 2, (np.array(SHAPE) - 1) / 2
    offset = centre_in - zoom * centre_out + rng.normal(0, 0.5, 3)
    vol = ndimage.affine_transform(t1, np.full(3, zoom), offset=offset, output_shape=SHAPE, order=1)
    bias = 1 + 0.1 * np.linspace(-1, 1, SHAPE[2])[None, None, :] * rng.normal()  # slow intensity drift
    vol = vol * bias * rng.uniform(600, 1400) + rng.normal(0, 15, SHAPE)  # scanner units, noise
    return np.clip(np.round(vol), 0, None).astype(np.int16)  # stored as scanners store T1w: int16


def write_dataset(folder: Path, *, subjects: int = SUBJECTS, seed: int = 0) -> Path:
    """NIfTI volumes and ``manifest.csv`` (sample_id, path, subject, session, age, mmse, male) under ``folder``."""
    rng = np.random.default_rng(seed)
    t = _templates()
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = -np.array(SHAPE) / 2 * VOXEL_MM
    assessed = np.random.default_rng(seed + 1)  # which subjects had MMSE taken (the images stay as they were)
    rows = []
    for s in range(subjects):
        subject = f"sub-{s + 1:03d}"
        male = int(rng.random() < 0.5)
        scale = (1.07 if male else 1.0) * rng.normal(1.0, 0.025)
        age0, frailty = rng.uniform(55, 90), rng.normal()
        sessions = 2 if rng.random() < SECOND_SESSION else 1
        has_mmse = assessed.random() < MMSE_SHARE
        for k in range(sessions):
            age = age0 + 2.0 * k + rng.uniform(-0.3, 0.3)
            atrophy = (age - 55) / 35 + 0.25 * frailty
            mmse = float(np.clip(np.round(30 - 0.12 * (age - 55) - 1.8 * frailty + rng.normal(0, 1.5)), 0, 30))
            session = f"ses-{k + 1:02d}"
            rel = Path(subject) / session / "anat" / f"{subject}_{session}_T1w.nii.gz"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(_volume(t, atrophy, scale, rng), affine), folder / rel)
            rows.append({"sample_id": f"{subject}_{session}", "path": rel.as_posix(), "subject": subject,
                         "session": session, "age": round(age, 1), "mmse": mmse if has_mmse else None,
                         "male": male})  # fmt: skip
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def main(out: Path = HERE / "standin") -> dict[str, Path]:
    """Write the stand-in data, tiny models and YAML copies into ``out``; return what was written."""
    out = Path(out).resolve()
    written = {"manifest": write_dataset(out / "data"),
               "blip2": models.blip2(out / "models" / "blip2-opt-2.7b"),
               "clip": models.clip(out / "models" / "clip-vit-large-patch14-336")}  # fmt: skip
    replace = {REAL_BLIP2: str(written["blip2"]), REAL_CLIP: str(written["clip"]), "cuda": "cpu"}
    paths = {"data.manifest": str(written["manifest"]), "features.cache_dir": str(out / "cache"),
             "runs_dir": str(out / "runs")}  # fmt: skip
    for name in ("age_mmse", "sex"):
        written[name] = standin_yaml(HERE / f"{name}.yaml", out / f"{name}.yaml", replace=replace,
                                     set={**STANDIN_SET, **paths})  # fmt: skip
    for name in ("sweep", "sweep_sex"):
        written[name] = standin_yaml(HERE / f"{name}.yaml", out / f"{name}.yaml", replace=replace,
                                     set=STANDIN_SWEEP_SET)  # fmt: skip
    written["gates"] = standin_yaml(HERE / "gates.yaml", out / "gates.yaml")
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "standin"
    done = main(target)
    print(f"stand-in written to {target}; next:")
    print(f"  fmprobe sweep {done['sweep']}")
    print(f"  fmprobe sweep {done['sweep_sex']}")
    print(f"  fmprobe leaderboard --runs {target.resolve() / 'runs'} --experiment brain-mri-age-mmse")
    print(f"  fmprobe leaderboard --runs {target.resolve() / 'runs'} --experiment brain-mri-sex")
    print(f"  fmprobe gate {done['gates']} --runs {target.resolve() / 'runs'}")
