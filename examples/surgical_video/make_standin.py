"""Stand-in data for the surgical-video recipe: laparoscopic "clips" whose Critical View of Safety criteria are
visible structures, laid out like the real data (one video file per procedure, one manifest row per annotated clip
with its ``clip_start`` frame, grouped by video, masks for some clips).

    python examples/surgical_video/make_standin.py [OUT]      # default OUT: examples/surgical_video/standin/

Each video (group) is one 32x32 mp4 holding one stretch per entry of COMBOS: GAP frames of a view with no
criterion, then FRAMES frames of a scene. The scene is liver-coloured tissue with a gallbladder and, in some
stretches, a grey tool; the camera pans one pixel per frame. A row's annotated moment is the scene's frame
FRAMES // 2, and its clip starts where the stand-in clip (CLIP_FRAMES frames CLIP_STEP apart) is centred on it.
A criterion that is met is drawn as the structure the surgeon has to expose:

- C1 (hepatocystic triangle cleared): a dark triangle;
- C2 (cystic plate exposed): a strip below the gallbladder, the liver's own texture PLATE_LIFT grey levels lighter:
  invisible in the frames. The plate is exposed once the triangle is cleared (COMBOS: C2 comes with C1 in 4 clips
  of 5 with the triangle, alone in 1 of 5 without it), so a probe can only call C2 from the triangle: C2 is its
  worst criterion (lowest AP) and clips where C2 alone is met are where it fails, the study's "C2 blindness". The
  reference probe detects none of them at probability 0.5 (the study's 0/5), and C1 alone and C3 alone in most
  (the report's single-label detection table, with CIs). Frozen probes train FROZEN_EPOCHS on the cached features
  to learn that (in a few steps a probe stays near C2's prevalence and calls C2 on every clip);
- C3 (two structures entering the gallbladder): the cystic duct (pale bar) and the cystic artery (red bar).

Every video holds clips with no criterion, each single criterion, C1+C2 and all three, so every split has the
"only C1 / only C2 / only C3" subgroups. Every other clip has a mask of its annotated frame (PNG of class indices:
positions in ``segmentation.class_names`` of sweep.yaml: the study's 5 classes, 0 = background, gallbladder and
tool included); the others have an empty ``mask`` cell.
The model is a tiny random V-JEPA 2 (crop 32, patch 16, 4 frames, tubelet 2) saved like the hub checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import yaml
from PIL import Image

from fmprobe.standin import models
from fmprobe.standin.configs import standin_yaml

HERE = Path(__file__).resolve().parent
REAL_MODEL = "facebook/vjepa2-vitl-fpc16-256-ssv2"
SIZE, FRAMES, GAP, SCENE = 32, 8, 2, 40  # frame size, frames per scene, frames between scenes, scene panned over
CLIP_FRAMES, CLIP_STEP = 4, 2  # the stand-in clip (data.frames_per_clip, data.frame_step of CONFIG_SET)
VIDEOS = 15
# criteria met in the clips of each video (c1, c2, c3): the plate is exposed once the triangle is cleared, so C2
# comes with C1 (C1+C2 twice, all three twice) and alone once; no criterion twice, C3 alone twice, C1 alone once
COMBOS = [(0, 0, 0), (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1), (1, 1, 0), (1, 1, 0), (1, 1, 1),
          (1, 1, 1)]  # fmt: skip
# mask values: positions in segmentation.class_names of sweep.yaml (0 = background)
LABELS = {"cystic_plate": 1, "calot_triangle": 2, "cystic_artery": 3, "cystic_duct": 4}
LIVER = (170, 80, 75)
PLATE_LIFT = 2  # the cystic plate: the liver's texture 2 grey levels lighter (its noise has sd 12)
COLOURS = {"gallbladder": (90, 130, 60), "tool": (160, 160, 170), "cystic_duct": (235, 230, 200),
           "cystic_artery": (230, 40, 30), "calot_triangle": (30, 20, 35),
           "cystic_plate": tuple(v + PLATE_LIFT for v in LIVER)}  # fmt: skip
# Settings of the stand-in run (tiny model, tiny data, few steps); everything else is the recipe as written. The
# frozen probes (cheap: cached features) train FROZEN_EPOCHS, long enough to learn C2 from the triangle rather than
# stay at its prevalence; the adapted arms ADAPTED_EPOCHS.
FROZEN_EPOCHS, ADAPTED_EPOCHS = 30, 3
CONFIG_SET = {"data.frames_per_clip": CLIP_FRAMES, "data.frame_step": CLIP_STEP, "features.cache_dir": "cache",
              "features.device": "cpu", "features.batch_size": 32, "train.epochs": FROZEN_EPOCHS,
              "train.batch_size": 32, "train.lr": 0.003, "train.seeds": [0, 1], "eval.bootstrap": 200}  # fmt: skip
ADAPTER_LR = 0.01  # a few steps from LoRA's zero init: at the real 1e-4 the tiny adapters would not move


def _scene(combo: tuple[int, ...], rng: np.random.Generator, tint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An RGB scene [SCENE, SCENE, 3] and its label map."""
    image = rng.normal(0, 12, (SCENE, SCENE, 3)) + np.array(LIVER) + tint
    labels = np.zeros((SCENE, SCENE), dtype=np.uint8)

    def paint(name: str, rows: slice | np.ndarray, cols: slice | None = None) -> None:
        region = rows if cols is None else (rows, cols)
        if name == "cystic_plate":  # the liver's own texture, barely lighter
            image[region] += PLATE_LIFT
        else:
            image[region] = COLOURS[name]
        labels[region] = LABELS.get(name, 0)  # gallbladder and tool are not segmentation classes

    top = int(rng.integers(2, 8))
    paint("gallbladder", slice(top, top + 12), slice(4, 36))
    if combo[1]:
        paint("cystic_plate", slice(top + 12, top + 17), slice(8, 32))
    x = int(rng.integers(6, 18))
    if combo[0]:
        yy, xx = np.mgrid[:SCENE, :SCENE]
        y0 = top + 18
        paint("calot_triangle", (yy >= y0) & (yy < y0 + 14) & (np.abs(xx - x - 7) <= (yy - y0) // 2 + 1))
    if combo[2]:
        paint("cystic_duct", slice(top + 17, SCENE - 2), slice(x, x + 5))
        paint("cystic_artery", slice(top + 17, SCENE - 4), slice(x + 11, x + 15))
    if rng.random() < 0.5:
        paint("tool", slice(SCENE - 6, SCENE - 2), slice(20, 38))
    return np.clip(image, 0, 255).astype(np.uint8), labels


def _pan(scene: np.ndarray, start: tuple[int, int], step: tuple[int, int]) -> list[np.ndarray]:
    """FRAMES frames of a SIZE x SIZE window panning over ``scene``."""
    frames = []
    for t in range(FRAMES):
        y, x = start[0] + step[0] * t, start[1] + step[1] * t
        frames.append(np.ascontiguousarray(scene[y : y + SIZE, x : x + SIZE]))
    return frames


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 12  # keyframes as in a real recording: clips are read by seeking
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_data(folder: Path, seed: int = 0) -> Path:
    """Videos, masks and ``manifest.csv`` under ``folder``; returns the manifest path."""
    rng = np.random.default_rng(seed)
    rows = []
    for v in range(VIDEOS):
        video = f"v{v:02d}"
        path = f"videos/{video}.mp4"
        tint = rng.normal(0, 10, 3)
        tissue = _scene((0, 0, 0), rng, tint)[0][:SIZE, :SIZE]  # shown between the annotated stretches
        frames: list[np.ndarray] = []
        for c, i in enumerate(rng.permutation(len(COMBOS))):
            combo = COMBOS[i]
            scene, labels = _scene(combo, rng, tint)
            step = (int(rng.choice([-1, 1])), int(rng.choice([-1, 1])))
            start = tuple(0 if s > 0 else SCENE - SIZE for s in step)  # the pan stays inside the scene
            frames += [np.ascontiguousarray(tissue)] * GAP
            annotated = len(frames) + FRAMES // 2  # the row's moment, in frames from the start of the video
            frames += _pan(scene, start, step)
            mask = ""
            if c % 2 == 0:
                y, x = start[0] + step[0] * (FRAMES // 2), start[1] + step[1] * (FRAMES // 2)
                mask = f"masks/{video}/{video}_c{c:02d}.png"
                (folder / mask).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(labels[y : y + SIZE, x : x + SIZE]).save(folder / mask)
            rows.append({"sample_id": f"{video}_c{c:02d}", "path": path,
                         "clip_start": annotated - (CLIP_FRAMES // 2) * CLIP_STEP,  # the clip centred on it
                         "c1": combo[0], "c2": combo[1], "c3": combo[2], "group": video, "mask": mask})  # fmt: skip
        _write_video(folder / path, frames)
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def _sweep_set(sweep: Path) -> dict[tuple, object]:
    """Per-arm settings of the stand-in: frozen arms FROZEN_EPOCHS; adapted arms on CPU in fp32 (LoRA with
    ADAPTER_LR), their epochs (staged: both stages) short."""
    grid = yaml.safe_load(sweep.read_text())["grid"]
    out: dict[tuple, object] = {"workers": 1}
    for key, arms in grid.items():
        names = [k.strip() for k in key.split(",")]
        if "adapt" not in names:
            continue
        col = names.index("adapt")
        for i, arm in enumerate(arms):
            adapt = arm[col]
            frozen = adapt.get("strategy", "frozen") == "frozen"
            if "train.epochs" in names:
                out[("grid", key, i, names.index("train.epochs"))] = FROZEN_EPOCHS if frozen else ADAPTED_EPOCHS
            if "train.warmup_epochs" in names:
                warmup = names.index("train.warmup_epochs")
                out[("grid", key, i, warmup)] = min(arm[warmup], 1)
            if frozen:
                continue
            out[("grid", key, i, col, "device")] = "cpu"
            out[("grid", key, i, col, "precision")] = "fp32"
            if adapt["strategy"] == "staged":
                out[("grid", key, i, col, "stage2", "epochs")] = 2
            elif adapt["strategy"] == "lora":
                out[("grid", key, i, col, "adapters", "lr")] = ADAPTER_LR
    return out


def main(out: Path) -> dict[str, Path]:
    """Write the stand-in data, the tiny model and stand-in copies of the recipe's YAML files into ``out``."""
    out = Path(out)
    written = {"manifest": write_data(out / "data"), "model": models.vjepa2(out / "models" / "vjepa2")}
    replace = {REAL_MODEL: str(written["model"])}
    written["config"] = standin_yaml(HERE / "config.yaml", out / "config.yaml", replace=replace, set=CONFIG_SET)
    written["sweep"] = standin_yaml(HERE / "sweep.yaml", out / "sweep.yaml", replace=replace,
                                    set=_sweep_set(HERE / "sweep.yaml"))  # fmt: skip
    written["gates"] = standin_yaml(HERE / "gates.yaml", out / "gates.yaml")
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "standin"
    paths = main(target)
    runs = target / "runs"
    print(f"stand-in written to {target}\nnext:")
    print(f"  fmprobe sweep {paths['sweep']}")
    print(f"  fmprobe leaderboard --runs {runs} --experiment surgical-cvs")
    print(f"  fmprobe gate {paths['gates']} --runs {runs}")
    print(f"  fmprobe attention {paths['config']} --out {target / 'attention'}")
    print(f"  fmprobe attention --run {runs}/surgical-cvs/<run_id of the 'bce' arm>")
