"""Stand-in for the VLM spatial recipe: a tiny Qwen2.5-VL, the offline DINOv2-S as reference, shapes data.

    python examples/vlm_spatial/make_standin.py [OUT]

Writes into OUT (default: examples/vlm_spatial/standin/): ``data/`` — the shapes dataset with the real
layout (PNG images, ``.npz`` annotations, ``manifest.csv`` with sample_id, path, annotations, group,
num_objects, has_circle / has_square / has_triangle, largest_shape) at the stand-in size; ``models/qwen2_5_vl``
— a random Qwen2.5-VL with 3 vision blocks (windowed attention in 0-1, full in 2), the merger and 2 LM layers,
saved like the real checkpoint; and stand-in copies of ``config.yaml`` / ``reference.yaml`` / ``gates.yaml``.
The reference is ``dinov2-small-offline``: real pretrained DINOv2 ViT-S/14 weights that need no download, so
the stand-in CKA compares a random VLM with a genuine visual representation.

Sizes: 112 px (a multiple of patch 14 x merge 2, two 56-px attention windows per side): 8 x 8 patches per
image, 4 x 4 after the merger.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fmprobe.diagnostics.shapes import write_shapes_dataset
from fmprobe.standin import models
from fmprobe.standin.configs import standin_yaml

HERE = Path(__file__).resolve().parent
REAL_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
REAL_REFERENCE = "facebook/dinov2-large"
STANDIN_REFERENCE = "dinov2-small-offline"
SIZE = 112
N_IMAGES = 64  # the images both models encode for the alignment
POINTS = [0, 1, 2, "visual.merger", "model.language_model.layers.0", "model.language_model.layers.1"]
# `fmprobe spatial` / `fmprobe align` options of the stand-in run (the README gives the real ones)
SPATIAL = dict(n_train=48, n_test=48, steps=100, bootstrap=200)
MOVING = dict(n_train=12, n_test=8, steps=100, bootstrap=200, frames=4)
ALIGN_BOOTSTRAP = 200


def main(out: Path) -> dict[str, Path]:
    """Write the stand-in data, the tiny VLM and stand-in copies of the recipe's YAML files into ``out``."""
    out = Path(out)
    written = {"manifest": write_shapes_dataset(out / "data", N_IMAGES, size=SIZE, seed=1),
               "model": models.qwen2_5_vl(out / "models" / "qwen2_5_vl")}  # fmt: skip
    common = {"features.cache_dir": str(out / "cache"), "features.device": "cpu", "runs_dir": str(out / "runs"), "train.epochs": 3,
              "eval.bootstrap": 200}  # fmt: skip
    written["config"] = standin_yaml(
        HERE / "config.yaml", out / "config.yaml", replace={REAL_MODEL: str(written["model"])},
        set={**common, "model.image_size": SIZE, "model.dtype": "float32", "model.layers": POINTS},
    )  # fmt: skip
    written["reference"] = standin_yaml(HERE / "reference.yaml", out / "reference.yaml",
                                        replace={REAL_REFERENCE: STANDIN_REFERENCE},
                                        set={**common, "model.image_size": SIZE})  # fmt: skip
    written["gates"] = standin_yaml(HERE / "gates.yaml", out / "gates.yaml")
    return written


def commands(paths: dict[str, Path], out: Path) -> list[str]:
    """The stand-in study, command by command (the same commands as the README's, stand-in sizes)."""
    still = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SPATIAL.items())
    moving = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in MOVING.items())
    return [
        f"fmprobe spatial --encoder {paths['config']} {still} --out {out / 'spatial-still'}",
        f"fmprobe spatial --encoder {paths['config']} {moving} --out {out / 'spatial-moving'}",
        f"fmprobe spatial --encoder pixel --image-size {SIZE} {still} --out {out / 'control-pixel'}",
        f"fmprobe spatial --encoder random --image-size {SIZE} {still} --out {out / 'control-random'}",
        f"fmprobe align {paths['config']} {paths['reference']} --metric linear_cka --metric rsa --metric knn_recall "
        f"--bootstrap {ALIGN_BOOTSTRAP} --out {out / 'align'}",
        f"fmprobe gate-points {paths['gates']} --spatial {out / 'spatial-still'} --spatial {out / 'spatial-moving'} "
        f"--align {out / 'align'} --control {out / 'control-pixel'} --control {out / 'control-random'} "
        f"--out {out / 'gates'}",
    ]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "standin"
    written = main(target)
    print(f"stand-in written to {target}\nnext:")
    for line in commands(written, target):
        print(f"  {line}")
