"""Bootstrap CIs of CKA, resampling samples: is "CKA 0.43" confidently above a 0.40 gate?

Only the CKA metrics whose value on a resample with repeated rows is well defined get an interval: linear
and RBF CKA treat a repeated sample as a weight. The debiased estimators, the neighbour metrics (a repeat is
its own nearest neighbour) and RSA (zero distances between repeats) would be biased by the repeats, so they
get none. Each resample gives exactly what :func:`~fmprobe.diagnostics.alignment.linear_cka` /
:func:`~fmprobe.diagnostics.alignment.rbf_cka` return on the repeated rows, computed from the full-sample
Gram or distance matrix indexed by the resample (O(N^2) per resample instead of O(N^2 D)).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fmprobe.diagnostics.alignment import _center_gram, _sq_distances, rbf_sigma
from fmprobe.diagnostics.alignment_conventions import DEFAULT, AlignmentConventions
from fmprobe.errors import FmprobeError
from fmprobe.evaluate.bootstrap import interval_levels, resample_weights

BOOTSTRAPPABLE = ("linear_cka", "rbf_cka")


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
    if metric not in BOOTSTRAPPABLE:
        raise FmprobeError(f"no bootstrap CI for '{metric}' (repeated samples bias it); CIs exist for "
                           f"{', '.join(BOOTSTRAPPABLE)}")  # fmt: skip
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


def cka_interval(
    a: np.ndarray, b: np.ndarray, metric: str = "linear_cka", *, n_resamples: int = 1000, ci: float = 0.95,
    seed: int = 0, conventions: AlignmentConventions = DEFAULT,
) -> list[float]:
    """``[lo, hi]``: bias-corrected percentile bootstrap CI of ``metric`` (one of ``BOOTSTRAPPABLE``).

    A resample holds only ~63 % distinct samples, and CKA's small-sample upward bias grows as samples get
    fewer, so the resamples sit above the estimate. The percentile interval is therefore shifted down by the
    bootstrap estimate of the bias, mean(resamples) - estimate (Efron & Tibshirani 1993, ch. 10); without it
    the pessimistic end a gate reads would be optimistic. The quantile levels are those of every fmprobe CI
    (``evaluate.bootstrap.interval_levels``, over the samples drawn).
    """
    if not 0 < ci < 1:
        raise FmprobeError(f"ci must be in (0, 1), got {ci}")
    point, values = cka_resamples(a, b, metric, n_resamples=n_resamples, seed=seed, conventions=conventions)
    valid = values[np.isfinite(values)]
    if valid.size == 0 or not np.isfinite(point):
        return [float("nan"), float("nan")]
    bias = float(valid.mean()) - point
    return [float(v) - bias for v in np.quantile(valid, interval_levels(ci, len(a)))]
