"""Representation alignment: do two models (or two layers) arrange the same samples alike?

Every metric takes ``a`` ``[N, Da]`` and ``b`` ``[N, Db]`` whose rows are the same N samples in the same
order, and returns one float. Each is written from its published formula (cited in its docstring) and costs
at most O(N^2 D) time and O(N^2) memory, so N of a few thousand runs in seconds. The choices a metric depends
on (k, bandwidth, dissimilarity, ...) default to :data:`~fmprobe.diagnostics.alignment_conventions.DEFAULT`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.stats import kendalltau, spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fmprobe.diagnostics.alignment_conventions import (
    DEFAULT,
    AlignmentConventions,
    Neighbourhood,
    RankCorrelation,
    RbfMedian,
    RsaDissimilarity,
)
from fmprobe.errors import FmprobeError

Kernel = Literal["linear", "rbf"]

RIDGE_ALPHAS = np.logspace(-3, 5, 9)  # one per decade, searched by RidgeCV (efficient leave-one-out) on the train part


# ---------------------------------------------------------------------------------------------- input


def load_representation(path: str | PathLike[str]) -> np.ndarray:
    """Read a ``.npy`` representation as float64 ``[N, D]``.

    ``[N, T, D]`` (tokens or frames per sample) is averaged over T, with a warning saying so, because every
    metric here compares one vector per sample. Any other shape is refused.
    """
    p = Path(path)
    if p.suffix != ".npy":
        raise FmprobeError(f"representation file '{p}' must be a .npy array of shape [N, D] or [N, T, D]")
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise FmprobeError(f"could not read representation file '{p}': {e}") from e
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise FmprobeError(f"representation file '{p}' holds dtype {arr.dtype}; expected numbers")
    if arr.ndim == 3:
        warnings.warn(
            f"'{p}' has shape {arr.shape} = [N, T, D]: averaging over T={arr.shape[1]} (tokens/frames) to get "
            f"[N, D] = {(arr.shape[0], arr.shape[2])}. Save [N, D] yourself to use another pooling.",
            stacklevel=2,
        )
        arr = arr.mean(axis=1, dtype=np.float64)
    if arr.ndim != 2:
        raise FmprobeError(
            f"representation file '{p}' has shape {arr.shape}; expected [N, D] or [N, T, D] (averaged over T)"
        )
    return arr.astype(np.float64, copy=False)


def _pair(a: np.ndarray, b: np.ndarray, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Refuse pairs that are not one finite row per shared sample."""
    out = []
    for name, x in (("A", a), ("B", b)):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise FmprobeError(f"representation {name} has shape {x.shape}; expected [N, D] (one row per sample)")
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if bad.size:
            raise FmprobeError(f"representation {name} has NaN/inf in row(s) {bad[:10].tolist()}")
        out.append(x)
    if out[0].shape[0] != out[1].shape[0]:
        raise FmprobeError(
            f"A has {out[0].shape[0]} rows and B has {out[1].shape[0]}: rows must be the same samples in the same order"
        )
    if out[0].shape[0] < min_n:
        raise FmprobeError(f"this metric needs at least {min_n} samples; got N={out[0].shape[0]}")
    return out[0], out[1]


def _upper(m: np.ndarray) -> np.ndarray:
    """Entries above the diagonal (each unordered pair once)."""
    return m[np.triu(np.ones(m.shape, dtype=bool), k=1)]


