"""Attention diagnostics: how spread out attention is (entropy), where it flows (rollout), and by group.

Attention maps are softmax outputs shaped ``[B, heads, Q, K]`` (as ``EncoderOutput.attentions``); numpy
arrays or torch tensors are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy.special import entr

from fmprobe.errors import FmprobeError

ROW_SUM_TOL = 1e-2  # loose enough for fp16/bf16 softmax outputs, tight enough to catch logits or masks


def _as_attention(attn: object, what: str) -> np.ndarray:
    """float64 [B, heads, Q, K] whose rows are probability distributions, or a clear error."""
    if not isinstance(attn, np.ndarray):
        import torch

        if not isinstance(attn, torch.Tensor):
            raise FmprobeError(f"{what}: expected a numpy array or torch tensor, got {type(attn).__name__}")
        attn = attn.detach().to(device="cpu", dtype=torch.float64).numpy()
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim != 4:
        raise FmprobeError(f"{what}: expected shape [B, heads, Q, K], got {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        b, h, q, _ = np.argwhere(~np.isfinite(a) | (a < 0))[0]
        raise FmprobeError(f"{what}: negative or non-finite weight at [batch {b}, head {h}, query {q}]")
    sums = a.sum(axis=-1)
    off = np.abs(sums - 1.0) > ROW_SUM_TOL
    if off.any():
        b, h, q = np.argwhere(off)[0]
        raise FmprobeError(
            f"{what}: row [batch {b}, head {h}, query {q}] sums to {sums[b, h, q]:.4g}, not 1; pass softmax "
            "attention probabilities, not logits"
        )
    return a


def attention_entropy(
    attn: object, normalise: bool = True, reduce: Literal["head", "sample", "none"] = "head"
) -> np.ndarray:
    """Shannon entropy of each query's attention distribution over the K keys (natural log, 0 log 0 = 0).

    With ``normalise`` the entropy is divided by log K, so 1.0 is uniform attention and 0.0 attends to one key,
    comparable across token counts. ``reduce``: ``"head"`` -> ``[heads]`` (mean over batch and queries),
    ``"sample"`` -> ``[B, heads]`` (mean over queries), ``"none"`` -> ``[B, heads, Q]``.
    """
    a = _as_attention(attn, "attention")
    h = entr(a).sum(axis=-1)
    if normalise:
        k = a.shape[-1]
        if k < 2:
            raise FmprobeError("attention over a single key has no entropy to normalise; use normalise=False")
        h = h / np.log(k)
    if reduce == "head":
        return h.mean(axis=(0, 2))
    if reduce == "sample":
        return h.mean(axis=2)
    if reduce == "none":
        return h
    raise FmprobeError(f"unknown reduce '{reduce}'; use 'head', 'sample' or 'none'")


def attention_rollout(attentions: Sequence[object], add_residual: bool = True) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

    ``attentions`` lists each layer's ``[B, heads, N, N]`` map, first layer first. Per layer: average the
    heads; with ``add_residual`` add the identity (the skip connection) and renormalise rows, i.e.
    0.5 W + 0.5 I. Rollout = A_L ... A_2 A_1, shape ``[B, N, N]``; row i says how much each input token
    reaches output token i. Rows sum to 1.
    """
    if len(attentions) == 0:
        raise FmprobeError("attention rollout needs at least one layer of attention maps")
    rollout: np.ndarray | None = None
    for i, attn in enumerate(attentions):
        a = _as_attention(attn, f"layer {i} attention")
        if a.shape[2] != a.shape[3]:
            raise FmprobeError(f"layer {i} attention: rollout needs self-attention [B, heads, N, N], got {a.shape}")
        w = a.mean(axis=1)
        if add_residual:
            w = w + np.eye(w.shape[-1])
            w = w / w.sum(axis=-1, keepdims=True)
        if rollout is not None and rollout.shape != w.shape:
            raise FmprobeError(f"layer {i} attention has shape {a.shape}; earlier layers give {rollout.shape}")
        rollout = w if rollout is None else w @ rollout
    return rollout


def _label_key(label: object) -> str:
    """"1,0,1" for a multilabel row, the plain value for a single label; bools and whole floats print as ints."""
    values = np.atleast_1d(np.asarray(label)).tolist()
    whole = [isinstance(v, bool) or (isinstance(v, float) and v.is_integer()) for v in values]
    return ",".join(str(int(v)) if w else str(v) for v, w in zip(values, whole, strict=True))


def entropy_by_group(entropies: np.ndarray, labels: np.ndarray | Sequence[object]) -> dict[str, dict[str, float | int]]:
    """Mean, sample SD (ddof=1; NaN when n == 1) and n of per-sample entropies for each label combination.

    ``entropies`` is ``[N]``, one value per sample (e.g. ``attention_entropy(..., reduce="sample")`` averaged
    over heads, or one head's column). ``labels`` is ``[N]`` (key ``"2"``) or multilabel ``[N, C]``
    (key ``"1,0,1"``). Keys are sorted.
    """
    e = np.asarray(entropies, dtype=np.float64)
    lab = np.asarray(labels)
    if e.ndim != 1:
        raise FmprobeError(f"entropies must be [N] (one value per sample); got shape {e.shape}")
    if lab.ndim not in (1, 2) or lab.shape[0] != e.shape[0]:
        raise FmprobeError(f"labels must be [N] or [N, C] with N={e.shape[0]}; got shape {lab.shape}")
    bad = np.flatnonzero(~np.isfinite(e))
    if bad.size:
        raise FmprobeError(f"entropies have NaN/inf at sample index(es) {bad[:10].tolist()}")
    keys = np.array([_label_key(row) for row in lab])
    out: dict[str, dict[str, float | int]] = {}
    for key in sorted(set(keys.tolist())):
        vals = e[keys == key]
        out[key] = {
            "mean": float(vals.mean()),
            "sd": float(vals.std(ddof=1)) if vals.size > 1 else float("nan"),
            "n": int(vals.size),
        }
    return out
