"""The task metric kernels, one definition for every use: rows of weights, rows of scores, or both.

A *row* is one way of scoring the same N samples: a bootstrap resample (the samples' draw counts as weights,
scores shared), a member of a HeadBank (its own scores, unit weights), or both (a label-efficiency repeat on a
resample, with its own decision thresholds). Every kernel takes ``y`` shared by all
rows, scores ``s`` either shared ``[N, ...]`` or per row ``[R, N, ...]``, and weights ``w [R, N]`` or None (unit
weights), and returns one value per row. With unit weights the values equal scikit-learn's (tested); with
multiplicity weights they equal scikit-learn on the repeated samples. A metric undefined for a row (AUROC with
one class present, R² of a constant target, ...) is NaN there.
"""

from __future__ import annotations

import numpy as np


def div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """Mean over defined entries; NaN (no warning) where none is defined."""
    ok = ~np.isnan(a)
    return div(np.where(ok, a, 0).sum(axis), ok.sum(axis).astype(np.float64))


def _rows(s: np.ndarray, w: np.ndarray | None, sample_ndim: int) -> int:
    """Number of rows: of the weights, else of the per-row scores."""
    if w is not None:
        return len(w)
    return len(s) if s.ndim > sample_ndim else 1


def _weights(w: np.ndarray | None, rows: int, n: int) -> np.ndarray:
    return np.ones((rows, n)) if w is None else np.asarray(w, dtype=np.float64)


def tie_bounds(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ascending scores ``[R, N]``: first and last position of each position's block of equal scores."""
    r, n = sorted_scores.shape
    idx = np.broadcast_to(np.arange(n), (r, n))
    new = np.ones((r, n), dtype=bool)
    new[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    last = np.ones((r, n), dtype=bool)
    last[:, :-1] = new[:, 1:]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, idx, n)[:, ::-1], axis=1)[:, ::-1]
    return start, end