def _sq_distances(x: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances, exact zeros on the diagonal."""
    sq = np.einsum("ij,ij->i", x, x)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d, 0.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def _center_gram(k: np.ndarray) -> np.ndarray:
    """H K H with H = I - 11^T/n, from row/column means (O(n^2), no n x n matmul)."""
    return k - k.mean(axis=0, keepdims=True) - k.mean(axis=1, keepdims=True) + k.mean()


def _gram(x: np.ndarray, kernel: Kernel, sigma_factor: float, median: RbfMedian, name: str) -> np.ndarray:
    if kernel == "linear":
        xc = x - x.mean(axis=0)
        return xc @ xc.T
    if kernel == "rbf":
        return _rbf_gram(x, sigma_factor, median, name)
    raise FmprobeError(f"unknown kernel '{kernel}'; use 'linear' or 'rbf'")


def rbf_sigma(d2: np.ndarray, sigma_factor: float, median: RbfMedian) -> float:
    """The RBF bandwidth from squared distances ``d2`` [n, n]: sigma = sigma_factor * the median distance.

    ``median='distinct-pairs'``: the median Euclidean distance over pairs i < j, the usual median heuristic
    (Gretton et al. 2005). ``'full-matrix'``: sqrt of the median squared distance over the full n x n matrix,
    zero diagonal included, as in Kornblith et al.'s reference code (a slightly smaller sigma).
    """
    if median == "distinct-pairs":
        return sigma_factor * float(np.median(np.sqrt(_upper(d2))))
    if median == "full-matrix":
        return sigma_factor * float(np.sqrt(np.median(d2)))
    raise FmprobeError(f"unknown RBF median '{median}'; use 'distinct-pairs' or 'full-matrix'")


def _rbf_gram(x: np.ndarray, sigma_factor: float, median: RbfMedian, name: str) -> np.ndarray:
    """exp(-||xi - xj||^2 / (2 sigma^2)) with sigma from :func:`rbf_sigma`."""
    if not sigma_factor > 0:
        raise FmprobeError(f"sigma_factor must be > 0; got {sigma_factor}")
    d2 = _sq_distances(x)
    sigma = rbf_sigma(d2, sigma_factor, median)
    if sigma == 0.0:
        raise FmprobeError(
            f"representation {name}: the median pairwise distance is 0 (most rows identical); RBF bandwidth undefined"
        )
    return np.exp(-d2 / (2.0 * sigma**2))


def _ratio(hxy: float, hxx: float, hyy: float) -> float:
    if hxx <= 0 or hyy <= 0:
        raise FmprobeError(
            "a representation has no variance across samples (or too few samples for the unbiased estimator); "
            "CKA is undefined"
        )
    return float(hxy / np.sqrt(hxx * hyy))


# ---------------------------------------------------------------------------------------------- CKA


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited").

    With column-centred X, Y: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). Computed in feature space or, when
    the feature dimensions exceed N, through the identical Gram form tr(Kc Lc) with Kc = Xc Xc^T.
    """
    x, y = _pair(a, b, min_n=2)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    if dx * dx + dy * dy + dx * dy <= n * (dx + dy):
        return _ratio(
            float(np.sum((y.T @ x) ** 2)), float(np.linalg.norm(x.T @ x)) ** 2, float(np.linalg.norm(y.T @ y)) ** 2
        )
    kx, ky = x @ x.T, y @ y.T
    return _ratio(float(np.sum(kx * ky)), float(np.sum(kx * kx)), float(np.sum(ky * ky)))


def rbf_cka(a: np.ndarray, b: np.ndarray, sigma_factor: float = DEFAULT.rbf_sigma_factor,
            median: RbfMedian = DEFAULT.rbf_median) -> float:  # fmt: skip
    """RBF-kernel CKA (Kornblith et al. 2019) with the biased HSIC estimator (Gretton et al. 2005).

    HSIC_b(K, L) = tr(K H L H) / (n-1)^2, CKA = HSIC_b(K, L) / sqrt(HSIC_b(K, K) HSIC_b(L, L)); the (n-1)^2
    cancels. Bandwidth per representation: sigma = sigma_factor * its median distance (:func:`rbf_sigma` says
    which median; ``median='full-matrix'`` with sigma_factor = threshold reproduces Kornblith's code).
    """
    x, y = _pair(a, b, min_n=3)
    kc = _center_gram(_rbf_gram(x, sigma_factor, median, "A"))
    lc = _center_gram(_rbf_gram(y, sigma_factor, median, "B"))
    return _ratio(float(np.sum(kc * lc)), float(np.sum(kc * kc)), float(np.sum(lc * lc)))


def hsic_unbiased(kx: np.ndarray, ky: np.ndarray) -> float:
    """Unbiased HSIC, HSIC_1 of Song et al. 2012 ("Feature Selection via Dependence Maximization", JMLR).

    K = ``kx`` and L = ``ky`` are n x n Gram matrices of the same samples. With their diagonals set to zero
    (K~, L~):
    HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)).
    Needs n >= 4. O(n^2): 1^T K~ L~ 1 is (column sums of K~) . (row sums of L~).
    """
    n = kx.shape[0]
    if n < 4:
        raise FmprobeError(f"the unbiased HSIC estimator needs at least 4 samples; got N={n}")
    kt, lt = kx.copy(), ky.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    trace = np.sum(kt * lt.T)
    both_sums = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * float(kt.sum(axis=0) @ lt.sum(axis=1))
    return float((trace + both_sums - cross) / (n * (n - 3)))


def debiased_cka(
    a: np.ndarray, b: np.ndarray, kernel: Kernel = "linear", sigma_factor: float = DEFAULT.rbf_sigma_factor,
    median: RbfMedian = DEFAULT.rbf_median,
) -> float:
    """Debiased CKA (Kornblith et al. 2019 appendix; Nguyen et al. 2021): CKA with HSIC_1 of Song et al. 2012.

    CKA_u = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)). Unlike the biased estimator it does not drift
    towards 1 when D is large relative to N. ``kernel='rbf'`` uses the same bandwidth rule as :func:`rbf_cka`.
    """
    x, y = _pair(a, b, min_n=4)
    kx, ky = _gram(x, kernel, sigma_factor, median, "A"), _gram(y, kernel, sigma_factor, median, "B")
    return _ratio(hsic_unbiased(kx, ky), hsic_unbiased(kx, kx), hsic_unbiased(ky, ky))


# ---------------------------------------------------------------------------------------------- neighbours


def _neighbour_distances(x: np.ndarray, metric: Neighbourhood, name: str) -> np.ndarray:
    """n x n dissimilarities with +inf on the diagonal, so a sample is never its own neighbour."""
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1)
        zero = np.flatnonzero(norms == 0)
        if zero.size:
            raise FmprobeError(f"representation {name}: row(s) {zero[:10].tolist()} are all zeros; cosine undefined")
        xn = x / norms[:, None]
        d = -(xn @ xn.T)
    elif metric == "euclidean":
        d = _sq_distances(x)
    else:
        raise FmprobeError(f"unknown neighbour metric '{metric}'; use 'cosine' or 'euclidean'")
    np.fill_diagonal(d, np.inf)
    return d


