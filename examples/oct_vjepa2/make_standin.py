"""Stand-in for the OCT / V-JEPA 2 recipe: OCT-like volumes in an object store and tiny native V-JEPA 2 checkpoints.

    python examples/oct_vjepa2/make_standin.py [OUT] [--store URL]

Writes into OUT (default: examples/oct_vjepa2/standin/): ``manifest.csv`` with the real columns (sample_id,
path, stage, patient, eye), one gzipped NIfTI volume per eye written through fsspec to ``--store`` (any
fsspec URL; default ``file://OUT/store``) so the run streams them exactly as it streams ``s3://`` objects,
three tiny native V-JEPA 2 ``.pt`` checkpoints (``single-domain`` and ``multi-domain`` stand-ins, and a
pretraining run whose representation collapsed to a constant — the control that the majority-collapse flag
must catch), and stand-in copies of ``config.yaml`` / ``sweep.yaml``.

Volumes are 8 B-scans of 32 x 32 (depth x width): retinal layer bands with speckle, a foveal pit, and per
diabetes stage: healthy = clean bands; pre_diabetes = a slightly thickened inner retina; oral_medication = a few
hyperreflective foci in the inner retina; insulin = a thickened retina with dark intraretinal cysts (diabetic
macular oedema). The signs are small, as diabetic changes in OCT are: a probe trained with uniform class weights
on the study's imbalance (healthy 369, pre-diabetes 242, oral medication 321, insulin 129) leans on "healthy".
Two eyes per patient share the patient's anatomy and stage (so the split must be grouped by patient).
"""

from __future__ import annotations

import argparse
import gzip
import posixpath
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import yaml
from fsspec.core import url_to_fs

from fmprobe.standin import models
from fmprobe.standin.configs import standin_yaml

HERE = Path(__file__).resolve().parent
CLASSES = ("healthy", "pre_diabetes", "oral_medication", "insulin")
COUNTS = (369, 242, 321, 129)  # the study's volumes per stage (2.86:1)
SHARES = tuple(c / sum(COUNTS) for c in COUNTS)
N_PATIENTS = 120
B_SCANS, DEPTH, WIDTH = 8, 32, 32
CHECKPOINT_SIZES = dict(hidden=32, layers=2, crop=32, patch=8, frames=4, tubelet=2)
REAL_CHECKPOINTS = {  # real path in config.yaml / sweep.yaml -> stand-in file name and seed
    "gs://my-oct-checkpoints/vjepa2/single_domain_01/best_checkpoint.pt": ("vjepa2_tiny_oct_single.pt", 1),
    "gs://my-oct-checkpoints/vjepa2/multi_domain/best_checkpoint.pt": ("vjepa2_tiny_multidomain.pt", 2),
}
# layer bands below the inner limiting membrane: (top row offset, reflectivity); the RPE is drawn separately
BANDS = ((0, 0.80), (2, 0.50), (6, 0.25), (8, 0.55), (9, 0.20), (13, 0.75), (14, 0.35))
RPE_OFFSET, RPE_VALUE, CHOROID_VALUE = 16, 0.95, 0.45


