"""`fmprobe reconstruct`: can a video generator's VAE render the image back from a model's tokens? The VLM study's
reconstruction probe (E-P4.6), per extraction point.

For every point: the model's tokens of the shapes images (each image resized to the model's input size) and the
VAE's latents of the same images (at the VAE's ``model.image_size``) are computed once; an adapter
(heads.reconstruction: ``mlp`` per token, or ``queries``, one per latent token) is trained on the training images
through the training core, its best epoch chosen on the validation images; the VAE's decoder renders the test images
from the adapter's latents, and LPIPS, SSIM, edge F1, spatial IoU and AP@0.5 are measured on the renders
(diagnostics.reconstruction) with bootstrap CIs over the test images.

The loss, ``loss: pixels`` (the study's): LPIPS(render, original) + 0.1 x the mean squared pixel error, through the
frozen decoder — what is scored is what is trained. ``loss: latents``: the mean squared error to the VAE's own latents
(no decoder in the loop: faster, a screen; the render is still scored the same way).

Controls (``pixel``, ``random-weights``, ``random``) go through the same adapter on the same images; each point gets
its paired differences to them (``vs``), as in ``fmprobe spatial``. ``gallery_<point>.png``: the first test
originals above their reconstructions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fmprobe.atomic import atomic_path, write_json
from fmprobe.backbones.base import Encoder
from fmprobe.config import load_config
from fmprobe.devices import config_device
from fmprobe.diagnostics.random_weights import CONTROL, randomise_weights
from fmprobe.diagnostics.reconstruction import load_lpips, reconstruction_scores
from fmprobe.diagnostics.shapes import make_shapes
from fmprobe.diagnostics.spatial_ci import paired_differences, spatial_intervals
from fmprobe.diagnostics.spatial_run import CONTROLS, _control_encoder, build_encoder, encode_all
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.heads.reconstruction import ADAPTERS
from fmprobe.train.core import FitPlan, fit
from fmprobe.train.members import ModuleMember
from fmprobe.train.seeding import seeded
from fmprobe.train.sources import CachedBatches, HeadData, predict_inputs

PIXEL_L2 = 0.1  # the study's loss: LPIPS + 0.1 * L2
METRICS = ("lpips", "ssim", "edge_f1", "spatial_iou", "map50")
WEIGHT_DECAY = 1e-2
DECODE_BATCH = 16


class Objective:
    """The adapter's loss on predicted latent tokens ``[B, L, C]`` (see the module docstring for the two kinds)."""

    def __init__(self, kind: str, vae: Any, grid: tuple[int, int, int], lpips_metric: torch.nn.Module):
        self.kind, self.vae, self.grid, self.lpips = kind, vae, grid, lpips_metric

    def __call__(self, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "latents":
            return F.mse_loss(latents, target)
        render = self.vae.decode(latents, self.grid)
        return self.lpips(render * 2 - 1, target * 2 - 1).mean() + PIXEL_L2 * F.mse_loss(render, target)


class _ValidationLoss:
    """The objective on the validation images: the adapter's best epoch is the one with the lowest."""

    primary, lower_is_better, train_metric = "loss", True, False

    def __init__(self, objective: Objective, device: torch.device):
        self.objective, self.device = objective, device

    @torch.no_grad()
    def __call__(self, y: np.ndarray, outputs: torch.Tensor, kind: str) -> dict[str, np.ndarray]:
        target = torch.as_tensor(y)
        total = 0.0
        for rows in torch.arange(len(target)).split(DECODE_BATCH):
            pred, true = outputs[0, rows].to(self.device), target[rows].to(self.device)
            total += float(self.objective(pred, true)) * len(rows)
        return {"loss": np.array([total / len(target)])}


def reconstruct_command(
    encoder: str, vae: str, *, layers: list[int | str] | None = None, n_train: int = 96, n_val: int = 16,
    n_test: int = 32, adapter: str = "mlp", loss: str = "pixels", epochs: int = 50, lr: float = 1e-4,
    batch_size: int = 8, hidden: int = 512, seed: int = 0, bootstrap: int = 1000, ci: float = 0.95,
    controls: Sequence[str] = (), lpips_backbone: str | Path | None = None, gallery: int = 6,
    out: str | Path = "fmprobe-reconstruct",
) -> dict[str, Any]:
    """Train, render and score every extraction point of ``encoder`` against the VAE of the config ``vae``; write
    ``reconstruct.json`` and the galleries to ``out``; return the JSON dict."""
    from fmprobe.backbones.registry import load_encoder
    from fmprobe.backbones.vae import VAEEncoder

    if adapter not in ADAPTERS or loss not in ("pixels", "latents"):
        raise ConfigError(f"--adapter must be one of {', '.join(ADAPTERS)} and --loss pixels or latents; got "
                          f"{adapter!r}, {loss!r}")  # fmt: skip
    if min(n_train, n_val, n_test) < 2 or epochs < 1 or bootstrap < 1:
        raise ConfigError("need --n-train, --n-val, --n-test >= 2, --epochs >= 1 and --bootstrap >= 1")
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ConfigError(f"unknown control(s) {unknown}; choose from {', '.join(CONTROLS)}")
    vae_config = load_config(vae)
    device = config_device(vae_config.features.device, "features.device")
    vae_model = load_encoder(vae_config.model).to(device)
    if not isinstance(vae_model, VAEEncoder):
        raise ConfigError(f"'{vae}' names {vae_model.name}, not a diffusers VAE; its decoder renders the images")
    lpips_metric = load_lpips(lpips_backbone).to(device)  # checked before any model is encoded
    model, points, label = build_encoder(encoder, layers, None)
    name = model.name
    size, model_size = vae_model.input_spec.image_size[0], model.input_spec.image_size[0]
    n = n_train + n_val + n_test
    data = make_shapes(n, size=size, seed=seed)
    images = torch.from_numpy(data.images).float() / 255
    model_images = _resized(images, model_size)
    latents, grid = _latents(vae_model, images)
    objective = Objective(loss, vae_model, grid, lpips_metric)
    targets = (images if loss == "pixels" else latents).numpy()
    split = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, n)}
    test_objects = data.objects[split["test"]]
    out = Path(out)

    def run(encoder_: Encoder, keys: list, tag: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        tokens, grids = encode_all(encoder_, model_images, keys)
        done = []
        for key in tokens:
            if grids[key][0] != 1:
                raise FmprobeError(f"{encoder_.name}: point {key} has {grids[key][0]} temporal slices; reconstruct "
                                   "renders still images")  # fmt: skip
            x = tokens[key]
            mean, std = x[split["train"]].mean(axis=(0, 1)), x[split["train"]].std(axis=(0, 1)) + 1e-6
            x = ((x - mean) / std).astype(np.float32)
            with seeded(seed):
                net = ADAPTERS[adapter](x.shape[-1], latents.shape[-1], grids[key][1:], grid[1:], hidden).to(device)
                group = {"params": list(net.parameters()), "weight_decay": WEIGHT_DECAY, "base_lr": lr,
                         "warmup_steps": 0, "start_step": 0}  # fmt: skip
                member = ModuleMember("adapter", net, [group], objective)
                source = CachedBatches({s: HeadData(x[split[s]], targets[split[s]]) for s in ("train", "val")},
                                       to_tensor=torch.as_tensor, batch_size=batch_size, grad_accum=1, seed=seed,
                                       device=device)  # fmt: skip
                result = fit(member, source, _ValidationLoss(objective, device), FitPlan(epochs=epochs))
            member.train(False)
            predicted = predict_inputs(member.predict, x[split["test"]], device)[0]
            with torch.no_grad():
                renders = torch.cat([vae_model.decode(p.to(device), grid).cpu() for p in predicted.split(DECODE_BATCH)])
            per_image = reconstruction_scores(renders, images[split["test"]], test_objects, lpips_metric)
            row = {"layer": key, "grid": list(grids[key]), "dim": int(x.shape[-1]),
                   **_means(per_image), "best_epoch": result.fits[0].best_epoch,
                   "ci": spatial_intervals(per_image, 1, n_resamples=bootstrap, ci=ci, seed=seed),
                   "gallery": _gallery(out, f"{tag}{key}", images[split["test"]][:gallery], renders[:gallery])}
            done.append((row, per_image))
        return done

    measured = run(model, points, "")
    control_rows = []
    for control in controls:
        if control == CONTROL:
            randomise_weights(model, seed)
            probed = run(model, points, f"{CONTROL}-")
        else:
            probed = run(_control_encoder(control, model.input_spec, model_size), [-1], f"{control}-")
        for (row, per_image), (_, own) in zip(measured, probed if control == CONTROL else probed * len(measured)):
            row.setdefault("vs", {})[control] = paired_differences(per_image, own, 1, n_resamples=bootstrap, ci=ci,
                                                                   seed=seed)  # fmt: skip
        control_rows += [{"control": control, **row} for row, _ in probed]
    result = {"encoder": name, "model": label, "vae": vae_model.name, "image_size": size, "model_image_size": model_size,
              "latent_grid": list(grid), "latent_channels": int(latents.shape[-1]), "adapter": adapter, "loss": loss,
              "epochs": epochs, "lr": lr, "batch_size": batch_size, "n_train": n_train, "n_val": n_val,
              "n_test": n_test, "seed": seed, "bootstrap": bootstrap, "ci_level": ci,
              "results": [r for r, _ in measured], "controls": control_rows}  # fmt: skip
    write_json(out / "reconstruct.json", result)
    return result


def _means(per_image: dict[str, Any]) -> dict[str, float]:
    from fmprobe.diagnostics.spatial import matched_average_precision

    means = {m: float(np.mean(per_image[m])) for m in METRICS if m != "map50"}
    matches = [(np.asarray(s), np.asarray(t, dtype=bool)) for s, t in per_image["ap_matches"]]
    return {**means, "map50": matched_average_precision(matches, per_image["n_gt"])}


def _resized(images: torch.Tensor, size: int) -> np.ndarray:
    """Images in [0, 1] at ``size`` px as uint8 (what encode_all takes)."""
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def _latents(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    device = next(vae.parameters()).device
    parts, grid = [], None
    for batch in images.split(DECODE_BATCH):
        tokens, grid = vae.latents((batch * 2 - 1).to(device))
        parts.append(tokens.float().cpu())
    return torch.cat(parts), grid


def _gallery(out: Path, name: str, originals: torch.Tensor, renders: torch.Tensor) -> str:
    """A PNG: the originals in the top row, their reconstructions below; returns its file name."""
    rows = [np.concatenate(list((x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)), axis=1)
            for x in (originals, renders)]  # fmt: skip
    file = "gallery_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in name) + ".png"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / file) as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG")
    return file