def _knn(x: np.ndarray, k: int, metric: Neighbourhood, name: str) -> np.ndarray:
    """Indices [n, k] of each sample's k nearest other samples (unordered)."""
    d = _neighbour_distances(x, metric, name)
    return np.argpartition(d, k - 1, axis=1)[:, :k]


def _check_k(k: int, n: int) -> None:
    if not 1 <= k < n:
        raise FmprobeError(f"k must be between 1 and N-1 = {n - 1}; got k={k}")


def mutual_knn(a: np.ndarray, b: np.ndarray, k: int = DEFAULT.knn_k,
               metric: Neighbourhood = DEFAULT.knn_metric) -> float:  # fmt: skip
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation Hypothesis").

    mean_i |kNN_A(i) ∩ kNN_B(i)| / k, neighbours excluding i itself. Default cosine similarity, as in the
    paper's code (inner products of L2-normalised features); ``metric='euclidean'`` uses Euclidean distance.
    Symmetric in A and B. Ties between equidistant neighbours are broken arbitrarily.
    """
    x, y = _pair(a, b, min_n=2)
    n = x.shape[0]
    _check_k(k, n)
    na, nb = _knn(x, k, metric, "A"), _knn(y, k, metric, "B")
    in_a = np.zeros((n, n), dtype=bool)
    rows = np.arange(n)[:, None]
    in_a[rows, na] = True
    return float(in_a[rows, nb].sum() / (n * k))


def knn_recall(a: np.ndarray, b: np.ndarray, k: int = DEFAULT.knn_k,
               metric: Neighbourhood = DEFAULT.knn_metric) -> float:  # fmt: skip
    """Recall@k of B's nearest neighbour among A's k nearest neighbours (B is the reference space).

    For each sample i, the relevant item is i's single nearest other sample in B; it counts as retrieved when
    it is among i's k nearest other samples in A. Returns the fraction of samples retrieved. Unlike
    :func:`mutual_knn` (k-set overlap, symmetric) this asks whether A keeps B's closest pairs close, so
    ``knn_recall(a, b) != knn_recall(b, a)`` in general.
    """
    x, y = _pair(a, b, min_n=2)
    _check_k(k, x.shape[0])
    truth = np.argmin(_neighbour_distances(y, metric, "B"), axis=1)
    retrieved = _knn(x, k, metric, "A")
    return float(np.mean((retrieved == truth[:, None]).any(axis=1)))


# ---------------------------------------------------------------------------------------------- RSA


def _rdm(x: np.ndarray, distance: RsaDissimilarity, name: str) -> np.ndarray:
    if distance == "euclidean":
        return np.sqrt(_sq_distances(x))
    if distance == "correlation":
        flat = np.flatnonzero(np.ptp(x, axis=1) == 0)
        if flat.size:
            raise FmprobeError(
                f"representation {name}: row(s) {flat[:10].tolist()} are constant; correlation distance undefined "
                "(use distance='euclidean')"
            )
        return 1.0 - np.corrcoef(x)
    raise FmprobeError(f"unknown RSA distance '{distance}'; use 'correlation' or 'euclidean'")


def rsa(a: np.ndarray, b: np.ndarray, distance: RsaDissimilarity = DEFAULT.rsa_dissimilarity,
        rank: RankCorrelation = DEFAULT.rsa_rank_correlation) -> float:  # fmt: skip
    """Representational similarity analysis (Kriegeskorte et al. 2008).

    Rank correlation between the upper triangles of the two representational dissimilarity matrices: Spearman's
    rho by default, or Kendall's tau-b (``rank='kendall'``, scipy's ``kendalltau``). Default dissimilarity:
    1 - Pearson correlation between samples' feature vectors, as in the paper; ``distance='euclidean'`` uses
    Euclidean distance.
    """
    if rank not in ("spearman", "kendall"):
        raise FmprobeError(f"unknown rank correlation '{rank}'; use 'spearman' or 'kendall'")
    x, y = _pair(a, b, min_n=3)
    ua, ub = _upper(_rdm(x, distance, "A")), _upper(_rdm(y, distance, "B"))
    for name, u in (("A", ua), ("B", ub)):
        if np.ptp(u) == 0:
            raise FmprobeError(f"representation {name}: all pairwise dissimilarities are equal; RSA undefined")
    correlation = spearmanr if rank == "spearman" else kendalltau
    return float(correlation(ua, ub).statistic)


# ---------------------------------------------------------------------------------------------- linear map


def linear_r2(a: np.ndarray, b: np.ndarray, seed: int = 0, test_size: float = DEFAULT.r2_test_fraction) -> float:
    """Held-out R^2 of a ridge map A -> B: how much of B is linearly readable from A.

    Split the samples (seeded, ``test_size`` held out), standardise A and fit ``RidgeCV`` on the training part
    (alpha from ``RIDGE_ALPHAS`` by efficient leave-one-out), then report sklearn ``r2_score`` on the held-out
    part with ``multioutput='variance_weighted'`` (B's dimensions weighted by their variance). Asymmetric.
    """
    y_te, predicted = linear_map_predictions(a, b, seed=seed, test_size=test_size)
    return float(r2_score(y_te, predicted, multioutput="variance_weighted"))


def linear_map_predictions(a: np.ndarray, b: np.ndarray, *, seed: int = 0, test_size: float = DEFAULT.r2_test_fraction
                           ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The held-out rows of B and the ridge map's predictions of them (see :func:`linear_r2`)."""
    x, y = _pair(a, b, min_n=10)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed)
    if np.all(np.ptp(y_te, axis=0) == 0):
        raise FmprobeError("representation B is constant on the held-out samples; R^2 undefined")
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(x_tr, y_tr)
    return y_te, model.predict(x_te)