def ranking(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision per row of 0/1 labels ``y [N]`` against scores ``s [N]`` or ``[R, N]``.

    One sort per distinct score row; the order inside a block of tied scores does not matter. AUROC is the
    weighted Mann-Whitney statistic (a tie counts 1/2); AP is scikit-learn's step-wise form: every positive
    contributes the precision at the far end of its block of tied scores, walking from the highest score down.
    """
    s = np.asarray(s, dtype=np.float64)
    rows = _rows(s, w, 1)
    n = s.shape[-1]
    order = np.argsort(s, axis=-1, kind="mergesort")
    sorted_scores = np.take_along_axis(s, order, axis=-1).reshape(-1, n)
    start, end = tie_bounds(sorted_scores)  # [1 or R, N]
    order = np.broadcast_to(order.reshape(-1, n), (rows, n))
    pos = np.asarray(y)[order] == 1  # [R, N] in ascending score order
    wo = np.take_along_axis(_weights(w, rows, n), order, axis=1)
    wpos, wneg = wo * pos, wo * ~pos
    cum_neg = np.zeros((rows, n + 1))
    np.cumsum(wneg, axis=1, out=cum_neg[:, 1:])
    below = np.take_along_axis(cum_neg, np.broadcast_to(start, (rows, n)), axis=1)
    upto = np.take_along_axis(cum_neg, np.broadcast_to(end + 1, (rows, n)), axis=1)
    total_pos, total_neg = wpos.sum(axis=1), cum_neg[:, -1]
    auroc = div((wpos * (below + upto)).sum(axis=1) / 2, total_pos * total_neg)
    cum_pos, cum_all = np.zeros((rows, n + 1)), np.zeros((rows, n + 1))
    np.cumsum(wpos, axis=1, out=cum_pos[:, 1:])
    np.cumsum(wo, axis=1, out=cum_all[:, 1:])
    first = np.broadcast_to(start, (rows, n))
    above = total_pos[:, None] - np.take_along_axis(cum_pos, first, axis=1)  # positives scoring >= this block
    seen = cum_all[:, -1:] - np.take_along_axis(cum_all, first, axis=1)
    precision = np.where(wpos > 0, div(above, seen), 0.0)
    ap = div((wpos * precision).sum(axis=1), total_pos)
    return auroc, ap


def counts(y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Weighted tp, fp, fn, tn per row of 0/1 ``y [N]`` and predictions ``[N]`` or ``[R, N]``."""
    yb, pb = y == 1, pred == 1
    masks = (yb & pb, ~yb & pb, yb & ~pb, ~yb & ~pb)
    if w is None:
        return tuple(np.atleast_2d(m).sum(axis=-1).astype(np.float64) for m in masks)
    return tuple((w * m).sum(axis=-1) for m in masks)


def f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    return div(2 * tp, 2 * tp + fp + fn)


RANKED = ("auroc", "ap", "auroc_ovr", "map", "macro_auroc")  # need the sort of every row's scores (the costly part)


def ranked(metric: str) -> bool:
    """Whether ``metric`` (e.g. ``auroc``, ``ap/label``) is one of the ranking metrics."""
    return metric.split("/")[0] in RANKED


def binary(y: np.ndarray, s: np.ndarray, w: np.ndarray | None, thr: float | np.ndarray,
           rank: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """``thr``: one decision threshold, or one per row ``[R, 1]``; ``rank`` False leaves out AUROC and AP."""
    tp, fp, fn, tn = counts(y, (s >= thr).astype(np.int64), w)
    out = dict(zip(("auroc", "ap"), ranking(y, s, w))) if rank else {}
    out.update({
        "f1": f1(tp, fp, fn),
        "accuracy": div(tp + tn, tp + fp + fn + tn),
        "balanced_accuracy": nanmean(np.stack([div(tp, tp + fn), div(tn, tn + fp)], axis=1), axis=1),
    })  # fmt: skip
    return out


def multiclass(y: np.ndarray, p: np.ndarray, w: np.ndarray | None, names: list[str],
               rank: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """``rank`` False leaves out the one-vs-rest AUROC."""
    k, n = p.shape[-1], len(y)
    rows = _rows(p, w, 2)
    code = np.broadcast_to(y * k + p.argmax(axis=-1), (rows, n)) + (k * k) * np.arange(rows)[:, None]
    weights = None if w is None else np.asarray(w, dtype=np.float64).ravel()
    cm = np.bincount(code.ravel(), weights=weights, minlength=rows * k * k).reshape(rows, k, k).astype(np.float64)
    aucs = np.stack([ranking((y == c).astype(np.int64), p[..., c], w)[0] for c in range(k)], axis=1) if rank else None
    return multiclass_metrics(cm, aucs, names)


def multiclass_metrics(cm: np.ndarray, aucs: np.ndarray | None, names: list[str]) -> dict[str, np.ndarray]:
    """Multiclass metrics of R confusion matrices ``[R, k, k]`` (true x predicted) and one-vs-rest AUROCs ``[R, k]``
    (None: no ``auroc_ovr``)."""
    support, predicted, diag = cm.sum(axis=2), cm.sum(axis=1), np.einsum("rkk->rk", cm)
    per_class_f1 = div(2 * diag, support + predicted)
    out = {
        "balanced_accuracy": nanmean(div(diag, support), axis=1),
        "accuracy": div(diag.sum(axis=1), support.sum(axis=1)),
        "macro_f1": nanmean(per_class_f1, axis=1),
    }
    if aucs is not None:
        out["auroc_ovr"] = aucs.mean(axis=1)  # NaN when a class is absent, as compute_metrics
    out.update({f"f1/{n}": per_class_f1[:, c] for c, n in enumerate(names)})
    return out


def multilabel(y: np.ndarray, s: np.ndarray, w: np.ndarray | None, names: list[str],
               thr: np.ndarray, rank: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """``thr``: decision thresholds per label ``[C]``, or per row and label ``[R, C]``; ``rank`` False leaves out
    AP and AUROC."""
    label_f1 = np.stack([f1(*counts(y[:, c], (s[..., c] >= thr[..., c, None]).astype(np.int64), w)[:3])
                         for c in range(len(names))], axis=1)  # fmt: skip
    if not rank:
        return {"macro_f1": nanmean(label_f1, axis=1), **{f"f1/{n}": label_f1[:, c] for c, n in enumerate(names)}}
    per_label = [ranking(y[:, c], s[..., c], w) for c in range(len(names))]
    auc = np.stack([r[0] for r in per_label], axis=1)
    ap = np.stack([r[1] for r in per_label], axis=1)
    out = {"map": nanmean(ap, axis=1), "macro_auroc": nanmean(auc, axis=1), "macro_f1": nanmean(label_f1, axis=1)}
    for c, n in enumerate(names):
        out[f"ap/{n}"], out[f"auroc/{n}"], out[f"f1/{n}"] = ap[:, c], auc[:, c], label_f1[:, c]
    return out


def regression(y: np.ndarray, s: np.ndarray, w: np.ndarray | None, names: list[str]) -> dict[str, np.ndarray]:
    """R², MAE, RMSE and Pearson r per target, averaged over targets. Each target is scored on the rows where it has
    a value (NaN in ``y``: none, ``task.missing_targets: mask``), its weights those rows' weights. R² is undefined
    for a (nearly) constant target or one without rows, r also for a (nearly) constant output (variance below
    1e-12 of the mean square)."""
    rows = _rows(s, w, 2)
    observed = ~np.isnan(y)  # [N, C]
    wr = _weights(w, rows, len(y))[:, :, None] * observed  # [R, N, C]: a target's own rows only
    sw = wr.sum(axis=1)  # [R, C]
    y0 = np.where(observed, y, 0.0)
    centre = div(y0.sum(axis=0), observed.sum(axis=0).astype(np.float64))
    yc = np.where(observed, y0 - np.nan_to_num(centre), 0.0)  # centre once for numerical stability
    sc = s - s.mean(axis=-2, keepdims=True)
    err = s - y0

    def mean(v: np.ndarray) -> np.ndarray:  # weighted mean over a target's rows: [R, C]
        return div((wr * v).sum(axis=1), sw)

    my, ms = mean(yc), mean(sc)
    scale_y, scale_s = mean(yc**2), mean(sc**2)
    var_y, var_s = scale_y - my**2, scale_s - ms**2
    mse = mean(err**2)
    with np.errstate(invalid="ignore"):
        y_ok = var_y > 1e-12 * np.maximum(scale_y, 1e-300)
        ok = y_ok & (var_s > 1e-12 * np.maximum(scale_s, 1e-300))
    r2 = np.where(y_ok, 1 - mse / np.where(y_ok, var_y, 1), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(ok, (mean(yc * sc) - my * ms) / np.sqrt(np.abs(var_y * var_s)), np.nan)
    mae, rmse = mean(np.abs(err)), np.sqrt(mse)
    out = {"r2": r2.mean(axis=1), "mae": mae.mean(axis=1), "rmse": rmse.mean(axis=1), "pearson_r": r.mean(axis=1)}
    for c, n in enumerate(names):
        out[f"r2/{n}"], out[f"mae/{n}"] = r2[:, c], mae[:, c]
        out[f"rmse/{n}"], out[f"pearson_r/{n}"] = rmse[:, c], r[:, c]
    return out
