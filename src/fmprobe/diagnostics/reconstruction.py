"""How good is a reconstruction? Per-image scores of images rendered from predicted latents against the originals.

- **LPIPS** (Zhang et al. 2018, the ``lpips`` package: AlexNet features and the released linear layers, images in
  [-1, 1]); lower is better. Its AlexNet backbone carries ImageNet weights that torchvision downloads on first use;
  fmprobe never downloads at run time: it reads them from ``lpips_backbone`` (a torchvision AlexNet state dict),
  by default torch hub's cache file, and says what to fetch where when the file is absent.
- **SSIM** (torchmetrics' ``structural_similarity_index_measure``: Gaussian window 11, sigma 1.5, data range 1).
- **Edge F1**: Canny edges (OpenCV, thresholds ``CANNY``) of both images in grey; an edge pixel of one counts as
  matched when the other has an edge within ``EDGE_TOLERANCE`` pixels (the relaxed boundary F-measure of contour
  benchmarks, without one-to-one matching); F1 of that precision and recall (1 when neither image has edges).
- **Spatial IoU** (the VLM study's: where the reconstruction puts the objects): the pixels of the reconstruction
  that the shapes data's foreground rule calls object (``FOREGROUND``: RGB mean above the midpoint between the
  brightest background and the dimmest object colour — the rule that segments the originals exactly) against the
  union of the objects' true masks; IoU per image.
- **AP@0.5 from the reconstruction**: the connected components of that foreground are its detections (box of each,
  scored by its area), matched to the true boxes the COCO way (:func:`fmprobe.diagnostics.spatial.match_detections`).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from fmprobe.diagnostics.shapes import COLOURS, SampleObjects
from fmprobe.diagnostics.spatial import match_detections
from fmprobe.errors import ConfigError

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
CANNY = (50, 150)
EDGE_TOLERANCE = 2
# mean over RGB, in [0, 1]: the background's grey is <= 60 (<= ~75 with its noise), the dimmest object colour's mean 100
FOREGROUND = (75 + min(sum(c) for c in COLOURS.values()) / 3) / 2 / 255


def default_lpips_backbone() -> Path:
    """Where torchvision keeps AlexNet's ImageNet weights once downloaded (torch hub's checkpoint cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(ALEXNET_URL).name


def load_lpips(backbone: str | Path | None = None) -> torch.nn.Module:
    """LPIPS (AlexNet, v0.1 linear layers shipped in the ``lpips`` package) with the AlexNet weights read from
    ``backbone`` (default: :func:`default_lpips_backbone`); never downloads."""
    import lpips
    import torchvision

    path = Path(backbone).expanduser() if backbone else default_lpips_backbone()
    if not path.is_file():
        raise ConfigError(
            f"LPIPS needs AlexNet's ImageNet weights and fmprobe does not download at run time: fetch {ALEXNET_URL} "
            f"to {path} (e.g. python -c \"import torchvision; torchvision.models.alexnet(weights='IMAGENET1K_V1')\" "
            "on a machine with internet), or give the file with --lpips-backbone")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        alexnet = torchvision.models.alexnet()
        alexnet.load_state_dict(state)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise ConfigError(f"'{path}' is not a torchvision AlexNet state dict: {err}") from None
    metric = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # linear layers: the package's own file
    for block in (metric.net.slice1, metric.net.slice2, metric.net.slice3, metric.net.slice4, metric.net.slice5):
        for name, module in block.named_children():
            module.load_state_dict(alexnet.features[int(name)].state_dict())
    return metric.eval().requires_grad_(False)


def foreground(images: np.ndarray) -> np.ndarray:
    """Object pixels ``[N, H, W]`` of images ``[N, 3, H, W]`` in [0, 1] by the shapes data's rule."""
    return images.sum(axis=1) / 3 > FOREGROUND


def spatial_iou(images: np.ndarray, objects: Sequence[SampleObjects]) -> np.ndarray:
    """Per image: IoU of the reconstruction's foreground with the union of the true object masks (first frame)."""
    pred = foreground(images)
    truth = np.stack([o.masks[0].any(axis=0) for o in objects])
    union = (pred | truth).sum(axis=(1, 2))
    return np.where(union > 0, (pred & truth).sum(axis=(1, 2)) / np.maximum(union, 1), 1.0)


def component_detections(images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image: the boxes (x0, y0, x1, y1) of the foreground's connected components and their areas (scores)."""
    out = []
    for mask in foreground(images):
        labels, n = ndimage.label(mask)
        boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)]
        areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
        out.append((np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(areas, dtype=np.float64)))
    return out


def edge_f1(reconstructions: np.ndarray, originals: np.ndarray) -> np.ndarray:
    """Per image: the relaxed boundary F1 of Canny edges (see the module docstring)."""
    import cv2

    scores = []
    for rec, orig in zip(reconstructions, originals):
        edges = [cv2.Canny(np.ascontiguousarray((x.mean(axis=0) * 255).round().astype(np.uint8)), *CANNY) > 0
                 for x in (rec, orig)]  # fmt: skip
        if not edges[0].any() and not edges[1].any():
            scores.append(1.0)
            continue
        near = [ndimage.distance_transform_edt(~e) <= EDGE_TOLERANCE if e.any() else np.zeros_like(e) for e in edges]
        precision = (edges[0] & near[1]).sum() / max(edges[0].sum(), 1)
        recall = (edges[1] & near[0]).sum() / max(edges[1].sum(), 1)
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return np.asarray(scores)


@torch.no_grad()
def reconstruction_scores(reconstructions: torch.Tensor, originals: torch.Tensor, objects: Sequence[SampleObjects],
                          lpips_metric: torch.nn.Module) -> dict[str, Any]:  # fmt: skip
    """Per-image ``lpips``, ``ssim``, ``edge_f1``, ``spatial_iou`` and the AP matches of images ``[N, 3, H, W]`` in
    [0, 1] (the ``per_image`` form diagnostics.spatial_ci bootstraps)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    rec, orig = reconstructions.float().cpu(), originals.float().cpu()
    lp = torch.cat([lpips_metric(r * 2 - 1, o * 2 - 1).flatten() for r, o in zip(rec.split(16), orig.split(16))])
    ssim = structural_similarity_index_measure(rec, orig, data_range=1.0, reduction="none")
    rec_np, orig_np = rec.numpy(), orig.numpy()
    gt = [o.boxes[0].astype(np.float64) for o in objects]
    return {"lpips": lp.tolist(), "ssim": ssim.tolist(), "edge_f1": edge_f1(rec_np, orig_np).tolist(),
            "spatial_iou": spatial_iou(rec_np, objects).tolist(),
            "ap_matches": [(s.tolist(), t.tolist()) for s, t in match_detections(component_detections(rec_np), gt)],
            "n_gt": [len(g) for g in gt]}  # fmt: skip