# ---------------------------------------------------------------------------------------------- entry points

Metric = Callable[[np.ndarray, np.ndarray, AlignmentConventions, int], float]

METRICS: dict[str, Metric] = {
    "linear_cka": lambda a, b, c, seed: linear_cka(a, b),
    "rbf_cka": lambda a, b, c, seed: rbf_cka(a, b, c.rbf_sigma_factor, c.rbf_median),
    "debiased_cka": lambda a, b, c, seed: debiased_cka(a, b, kernel="linear"),
    "debiased_rbf_cka": lambda a, b, c, seed: debiased_cka(a, b, "rbf", c.rbf_sigma_factor, c.rbf_median),
    "mutual_knn": lambda a, b, c, seed: mutual_knn(a, b, c.knn_k, c.knn_metric),
    "rsa": lambda a, b, c, seed: rsa(a, b, c.rsa_dissimilarity, c.rsa_rank_correlation),
    "knn_recall": lambda a, b, c, seed: knn_recall(a, b, c.knn_k, c.knn_metric),
    "linear_r2": lambda a, b, c, seed: linear_r2(a, b, seed=seed, test_size=c.r2_test_fraction),
}
"""Metric name -> function(a, b, conventions, seed): each metric with the conventions it depends on."""


def _metric(name: str) -> Metric:
    if name not in METRICS:
        raise FmprobeError(f"unknown alignment metric '{name}'; choose from {sorted(METRICS)}")
    return METRICS[name]


