"""Bootstrap CIs of the alignment metrics, resampling samples: is "CKA 0.43" confidently above a 0.40 gate, is
"Spearman rho 0.55" above 0.50, "recall@10 22 %" above 20 %?

A resample repeats some samples, and what a repeat does depends on the metric:

- linear and RBF CKA treat a repeated sample as a weight: each resample gives exactly what
  :func:`~fmprobe.diagnostics.alignment.linear_cka` / :func:`~fmprobe.diagnostics.alignment.rbf_cka` return on the
  repeated rows (computed from the full-sample Gram or distance matrix indexed by the resample: O(N^2) per resample);
- RSA: two copies of one sample are at dissimilarity 0 in both spaces, a pair that says nothing about the
  representations, so their entries are left out (the practice of the RSA toolbox, Nili et al. 2014, when it
  bootstraps stimuli): the rank correlation runs over the pairs of distinct samples of the resample, with their
  multiplicities;
- recall@k and mutual kNN: a copy would be its own nearest neighbour, so each drawn sample looks for its neighbours
  among the *distinct other* samples of the resample (the gallery), and its hit counts as many times as it was drawn;
- linear R^2: the ridge map is fitted once on the training split; its held-out rows are resampled (the interval is
  conditional on the fitted map, as the spatial probes' are on the trained probe).

Fewer distinct samples make CKA drift up and a smaller gallery makes neighbours easier to find, so the resamples of
these metrics sit off the estimate; their percentile interval is shifted by the bootstrap estimate of that bias,
mean(resamples) - estimate (Efron & Tibshirani 1993, ch. 10), so the pessimistic end a gate reads is not optimistic.
The debiased CKA estimators get no interval (their unbiasedness is defined for distinct samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import r2_score

from fmprobe.diagnostics.alignment import (
    METRICS,
    _center_gram,
    _check_k,
    _neighbour_distances,
    _rdm,
    _sq_distances,
    linear_map_predictions,
    rbf_sigma,
)
from fmprobe.diagnostics.alignment_conventions import DEFAULT, AlignmentConventions
from fmprobe.errors import FmprobeError
from fmprobe.evaluate.bootstrap import interval_levels, resample_weights

CKA = ("linear_cka", "rbf_cka")
BOOTSTRAPPABLE = (*CKA, "rsa", "knn_recall", "mutual_knn", "linear_r2")
UNCORRECTED = ("linear_r2",)  # resampled held-out rows of a fixed map: no small-sample drift to correct


def _kernel(x: np.ndarray, metric: str, conventions: AlignmentConventions) -> Callable[[np.ndarray], np.ndarray]:
    """idx -> the centred kernel matrix of the rows ``x[idx]`` (RBF: the bandwidth rule of ``conventions``)."""
    if metric == "linear_cka":
        gram = x @ x.T  # centring the resampled rows' features = centring their Gram matrix
        return lambda idx: _center_gram(gram[np.ix_(idx, idx)])
    d2 = _sq_distances(x)

    def rbf(idx: np.ndarray) -> np.ndarray:
        sub = d2[np.ix_(idx, idx)]
        sigma = rbf_sigma(sub, conventions.rbf_sigma_factor, conventions.rbf_median)
        if sigma == 0.0:
            return np.full_like(sub, np.nan)
        return _center_gram(np.exp(-sub / (2.0 * sigma**2)))

    return rbf


def cka_resamples(a: np.ndarray, b: np.ndarray, metric: str = "linear_cka", *, n_resamples: int = 1000,
                  seed: int = 0, conventions: AlignmentConventions = DEFAULT) -> tuple[float, np.ndarray]:  # fmt: skip
    """``metric`` on all rows, and on each bootstrap resample of the rows (NaN where undefined)."""
    if metric not in CKA:
        raise FmprobeError(f"cka_resamples takes {', '.join(CKA)}, not '{metric}'")
    if n_resamples < 1:
        raise FmprobeError(f"n_resamples must be >= 1, got {n_resamples}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 3:
        raise FmprobeError(f"need [N, D] arrays of the same N >= 3 samples, got {x.shape} and {y.shape}")
    kx, ky = _kernel(x, metric, conventions), _kernel(y, metric, conventions)

    def cka(idx: np.ndarray) -> float:
        k, lk = kx(idx), ky(idx)
        den = np.sqrt(np.sum(k * k) * np.sum(lk * lk))
        return float(np.sum(k * lk) / den) if den > 0 else float("nan")

    values = [cka(np.repeat(np.arange(len(x)), w.astype(np.int64)))
              for weights in resample_weights(len(x), n_resamples=n_resamples, seed=seed) for w in weights]
    return cka(np.arange(len(x))), np.asarray(values)


def metric_resamples(a: np.ndarray, b: np.ndarray, metric: str, *, n_resamples: int = 1000, seed: int = 0,
                     conventions: AlignmentConventions = DEFAULT) -> tuple[float, np.ndarray]:  # fmt: skip
    """``metric`` on all samples and on each bootstrap resample (see the module docstring for what a repeat does;
    NaN where a resample leaves it undefined)."""
    if metric not in BOOTSTRAPPABLE:
        raise FmprobeError(f"no bootstrap CI for '{metric}'; CIs exist for {', '.join(BOOTSTRAPPABLE)}")
    if metric in CKA:
        return cka_resamples(a, b, metric, n_resamples=n_resamples, seed=seed, conventions=conventions)
    if n_resamples < 1:
        raise FmprobeError(f"n_resamples must be >= 1, got {n_resamples}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    point = METRICS[metric](x, y, conventions, seed)
    if metric == "linear_r2":
        truth, predicted = linear_map_predictions(x, y, seed=seed, test_size=conventions.r2_test_fraction)

        def stat(idx: np.ndarray) -> float:
            if np.all(np.ptp(truth[idx], axis=0) == 0):
                return float("nan")
            return float(r2_score(truth[idx], predicted[idx], multioutput="variance_weighted"))

        n = len(truth)
    elif metric == "rsa":
        da, db = _rdm(x, conventions.rsa_dissimilarity, "A"), _rdm(y, conventions.rsa_dissimilarity, "B")
        correlation = spearmanr if conventions.rsa_rank_correlation == "spearman" else kendalltau

        def stat(idx: np.ndarray) -> float:
            i, j = np.triu_indices(len(idx), k=1)
            distinct = idx[i] != idx[j]  # two copies of one sample: no information, left out
            ua, ub = da[idx[i[distinct]], idx[j[distinct]]], db[idx[i[distinct]], idx[j[distinct]]]
            if ua.size < 3 or np.ptp(ua) == 0 or np.ptp(ub) == 0:
                return float("nan")
            return float(correlation(ua, ub).statistic)

        n = len(x)
    else:
        _check_k(conventions.knn_k, len(x))
        na = _neighbour_distances(x, conventions.knn_metric, "A")
        nb = _neighbour_distances(y, conventions.knn_metric, "B")
        k = conventions.knn_k

        def stat(idx: np.ndarray) -> float:
            gallery, counts = np.unique(idx, return_counts=True)  # each drawn sample once, with its draws
            if len(gallery) <= k:
                return float("nan")
            sa, sb = na[np.ix_(gallery, gallery)], nb[np.ix_(gallery, gallery)]
            near_a = np.argpartition(sa, k - 1, axis=1)[:, :k]
            if metric == "knn_recall":
                hits = (near_a == np.argmin(sb, axis=1)[:, None]).any(axis=1).astype(np.float64)
            else:
                near_b = np.argpartition(sb, k - 1, axis=1)[:, :k]
                hits = np.array([len(np.intersect1d(p, q)) / k for p, q in zip(near_a, near_b)])
            return float(np.average(hits, weights=counts))

        n = len(x)
    values = [stat(np.repeat(np.arange(n), w.astype(np.int64)))
              for weights in resample_weights(n, n_resamples=n_resamples, seed=seed) for w in weights]
    return float(point), np.asarray(values)


def alignment_interval(
    a: np.ndarray, b: np.ndarray, metric: str = "linear_cka", *, n_resamples: int = 1000, ci: float = 0.95,
    seed: int = 0, conventions: AlignmentConventions = DEFAULT,
) -> list[float]:
    """``[lo, hi]``: the bootstrap CI of ``metric`` (one of ``BOOTSTRAPPABLE``), bias-corrected percentile except
    for linear R^2 (see the module docstring), at the quantile levels of every fmprobe CI
    (``evaluate.bootstrap.interval_levels``, over the units resampled)."""
    if not 0 < ci < 1:
        raise FmprobeError(f"ci must be in (0, 1), got {ci}")
    point, values = metric_resamples(a, b, metric, n_resamples=n_resamples, seed=seed, conventions=conventions)
    valid = values[np.isfinite(values)]
    if valid.size == 0 or not np.isfinite(point):
        return [float("nan"), float("nan")]
    bias = 0.0 if metric in UNCORRECTED else float(valid.mean()) - point
    # R^2 resamples the held-out rows (train_test_split's ceil of the fraction), the others every sample
    units = math.ceil(conventions.r2_test_fraction * len(a)) if metric == "linear_r2" else len(a)
    return [float(v) - bias for v in np.quantile(valid, interval_levels(ci, units))]