def bscan(label: str, b: int, anatomy: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """One B-scan ``[depth, width]`` in [0, 1]."""
    x = np.arange(WIDTH)
    rows = np.arange(DEPTH)[:, None]
    centre = (B_SCANS - 1) / 2
    pit = 2.5 * np.exp(-((x - WIDTH / 2) ** 2) / 18 - (b - centre) ** 2 / 4)  # foveal depression
    ilm = anatomy["ilm"] + pit + anatomy["tilt"] * (x - WIDTH / 2)
    rpe = np.full(WIDTH, anatomy["ilm"] + RPE_OFFSET + anatomy["thickness"]) + anatomy["tilt"] * (x - WIDTH / 2)
    scale = (rpe - ilm) / RPE_OFFSET  # layers stretch with retinal thickness
    near_centre = abs(b - centre) <= 2.5  # signs sit in the macula: the central B-scans
    if label in ("pre_diabetes", "insulin") and near_centre:
        dome = 1.5 if label == "pre_diabetes" else 3.0
        ilm = ilm - dome * np.exp(-((x - WIDTH / 2) ** 2) / 40)  # thickened, domed inner retina
        scale = (rpe - ilm) / RPE_OFFSET
    image = np.full((DEPTH, WIDTH), 0.05)  # vitreous
    for offset, value in BANDS:
        image = np.where(rows >= ilm + offset * scale, value, image)
    image = np.where(rows >= rpe - 1, RPE_VALUE, image)
    image = np.where(rows >= rpe + 1, CHOROID_VALUE, image)
    image = np.where(rows >= rpe + 8, 0.15, image)
    if label == "oral_medication" and near_centre:
        for _ in range(rng.integers(2, 4)):  # hyperreflective foci
            cx = rng.uniform(6, WIDTH - 6)
            cy = float(np.interp(cx, x, ilm)) + rng.uniform(4, 9)
            image = np.where(((x - cx) / 1.2) ** 2 + ((rows - cy) / 1.2) ** 2 <= 1, 0.95, image)
    if label == "insulin" and near_centre:
        for _ in range(rng.integers(2, 4)):
            cx = rng.uniform(6, WIDTH - 6)
            cy = float(np.interp(cx, x, ilm)) + rng.uniform(6, 11)  # in the inner/outer nuclear layers
            ry, rx = rng.uniform(1.5, 2.5), rng.uniform(1.5, 3.0)
            image = np.where(((x - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1, 0.03, image)
    speckle = rng.gamma(10.0, 1 / 10.0, image.shape)  # multiplicative speckle, mean 1
    return np.clip(image * speckle * anatomy["gain"] + rng.normal(0, 0.02, image.shape), 0, 1)


def volume(label: str, anatomy: dict[str, float], rng: np.random.Generator) -> nib.Nifti1Image:
    """A uint8 NIfTI ``[width, depth, B-scans]`` (x, y, z with an identity affine): B-scans along axis 2."""
    stack = np.stack([bscan(label, b, anatomy, rng) for b in range(B_SCANS)], axis=-1)  # [depth, width, B]
    return nib.Nifti1Image(np.round(stack.transpose(1, 0, 2) * 255).astype(np.uint8), np.eye(4))


def write_volumes(store: str, seed: int = 0) -> pd.DataFrame:
    """Write every eye's volume under ``<store>/oct/<patient>/<eye>.nii.gz``; the manifest rows."""
    fs, root = url_to_fs(store)
    rng = np.random.default_rng(seed)
    quota = np.round(np.array(SHARES) * N_PATIENTS).astype(int)  # the study's proportions, exactly
    stages = rng.permutation(np.repeat(CLASSES, quota))
    rows = []
    for p in range(N_PATIENTS):
        patient = f"P{p + 1:03d}"
        anatomy = {"ilm": rng.uniform(5, 6), "thickness": rng.uniform(-0.5, 0.5), "tilt": rng.uniform(-0.02, 0.02),
                   "gain": rng.uniform(0.95, 1.05), "lesion_shift": rng.uniform(-4, 4)}  # fmt: skip
        label = str(stages[p])  # a patient's stage: both eyes
        for eye in ("OD", "OS"):
            rel = f"oct/{patient}/{eye}.nii.gz"
            fs.makedirs(posixpath.dirname(posixpath.join(root, rel)), exist_ok=True)
            fs.pipe_file(posixpath.join(root, rel), gzip.compress(volume(label, anatomy, rng).to_bytes(), mtime=0))
            rows.append({"sample_id": f"{patient}-{eye}", "path": f"{store.rstrip('/')}/{rel}", "stage": label,
                         "patient": patient, "eye": eye})  # fmt: skip
    return pd.DataFrame(rows)


def collapsed_checkpoint(path: Path, seed: int = 3) -> Path:
    """A native checkpoint whose encoder maps every input to one vector (final LayerNorm gain 0): the
    representation collapse JEPA pretraining can fall into. A probe on it can only learn the class priors."""
    model = models.vjepa2_model(seed=seed, **CHECKPOINT_SIZES)
    bias = model.encoder.layernorm.bias
    with torch.no_grad():  # the constant vector, drawn from the seed (never from the caller's random state)
        model.encoder.layernorm.weight.zero_()
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed)))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"target_encoder": models.native_vjepa2_state(model), "epoch": 1}, path)
    return path


def main(out: Path, *, store: str | None = None) -> dict[str, Path]:
    """Write the stand-in study into ``out`` (volumes into ``store``, default ``file://<out>/store``)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = store or f"file://{out / 'store'}"
    manifest = out / "manifest.csv"
    write_volumes(store).to_csv(manifest, index=False)

    ckpts = {real: models.native_vjepa2(out / "checkpoints" / name, seed=seed, **CHECKPOINT_SIZES)
             for real, (name, seed) in REAL_CHECKPOINTS.items()}  # fmt: skip
    collapsed = collapsed_checkpoint(out / "checkpoints" / "vjepa2_tiny_collapsed.pt")
    replace = {real: str(path) for real, path in ckpts.items()}
    sizes = {
        "data.manifest": str(manifest), "data.frames_per_clip": CHECKPOINT_SIZES["frames"], "data.frame_step": 1,
        "data.num_clips": 2, "data.num_workers": 0,
        "model.image_size": CHECKPOINT_SIZES["crop"], "model.native_frames": CHECKPOINT_SIZES["frames"],
        "model.native_num_heads": 2, "features.cache_dir": str(out / "cache"), "features.device": "cpu", "features.batch_size": 32,
        "runs_dir": str(out / "runs"), "split.fractions": [0.5, 0.25, 0.25], "eval.bootstrap": 200,
        # ~120 training eyes instead of thousands: smaller batches and a higher lr give the probe enough steps
        "train.batch_size": 16, "train.lr": 0.003, "train.epochs": 40, "train.warmup_epochs": 2,
        "train.early_stopping.patience": 10, "train.trained_episodes": 3,
        "tracking.wandb": False,  # W&B (offline files) stays on in the real config; here it would only slow the test
    }  # fmt: skip
    config = standin_yaml(HERE / "config.yaml", out / "config.yaml", replace=replace, set=sizes)
    real_grid = yaml.safe_load((HERE / "sweep.yaml").read_text())["grid"]["model.checkpoint"]
    arms = [replace[c] for c in real_grid] + [str(collapsed)]  # a real arm without a stand-in fails here
    sweep = standin_yaml(HERE / "sweep.yaml", out / "sweep.yaml", replace=replace,
                         set={("grid", "model.checkpoint"): arms, "workers": 1})  # fmt: skip
    return {"manifest": manifest, "config": config, "sweep": sweep, "runs": out / "runs",
            **{path.stem: path for path in ckpts.values()}, "collapsed": collapsed}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=HERE / "standin")
    parser.add_argument("--store", help="fsspec URL the volumes are written to (default: file://OUT/store)")
    args = parser.parse_args()
    paths = main(args.out, store=args.store)
    print(f"""stand-in written to {args.out.resolve()}; next:
  fmprobe run {paths['config']}
  fmprobe sweep {paths['sweep']}
  fmprobe leaderboard --runs {paths['runs']} --experiment oct-vjepa2 --csv {paths['runs'] / 'leaderboard.csv'} \\
      --html {paths['runs'] / 'leaderboard.html'}""")