def align(a: np.ndarray, b: np.ndarray, metrics: list[str] | None = None, *, seed: int = 0,
          conventions: AlignmentConventions = DEFAULT) -> dict[str, float]:  # fmt: skip
    """Every requested metric (default: all of ``METRICS``) between A and B, by name."""
    fns = {name: _metric(name) for name in (metrics if metrics is not None else list(METRICS))}
    x, y = _pair(a, b, min_n=2)
    return {name: fn(x, y, conventions, seed) for name, fn in fns.items()}


def layer_alignment_matrix(
    layers_a: Mapping[str, np.ndarray], layers_b: Mapping[str, np.ndarray], metric: str, *, seed: int = 0,
    conventions: AlignmentConventions = DEFAULT,
) -> tuple[np.ndarray, list[str], list[str]]:
    """``metric`` for every (layer of A, layer of B) pair: the matrix behind a CKA heatmap.

    Returns ``(matrix [len(layers_a), len(layers_b)], row_names, col_names)`` in the mappings' order.
    """
    fn = _metric(metric)
    for side, layers in (("A", layers_a), ("B", layers_b)):
        if not layers:
            raise FmprobeError(f"no layers given for {side}")
    rows, cols = list(layers_a), list(layers_b)
    matrix = np.empty((len(rows), len(cols)))
    for i, ra in enumerate(rows):
        for j, cb in enumerate(cols):
            try:
                matrix[i, j] = fn(layers_a[ra], layers_b[cb], conventions, seed)
            except FmprobeError as e:
                raise FmprobeError(f"layer '{ra}' of A vs layer '{cb}' of B: {e}") from e
    return matrix, rows, cols
