"""k-nearest neighbours and prototypes (SimpleShot) on cached pooled features, many labelled subsets at once.

Both read the z-scored pooled features of ``probes.inputs`` (centred on the training mean), L2-normalised:

- **knn** (DINOv2's k-NN evaluation): cosine similarity to the labelled rows; the k most similar vote with weights
  exp(similarity / T), normalised over the k (a softmax), for every k of the grid from one top-k. The scores are the
  weighted class shares (multiclass), the weighted share of positives (binary, and per label for multilabel) or the
  weighted mean target (regression). A labelled row is never its own neighbour: its training-split score is the
  leave-one-out vote of the other labelled rows.
- **prototype** (SimpleShot's CL2N + nearest centroid): each class's prototype is the mean of its normalised
  labelled rows; logits are the negative squared Euclidean distances to the prototypes, scores their softmax
  (binary and per label for multilabel: the positive against the negative prototype, sigmoid of the distance
  difference). The predicted class is the nearest prototype; AUROC ranks these scores. They are a monotone map of
  distances, not calibrated probabilities.

Every function takes subsets of training rows (``probes.subsets``) and returns, per split, one score array
``[G, N, out]`` per subset (G: the hyperparameter grid, N: the split's rows; for "train", the subset's own rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmprobe.probes.subsets import batches, padded

GridScores = dict[str, list[np.ndarray]]  # split -> per subset [G, N, out]


def unit_rows(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each split's rows scaled to unit length (cosine similarity becomes a dot product)."""
    return {s: F.normalize(v.float(), dim=1) for s, v in x.items()}


def _queries(unit: dict[str, torch.Tensor], bank: torch.Tensor, split: str) -> torch.Tensor:
    """Similarities ``[B, Nq, n]`` of a split's rows to each subset's labelled rows ``bank [B, n, D]``."""
    if split == "train":  # the subset's own rows
        return bank @ bank.transpose(1, 2)
    return torch.einsum("qd,bnd->bqn", unit[split], bank)


@torch.no_grad()
def knn_scores(x: dict[str, torch.Tensor], values: torch.Tensor, subsets: Sequence[np.ndarray], ks: Sequence[int],
               temperature: float) -> tuple[GridScores, np.ndarray]:  # fmt: skip
    """Scores for every k of ``ks`` (``values [n_train, out]``: one-hot classes, 0/1 labels or targets per
    training row), and the k each subset could use ``[S, G]`` (k capped by its labelled rows, minus one on
    the training split's leave-one-out)."""
    unit = unit_rows(x)
    values = values.float()
    out: GridScores = {s: [np.empty(0)] * len(subsets) for s in x}
    effective = np.zeros((len(subsets), len(ks)), dtype=np.int64)
    n_query = max(len(v) for s, v in unit.items() if s != "train")
    for batch in batches(subsets, cells_per_row=max(n_query, max(len(s) for s in subsets)) * (1 + values.shape[1])):
        rows, mask = padded([subsets[i] for i in batch])
        bank, labels = unit["train"][rows], values[rows]
        for split in x:
            sims = _queries(unit, bank, split).masked_fill(~mask[:, None, :], -torch.inf)
            if split == "train":
                sims.diagonal(dim1=1, dim2=2).fill_(-torch.inf)
            top = min(max(ks), rows.shape[1])
            s, j = sims.topk(top, dim=-1)  # [B, Nq, top], most similar first
            w = torch.exp((s - s[..., :1]) / temperature).nan_to_num(0.0)  # masked rows weigh 0
            votes = torch.gather(labels[:, None].expand(-1, s.shape[1], -1, -1), 2,
                                 j[..., None].expand(-1, -1, -1, labels.shape[-1]))  # fmt: skip
            num, den = (w[..., None] * votes).cumsum(2), w.cumsum(2)
            grid = torch.stack([num[:, :, min(k, top) - 1] / den[:, :, min(k, top) - 1, None].clamp_min(1e-30)
                                for k in ks], dim=1)  # [B, G, Nq, out]  # fmt: skip
            for b, i in enumerate(batch):
                n = len(subsets[i])
                out[split][i] = grid[b, :, :n].double().numpy() if split == "train" else grid[b].double().numpy()
                if split == "train":
                    effective[i] = [min(k, n) for k in ks]
    return out, effective


@torch.no_grad()
def prototype_scores(x: dict[str, torch.Tensor], members: torch.Tensor, subsets: Sequence[np.ndarray],
                     multiclass: bool) -> GridScores:  # fmt: skip
    """Scores (G = 1) from class prototypes; ``members [n_train, C]``: one-hot classes (multiclass, softmax over
    the classes) or 0/1 labels (binary, multilabel: each label's positive against its negative prototype)."""
    unit = unit_rows(x)
    members = members.float()
    out: GridScores = {s: [np.empty(0)] * len(subsets) for s in x}
    n_query = max(len(v) for s, v in unit.items() if s != "train")
    for batch in batches(subsets, cells_per_row=max(n_query, unit["train"].shape[1])):
        rows, mask = padded([subsets[i] for i in batch])
        bank, m = unit["train"][rows], members[rows] * mask[..., None]
        if multiclass:
            means = [torch.einsum("bnc,bnd->bcd", m, bank) / m.sum(1)[..., None]]
        else:
            rest = (1 - m) * mask[..., None]
            means = [torch.einsum("bnc,bnd->bcd", side, bank) / side.sum(1)[..., None] for side in (rest, m)]
        for split in x:
            q = bank if split == "train" else unit[split].expand(len(batch), -1, -1)
            # -||q - m||^2 = 2 q.m - ||m||^2 - ||q||^2, with ||q|| = 1
            logits = [2 * q @ mu.transpose(1, 2) - (mu**2).sum(-1)[:, None, :] - 1 for mu in means]
            scores = torch.softmax(logits[0], -1) if multiclass else torch.sigmoid(logits[1] - logits[0])
            for b, i in enumerate(batch):
                n = len(subsets[i]) if split == "train" else scores.shape[1]
                out[split][i] = scores[b, None, :n].double().numpy()
    return out
