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
Memory is bounded: queries go in chunks, subsets in batches.
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


def query_chunks(n_query: int, n_columns: int, budget: int = 2**24) -> list[slice]:
    """Slices of query rows whose similarities to ``n_columns`` rows stay within ``budget`` entries."""
    size = max(1, budget // max(n_columns, 1))
    return [slice(i, min(i + size, n_query)) for i in range(0, n_query, size)]


def _votes(sims: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], temperature: float) -> torch.Tensor:
    """Scores ``[B, G, Q, out]`` for every k from similarities ``[B, Q, n]`` (-inf: not a neighbour) to labelled
    rows whose values are ``labels [B, n, out]``: one top-k, then cumulative weighted votes read at each k."""
    top = min(max(ks), sims.shape[-1])
    s, j = sims.topk(top, dim=-1)  # most similar first
    w = torch.exp((s - s[..., :1]) / temperature).nan_to_num(0.0)  # non-neighbours weigh 0
    votes = torch.gather(labels[:, None].expand(-1, s.shape[1], -1, -1), 2,
                         j[..., None].expand(-1, -1, -1, labels.shape[-1]))  # fmt: skip
    num, den = (w[..., None] * votes).cumsum(2), w.cumsum(2)
    return torch.stack([num[:, :, min(k, top) - 1] / den[:, :, min(k, top) - 1, None].clamp_min(1e-30) for k in ks],
                       dim=1)  # fmt: skip


@torch.no_grad()
def knn_scores(x: dict[str, torch.Tensor], values: torch.Tensor, subsets: Sequence[np.ndarray], ks: Sequence[int],
               temperature: float) -> tuple[GridScores, np.ndarray]:  # fmt: skip
    """Scores for every k of ``ks`` (``values [n_train, out]``: one-hot classes, 0/1 labels or targets per
    training row), and the k each subset could use ``[S, G]`` (capped by its labelled rows).

    Validation and test: a chunk of query rows is compared with every training row once, and each subset reads
    its columns. Training split: each subset's rows against each other, a row never its own neighbour."""
    unit = unit_rows(x)
    values = values.float()
    n_train, width = unit["train"].shape[0], values.shape[1]
    out: GridScores = {}
    for split in (s for s in x if s != "train"):
        parts: list[list[np.ndarray]] = [[] for _ in subsets]
        for chunk in query_chunks(len(unit[split]), n_train):
            every = unit[split][chunk] @ unit["train"].T  # [Q, n_train]
            for batch in batches(subsets, cells_per_row=every.shape[0] * (1 + width)):
                rows, mask = padded([subsets[i] for i in batch])
                sims = every[:, rows].permute(1, 0, 2).masked_fill(~mask[:, None, :], -torch.inf)
                grid = _votes(sims, values[rows], ks, temperature)
                for b, i in enumerate(batch):
                    parts[i].append(grid[b].double().numpy())
        out[split] = [np.concatenate(p, axis=1) for p in parts]
    out["train"] = [np.empty(0)] * len(subsets)
    for batch in batches(subsets, cells_per_row=max(len(s) for s in subsets) * (1 + width)):
        rows, mask = padded([subsets[i] for i in batch])
        bank, labels = unit["train"][rows], values[rows]
        pieces = []
        for chunk in query_chunks(rows.shape[1], rows.shape[1] * len(batch)):
            sims = (bank[:, chunk] @ bank.transpose(1, 2)).masked_fill(~mask[:, None, :], -torch.inf)
            own = torch.arange(rows.shape[1])[chunk]
            sims[:, torch.arange(len(own)), own] = -torch.inf  # leave one out
            pieces.append(_votes(sims, labels, ks, temperature))
        grid = torch.cat(pieces, dim=2)
        for b, i in enumerate(batch):
            out["train"][i] = grid[b, :, : len(subsets[i])].double().numpy()
    effective = np.array([[min(k, len(s)) for k in ks] for s in subsets], dtype=np.int64)
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
