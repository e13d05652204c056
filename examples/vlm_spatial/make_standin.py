"""Stand-in for the VLM spatial recipe: tiny random VLMs of all four families, a tiny random LTX-Video VAE, a
spatially faithful model, shapes data.

    python examples/vlm_spatial/make_standin.py [OUT]

Writes into OUT (default: examples/vlm_spatial/standin/): ``data/`` — the shapes dataset with the real layout (PNG
images, ``.npz`` annotations, ``manifest.csv`` with sample_id, path, annotations, group, num_objects, has_circle /
has_square / has_triangle, largest_shape) at the stand-in size; ``models/`` — a random model of each family, saved
as the real checkpoints are: ``qwen2_5_vl`` (3 vision blocks, windowed 0-1 and full 2, the merger, 2 LM layers),
``llava_next`` (a 3-block CLIP tower on 64-px tiles, AnyRes pinpoints up to 2 x 2 tiles, MLP projector,
image_newline, 2 LM layers), ``internvl2`` (remote code shaped like InternVL2's ``internvl_chat``: InternViT with a
fused qkv on 64-px tiles, pixel shuffle, mlp1, a 2-layer Llama) and ``cogvlm2`` (remote code shaped like CogVLM2:
EVA2-CLIP on 128 px, 2 x 2 conv + GLU, 2 LM layers with vision experts); and stand-in copies of every YAML of the
recipe (the four model configs, vae.yaml, gates.yaml, sweep.yaml, integration.csv) pointing at them.

The VAE is a tiny random ``AutoencoderKLLTXVideo`` (LTX-Video's architecture) saved in ``models/ltx_video/vae`` as
the pipeline holds it, at 64 px (8 x 8 latent tokens of 8 channels). LPIPS reads a randomly initialised AlexNet
written to ``models/alexnet-random.pth`` (a user's machine reads torchvision's ImageNet file): the stand-in's LPIPS
values exercise the code, not the published metric. A fifth column, ``faithful.yaml``, is a model whose tokens are
built from the pixels and kept in place (fmprobe.standin.faithful): the one the spatial gates should let through,
while the random VLMs should not beat their own random-weights control. Sizes: Qwen at 112 px (8 x 8 patches,
4 x 4 merged), the others at 128 px (LLaVA-NeXT and InternVL2: an 8 x 8 base view and 16 x 16 tiles view of tower
tokens; CogVLM2: 16 x 16 tower tokens, 8 x 8 after its conv), the faithful model at 64 px (8 x 8 tokens).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
import yaml

from fmprobe.atomic import write_text
from fmprobe.diagnostics.shapes import write_shapes_dataset
from fmprobe.standin import models, remote
from fmprobe.standin.configs import standin_yaml
from fmprobe.standin.faithful import faithful_model
from fmprobe.train.seeding import seeded

HERE = Path(__file__).resolve().parent
REAL_VAE = "Lightricks/LTX-Video"
N_IMAGES = 48  # the images every model and the VAE encode for the alignment
FAITHFUL = "faithful.yaml"


def _views(*points: object) -> list[str]:
    return [f"{p}@{v}" for p in points for v in ("base", "tiles")]


# recipe config -> (its real checkpoint, the stand-in writer, the stand-in input size, the stand-in's points)
# (the stand-ins read fewer points than the real configs: each kind once, so the whole comparison runs in minutes)
MODELS: dict[str, tuple[str, Callable[[Path], Path], int, list]] = {
    "config.yaml": ("Qwen/Qwen2.5-VL-7B-Instruct", models.qwen2_5_vl, 112,
                    [2, "visual.merger", "model.language_model.layers.1"]),
    "llava_next.yaml": ("llava-hf/llava-v1.6-vicuna-7b-hf", models.llava_next, 128,
                        _views(-2, "model.multi_modal_projector") + ["model.language_model.layers.1@tiles"]),
    "internvl2.yaml": ("OpenGVLab/InternVL2-8B", remote.internvl2, 128,
                       _views(-1) + ["mlp1:input@tiles", "language_model.model.layers.1@tiles"]),
    "cogvlm2.yaml": ("THUDM/cogvlm2-llama3-chat-19B", remote.cogvlm2, 128,
                     [-1, "model.vision.linear_proj", "model.layers.1.mlp.vision_mlp", "model.layers.1"]),
}  # fmt: skip
# the sweep's options at stand-in sizes (the real ones are in sweep.yaml and the README)
SWEEP = {
    "models": [*MODELS, FAITHFUL],
    "still": {"n_train": 32, "n_test": 32, "steps": 50, "bootstrap": 200},
    "moving": {"frames": 3, "n_train": 8, "n_test": 8, "steps": 50, "bootstrap": 200},
    "align.bootstrap": 200,
    "reconstruct": {"vae": "vae.yaml", "n_train": 32, "n_val": 8, "n_test": 16, "adapter": "mlp", "loss": "pixels",
                    "epochs": 4, "lr": 1.0e-3, "batch_size": 8, "hidden": 64, "bootstrap": 200,
                    "lpips_backbone": "models/alexnet-random.pth"},
    "speed": {"baseline": "config.yaml", "point": "visual.merger", "batch": 2, "repeats": 3, "warmup": 1},
    "pairs": [{"model": "llava_next.yaml", "a": "-2@tiles", "b": "-2@base"},
              {"model": "llava_next.yaml", "a": "model.multi_modal_projector@tiles",
               "b": "model.multi_modal_projector@base"}],
}  # fmt: skip


def main(out: Path) -> dict[str, Path]:
    """Write the stand-in data, the tiny VLMs and stand-in copies of the recipe's YAML files into ``out``."""
    out = Path(out)
    written = {"manifest": write_shapes_dataset(out / "data", N_IMAGES, size=112, seed=1)}
    common = {"features.cache_dir": str(out / "cache"), "features.device": "cpu", "runs_dir": str(out / "runs"),
              "train.epochs": 3, "eval.bootstrap": 200, "model.dtype": "float32"}  # fmt: skip
    for config, (real, write, size, points) in MODELS.items():
        model = write(out / "models" / Path(config).stem)
        written[config] = standin_yaml(
            HERE / config, out / config, replace={real: str(model)},
            set={**common, "model.image_size": size, "model.layers": points, ("heads", 0, "layer"): points[0]},
        )  # fmt: skip
    pipeline = out / "models" / "ltx_video"
    models.ltx_video_vae(pipeline / "vae")
    written["vae.yaml"] = standin_yaml(HERE / "vae.yaml", out / "vae.yaml", replace={REAL_VAE: str(pipeline)},
                                       set={**common, "model.image_size": 64})  # fmt: skip
    faithful = yaml.safe_load((out / "config.yaml").read_text())
    faithful.pop("heads")
    faithful.update(name="vlm-spatial-pixel-faithful", model={**faithful_model(64, 8), "layers": [-1]})
    written[FAITHFUL] = out / FAITHFUL
    write_text(written[FAITHFUL], yaml.safe_dump(faithful, sort_keys=False))
    with seeded(0):
        torch.save(torchvision.models.alexnet().state_dict(), out / "models" / "alexnet-random.pth")
    written["gates.yaml"] = standin_yaml(HERE / "gates.yaml", out / "gates.yaml")
    shutil.copy(HERE / "integration.csv", out / "integration.csv")
    with open(out / "integration.csv", "a") as table:
        table.write(f"{faithful['name']},*,integration,0.2,,\n")
    written["integration.csv"] = out / "integration.csv"
    written["sweep.yaml"] = standin_yaml(HERE / "sweep.yaml", out / "sweep.yaml", set=SWEEP)
    return written


def commands(paths: dict[str, Path]) -> list[str]:
    """The stand-in study: the recipe's one command on the stand-in sweep."""
    return [f"fmprobe spatial-sweep {paths['sweep.yaml']}"]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "standin"
    written = main(target)
    print(f"stand-in written to {target}\nnext:")
    for line in commands(written):
        print(f"  {line}")
