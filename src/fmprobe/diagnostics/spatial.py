"""Spatial probes on patch tokens: does a model's token grid hold where objects are and what they cover?

Three linear probes, each trained on a train split and scored on a held-out split:

- box: every token proposes a box as offsets from its own cell centre (a linear layer), and per box coordinate
  a learned softmax attention over tokens (a linear score plus a per-position bias) averages the proposals
  into the box of the largest object (the one with most mask pixels). Trained with L1 on normalised
  coordinates; scored by mean IoU.
- mask: a per-token linear classifier says whether the token's cell is mostly (> 50 % of its pixels) covered
  by any object; its logits are upsampled bilinearly to pixels and thresholded at 0. Scored by foreground IoU
  per image, averaged over images.
- detection: a tiny CenterNet on the grid. Per token, an objectness logit (positive = the cell holding an
  object's box centre; when two centres share a cell the larger object owns it) and a box relative to the cell.
  Decoded by score threshold + non-maximum suppression; scored by class-agnostic AP at IoU 0.5 computed the
  COCO way (see :func:`coco_average_precision`). Class-agnostic because the question is whether the grid
  localises objects; what they are is the classification probes' job.

Tokens are standardised with train statistics. For clips, each temporal slice of the token grid is scored as
an image against the middle frame of the frames it covers. Prior baselines (the mean train box; the train
frequency of each patch being covered) show what a probe gets from the layout of the data alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmprobe.diagnostics.shapes import SampleObjects
from fmprobe.errors import FmprobeError
from fmprobe.train.core import FitPlan, fit
from fmprobe.train.members import ModuleMember
from fmprobe.train.seeding import seeded
from fmprobe.train.sources import DrawnBatches

Grid = tuple[int, int, int]
Cells = tuple[torch.Tensor, torch.Tensor, float, float]  # cell centres x, y [h*w] and cell width, height (pixels)
STEPS = 300
BATCH = 32
# The box probe learns from one target per image through a softmax, and larger steps make it unstable for
# wide tokens (D ~ 768); the per-token probes see h*w targets per image and take larger steps.
LR_BOX = 3e-3
LR_TOKEN = 1e-2
WEIGHT_DECAY = 1e-2
SCORE_THRESHOLD = 0.05
NMS_IOU = 0.5
MAX_DETECTIONS = 100
MIN_MOTION = 0.02  # an object must move this share of the image between the first and last slice to have a direction
DIRECTION_TOLERANCE = 45.0  # degrees between the probe's and the true motion for a right direction
_LOG_SIZE_LIMIT = 4.0  # box sizes are predicted as exp(<= 4) cells, so a bad start cannot overflow


# ---------------------------------------------------------------------------------------------- boxes and AP


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[M, K]`` of boxes ``a [M, 4]`` and ``b [K, 4]`` given as (x0, y0, x1, y1)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> np.ndarray:
    """Indices of the boxes greedy non-maximum suppression keeps, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(int(best))
        order = order[box_iou(boxes[best], boxes[order])[0] < iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def coco_average_precision(
    detections: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    *,
    iou_threshold: float = 0.5,
    max_detections: int = MAX_DETECTIONS,
) -> float:
    """Class-agnostic average precision as COCO computes it (pycocotools ``COCOeval``, one class, area "all").

    ``detections[i]`` is ``(boxes [M, 4], scores [M])`` and ``ground_truth[i]`` is ``boxes [K, 4]`` for image i.
    Per image, the ``max_detections`` best-scoring detections are matched greedily in score order, each to the
    unmatched ground-truth box it overlaps most with IoU >= ``iou_threshold``; the rest are false positives
    (duplicates included). Detections of all images are then ranked by score, precision is made monotone
    (each value raised to the best precision at any higher recall) and read at the 101 recall points
    0, 0.01, ..., 1 (0 beyond the highest recall reached); AP is their mean.
    """
    matches = match_detections(detections, ground_truth, iou_threshold=iou_threshold, max_detections=max_detections)
    return matched_average_precision(matches, [len(np.asarray(g).reshape(-1, 4)) for g in ground_truth])


def match_detections(
    detections: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    *,
    iou_threshold: float = 0.5,
    max_detections: int = MAX_DETECTIONS,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, the kept detections' ``(scores, is_true_positive)`` in score order (the per-image half of
    :func:`coco_average_precision`; images are independent, so a bootstrap over images reuses the matches)."""
    if len(detections) != len(ground_truth):
        raise FmprobeError(f"detections cover {len(detections)} images but ground truth covers {len(ground_truth)}")
    matches = []
    for (boxes, scores), gt in zip(detections, ground_truth):
        boxes, scores = np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64)
        if len(boxes) != len(scores):
            raise FmprobeError(f"an image has {len(boxes)} detection boxes but {len(scores)} scores")
        order = np.argsort(-scores, kind="mergesort")[:max_detections]
        ious = box_iou(boxes[order], gt)
        matched = np.zeros(ious.shape[1], dtype=bool)
        tp = np.zeros(len(order), dtype=bool)
        for d in range(len(order)):
            candidates = np.where(matched, -1.0, ious[d])
            if candidates.size and candidates.max() >= iou_threshold:
                matched[int(np.argmax(candidates))] = True
                tp[d] = True
        matches.append((scores[order], tp))
    return matches


def matched_average_precision(matches: Sequence[tuple[np.ndarray, np.ndarray]], n_gt: Sequence[int]) -> float:
    """COCO AP from per-image ``(scores, is_true_positive)`` and ground-truth counts (the ranking half)."""
    total = int(sum(n_gt))
    if total == 0:
        raise FmprobeError("average precision is undefined without any ground-truth box")
    scores_cat = np.concatenate([m[0] for m in matches]) if matches else np.empty(0)
    if scores_cat.size == 0:
        return 0.0
    tp_cat = np.concatenate([m[1] for m in matches])
    rank = np.argsort(-scores_cat, kind="mergesort")
    tp_cum = np.cumsum(tp_cat[rank])
    fp_cum = np.cumsum(~tp_cat[rank])
    recall = tp_cum / total
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0).mean())


# ---------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class _Frames:
    """Targets of every (sample, temporal slice): one image each for the probes."""

    boxes: list[np.ndarray]  # [K, 4] pixel boxes per image
    largest: np.ndarray  # [M, 4] pixel box of the largest object
    union: np.ndarray  # [M, H, W] bool, any object


def _frames(objects: Sequence[SampleObjects], t: int, image_size: tuple[int, int], split: str) -> _Frames:
    boxes, largest, union = [], [], []
    for i, objs in enumerate(objects):
        n_frames = objs.masks.shape[0]
        if tuple(objs.masks.shape[-2:]) != image_size:
            raise FmprobeError(
                f"{split} sample {i}: masks are {objs.masks.shape[-2]}x{objs.masks.shape[-1]} but image_size is "
                f"{image_size[0]}x{image_size[1]}; annotations must be in the encoder's input pixels"
            )
        if n_frames % t:
            raise FmprobeError(
                f"{split} sample {i}: {n_frames} annotated frames do not split evenly over the token grid's t={t}"
            )
        if objs.boxes.shape[1] == 0:
            raise FmprobeError(f"{split} sample {i} has no objects; every image needs at least one")
        per_slice = n_frames // t
        for j in range(t):
            f = j * per_slice + per_slice // 2
            areas = objs.masks[f].sum(axis=(1, 2))
            boxes.append(objs.boxes[f].astype(np.float64))
            largest.append(objs.boxes[f, int(np.argmax(areas))])
            union.append(objs.masks[f].any(axis=0))
    return _Frames(boxes=boxes, largest=np.stack(largest).astype(np.float64), union=np.stack(union))


def _cells(h: int, w: int, image_size: tuple[int, int]) -> Cells:
    """Cell centres (x, y) ``[h*w]`` each, in raster order, and the cell size, in pixels."""
    ch, cw = image_size[0] / h, image_size[1] / w
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return (xs.reshape(-1) + 0.5) * cw, (ys.reshape(-1) + 0.5) * ch, cw, ch


def _cell_boxes(raw: torch.Tensor, cells: Cells) -> torch.Tensor:
    """Per-token (dx, dy, log w, log h) in cell units -> pixel boxes (x0, y0, x1, y1), shape ``[..., L, 4]``."""
    cx, cy, cw, ch = cells
    x = cx + raw[..., 0] * cw
    y = cy + raw[..., 1] * ch
    bw = cw * torch.exp(raw[..., 2].clamp(max=_LOG_SIZE_LIMIT))
    bh = ch * torch.exp(raw[..., 3].clamp(max=_LOG_SIZE_LIMIT))
    return torch.stack([x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2], dim=-1)


# ---------------------------------------------------------------------------------------------- probes


class _BoxProbe(nn.Module):
    def __init__(self, dim: int, n_tokens: int, cells: Cells):
        super().__init__()
        self.score = nn.Linear(dim, 4)
        self.position = nn.Parameter(torch.zeros(n_tokens, 4))
        self.box = nn.Linear(dim, 4)
        self.cells = cells

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = torch.softmax(self.score(x) + self.position, dim=1)  # [B, L, 4]: one per box coordinate
        cx, cy, cw, ch = self.cells
        centre = torch.stack([cx, cy, cx, cy], dim=-1)
        size = torch.tensor([cw, ch, cw, ch])
        return (attention * (centre + self.box(x) * size)).sum(dim=1)


def _fit(probe: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
         target: torch.Tensor, steps: int, lr: float) -> None:  # fmt: skip
    """AdamW (weight decay on every parameter) with cosine decay over ``steps`` minibatches of ``BATCH`` train
    images drawn with replacement, through the training core; draws from the caller's seeded stream."""
    group = {"params": list(probe.parameters()), "weight_decay": WEIGHT_DECAY, "base_lr": lr, "warmup_steps": 0,
             "start_step": 0}  # fmt: skip
    source = DrawnBatches(len(x), lambda rows: (x[rows], target[rows]), steps=steps, batch_size=BATCH)
    fit(ModuleMember("probe", probe, [group], loss_fn), source, None, FitPlan(epochs=1))
    probe.eval()


def _mean_iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image foreground IoU of boolean masks ``[M, H, W]``; an image empty in both counts as 1."""
    inter = (pred & target).sum(axis=(1, 2))
    union = (pred | target).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _box_probe(
    x_tr: torch.Tensor, y_tr: _Frames, x_te: torch.Tensor, y_te: _Frames, cells: Cells, image_size: tuple[int, int],
    steps: int,
) -> tuple[np.ndarray, float]:
    """Per-image IoU of the predicted largest-object box on test, and the IoU of the mean train box."""
    scale = torch.tensor([image_size[1], image_size[0]] * 2, dtype=torch.float32)
    target = torch.as_tensor(y_tr.largest, dtype=torch.float32)
    probe = _BoxProbe(x_tr.shape[-1], x_tr.shape[1], cells)
    _fit(probe, lambda pred, box: F.l1_loss(pred / scale, box / scale), x_tr, target, steps, LR_BOX)
    with torch.no_grad():
        pred = probe(x_te).numpy()
    ious = np.array([box_iou(p, g)[0, 0] for p, g in zip(pred, y_te.largest)])
    prior = y_tr.largest.mean(axis=0)
    prior_iou = float(np.mean([box_iou(prior, g)[0, 0] for g in y_te.largest]))
    return ious, prior_iou


def _patch_targets(union: np.ndarray, h: int, w: int) -> torch.Tensor:
    """``[M, h*w]`` 1.0 where more than half of a cell's pixels are foreground."""
    covered = F.adaptive_avg_pool2d(torch.as_tensor(union, dtype=torch.float32).unsqueeze(1), (h, w))
    return (covered.flatten(1) > 0.5).float()


def _upsampled_masks(logits: torch.Tensor, h: int, w: int, image_size: tuple[int, int]) -> np.ndarray:
    up = F.interpolate(logits.reshape(-1, 1, h, w), size=image_size, mode="bilinear", align_corners=False)
    return (up[:, 0] > 0).numpy()


def _mask_probe(
    x_tr: torch.Tensor, y_tr: _Frames, x_te: torch.Tensor, y_te: _Frames, h: int, w: int,
    image_size: tuple[int, int], steps: int,
) -> tuple[np.ndarray, float]:
    """Per-image pixel IoU of the upsampled patch masks on test, and that of the train patch-frequency prior."""
    target = _patch_targets(y_tr.union, h, w)
    probe = nn.Linear(x_tr.shape[-1], 1)
    _fit(probe, lambda out, y: F.binary_cross_entropy_with_logits(out.squeeze(-1), y), x_tr, target, steps, LR_TOKEN)
    with torch.no_grad():
        pred = _upsampled_masks(probe(x_te).squeeze(-1), h, w, image_size)
    frequency = target.mean(dim=0).clamp(1e-6, 1 - 1e-6)
    prior = _upsampled_masks(torch.logit(frequency), h, w, image_size)
    prior_iou = float(_mean_iou(np.broadcast_to(prior, y_te.union.shape), y_te.union).mean())
    return _mean_iou(pred, y_te.union), prior_iou


def _centre_targets(
    frames: _Frames, h: int, w: int, cells: Cells
) -> tuple[torch.Tensor, torch.Tensor]:
    """Objectness ``[M, h*w]`` and cell-relative (dx, dy, log w, log h) ``[M, h*w, 4]`` of each centre cell."""
    cx, cy, cw, ch = cells
    m = len(frames.boxes)
    objectness = torch.zeros(m, h * w)
    regression = torch.zeros(m, h * w, 4)
    for i, boxes in enumerate(frames.boxes):
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for box in boxes[np.argsort(areas, kind="stable")]:  # larger objects last, so they own a shared cell
            x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            cell = min(int(y / ch), h - 1) * w + min(int(x / cw), w - 1)
            objectness[i, cell] = 1.0
            regression[i, cell] = torch.tensor(
                [(x - cx[cell]) / cw, (y - cy[cell]) / ch, np.log((box[2] - box[0]) / cw), np.log((box[3] - box[1]) / ch)]
            )
    return objectness, regression


def _detection_probe(
    x_tr: torch.Tensor, y_tr: _Frames, x_te: torch.Tensor, y_te: _Frames, h: int, w: int, cells: Cells, steps: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    """The decoded test detections per image, and those matched per image (for class-agnostic COCO AP@0.5)."""
    objectness, regression = _centre_targets(y_tr, h, w, cells)
    pos_weight = (objectness.numel() - objectness.sum()) / objectness.sum()
    probe = nn.Linear(x_tr.shape[-1], 5)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # target: objectness, then the box
        pos = target[..., 0].bool()
        cls = F.binary_cross_entropy_with_logits(out[..., 0], target[..., 0], pos_weight=pos_weight)
        return cls + F.l1_loss(out[..., 1:][pos], target[..., 1:][pos])

    _fit(probe, loss, x_tr, torch.cat([objectness[..., None], regression], dim=-1), steps, LR_TOKEN)
    with torch.no_grad():
        out = probe(x_te)
        scores = torch.sigmoid(out[..., 0]).numpy()
        boxes = _cell_boxes(out[..., 1:], cells).numpy()
    detections = []
    for b, s in zip(boxes, scores):
        kept = np.flatnonzero(s >= SCORE_THRESHOLD)
        kept = kept[nms(b[kept], s[kept])][:MAX_DETECTIONS]
        detections.append((b[kept], s[kept]))
    return detections, match_detections(detections, y_te.boxes)


def direction_hits(detections: Sequence[tuple[np.ndarray, np.ndarray]], objects: Sequence[SampleObjects], t: int,
                   image_size: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per clip: how many of its moving objects the detection probe gives the right direction, and how many moved.

    An object's true motion is its box centre's displacement from the first to the last temporal slice (the middle
    frame of each, as the probes are scored); objects that moved less than ``MIN_MOTION`` of the image are left out
    (no direction to tell). The probe's motion is the displacement between its boxes that overlap the object most in
    those two slices; it is right when the angle to the true motion is under ``DIRECTION_TOLERANCE`` degrees (so
    chance is 1/4 for a random direction). An object no detection overlaps in either slice counts as wrong.
    """
    hits, moved = np.zeros(len(objects), dtype=np.int64), np.zeros(len(objects), dtype=np.int64)
    for i, objs in enumerate(objects):
        per_slice = objs.boxes.shape[0] // t
        first, last = per_slice // 2, (t - 1) * per_slice + per_slice // 2
        truth = _centres(objs.boxes[last]) - _centres(objs.boxes[first])
        for k in np.flatnonzero(np.linalg.norm(truth, axis=1) >= MIN_MOTION * image_size):
            moved[i] += 1
            ends = []
            for j, f in ((0, first), (t - 1, last)):
                boxes = detections[i * t + j][0]
                overlap = box_iou(boxes, objs.boxes[f, k])[:, 0] if len(boxes) else np.zeros(0)
                ends.append(_centres(boxes[int(np.argmax(overlap))][None])[0] if overlap.size and overlap.max() > 0
                            else None)  # fmt: skip
            if ends[0] is None or ends[1] is None:
                continue
            guess = ends[1] - ends[0]
            norm = np.linalg.norm(guess) * np.linalg.norm(truth[k])
            hits[i] += bool(norm > 0 and guess @ truth[k] / norm > np.cos(np.radians(DIRECTION_TOLERANCE)))
    return hits, moved


def _centres(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


# ---------------------------------------------------------------------------------------------- entry point


def _as_images(tokens: np.ndarray, grid: Grid, split: str) -> np.ndarray:
    """``[N, t*h*w, D]`` -> ``[N*t, h*w, D]`` float32 (sample-major, then time)."""
    t, h, w = grid
    tokens = np.asarray(tokens)
    if tokens.ndim != 3 or tokens.shape[1] != t * h * w:
        raise FmprobeError(
            f"{split} tokens must be [N, t*h*w, D] with t*h*w = {t * h * w} for grid {grid}, got {tokens.shape}"
        )
    return tokens.reshape(tokens.shape[0] * t, h * w, tokens.shape[2]).astype(np.float32)


def run_spatial_probes(
    tokens_train: np.ndarray,
    grid: Grid,
    ann_train: Sequence[SampleObjects],
    tokens_test: np.ndarray,
    ann_test: Sequence[SampleObjects],
    image_size: int | tuple[int, int],
    *,
    seed: int = 0,
    steps: int = STEPS,
) -> dict:
    """Train the box, mask and detection probes on the train tokens; score them on the test tokens.

    ``tokens_*`` are ``[N, t*h*w, D]`` patch tokens in raster order with grid ``(t, h, w)``; ``ann_*`` hold each
    sample's objects in the pixels of the encoder's input (``image_size``, an int for square images).
    Returns ``box_iou``, ``mask_iou``, ``map50`` and the priors ``box_iou_prior`` / ``mask_iou_prior``, the
    image counts, and ``per_image`` lists (one entry per test image or clip slice, sample-major): box and mask
    IoU, ``ap_matches`` (the detections' scores and true-positive flags) and ``n_gt`` (ground-truth boxes), from
    which diagnostics.spatial_ci bootstraps CIs. Clips (t > 1) with moving objects add ``direction_accuracy`` (the
    share of moving objects whose direction the detection probe's boxes get right, :func:`direction_hits`) and
    its per-clip counts ``direction_hits`` / ``direction_moved``.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    t, h, w = grid
    for split, tokens, ann in (("train", tokens_train, ann_train), ("test", tokens_test, ann_test)):
        if len(tokens) != len(ann):
            raise FmprobeError(f"{split}: {len(tokens)} token rows but {len(ann)} annotated samples")
    x_tr, x_te = _as_images(tokens_train, grid, "train"), _as_images(tokens_test, grid, "test")
    if x_tr.shape[-1] != x_te.shape[-1]:
        raise FmprobeError(f"train tokens have D={x_tr.shape[-1]} but test tokens D={x_te.shape[-1]}")
    y_tr, y_te = _frames(ann_train, t, size, "train"), _frames(ann_test, t, size, "test")
    mean = x_tr.mean(axis=(0, 1))
    std = x_tr.std(axis=(0, 1)) + 1e-6
    x_tr_t = torch.from_numpy((x_tr - mean) / std)
    x_te_t = torch.from_numpy((x_te - mean) / std)
    cells = _cells(h, w, size)

    with seeded(seed):  # the probes' initialisation and their minibatch draws
        box_ious, box_prior = _box_probe(x_tr_t, y_tr, x_te_t, y_te, cells, size, steps)
        mask_ious, mask_prior = _mask_probe(x_tr_t, y_tr, x_te_t, y_te, h, w, size, steps)
        detections, matches = _detection_probe(x_tr_t, y_tr, x_te_t, y_te, h, w, cells, steps)
    n_gt = [len(b) for b in y_te.boxes]
    map50 = matched_average_precision(matches, n_gt)
    direction = {}
    if t > 1:
        hits, moved = direction_hits(detections, ann_test, t, size[0])
        if moved.sum():
            direction = {"direction_accuracy": float(hits.sum() / moved.sum()), "moving_objects": int(moved.sum()),
                         "direction_hits": hits.tolist(), "direction_moved": moved.tolist()}  # fmt: skip
    return {**direction,
        "box_iou": float(box_ious.mean()),
        "box_iou_prior": box_prior,
        "mask_iou": float(mask_ious.mean()),
        "mask_iou_prior": mask_prior,
        "map50": map50,
        "n_train_images": len(x_tr),
        "n_test_images": len(x_te),
        "per_image": {"box_iou": box_ious.tolist(), "mask_iou": mask_ious.tolist(),
                      "ap_matches": [(scores.tolist(), tp.tolist()) for scores, tp in matches], "n_gt": n_gt},
    }
