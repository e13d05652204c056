"""The choices behind each alignment number, in one place: what `fmprobe align` used, written next to its values.

Two people who both report "RBF CKA 0.61" may have used different bandwidths; "mutual kNN 0.4" means little
without k. :class:`AlignmentConventions` holds every such choice with fmprobe's default, the metric functions
in :mod:`fmprobe.diagnostics.alignment` take their defaults from it, the CLI exposes each as an option, and
``alignment.json`` records the values used (``record()``) with a sentence each saying what they mean.

Kept free of numerical imports so the CLI can show the defaults in ``--help`` without loading numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from fmprobe.errors import ConfigError

Neighbourhood = Literal["cosine", "euclidean"]
RbfMedian = Literal["distinct-pairs", "full-matrix"]
RsaDissimilarity = Literal["correlation", "euclidean"]
RankCorrelation = Literal["spearman", "kendall"]


@dataclass(frozen=True)
class AlignmentConventions:
    """Every convention an alignment metric depends on (field -> the CLI option ``--field-name``)."""

    knn_k: int = 10
    """Neighbours per sample for ``mutual_knn`` and ``knn_recall`` (recall@k)."""
    knn_metric: Neighbourhood = "cosine"
    """How neighbours are found: cosine similarity (Huh et al. 2024) or Euclidean distance."""
    rbf_sigma_factor: float = 1.0
    """RBF bandwidth sigma as this fraction of the median distance (``rbf_cka``, ``debiased_rbf_cka``)."""
    rbf_median: RbfMedian = "distinct-pairs"
    """Which median: of the Euclidean distances between distinct samples (i < j; Gretton et al.'s median
    heuristic), or ``full-matrix``: the square root of the median squared distance over the whole N x N matrix,
    zero diagonal included (Kornblith et al.'s reference code; a slightly smaller sigma)."""
    rsa_dissimilarity: RsaDissimilarity = "correlation"
    """RSA's dissimilarity between two samples: 1 - Pearson r of their feature vectors, or Euclidean distance."""
    rsa_rank_correlation: RankCorrelation = "spearman"
    """How RSA compares the two dissimilarity matrices' upper triangles: Spearman's rho or Kendall's tau-b."""
    r2_test_fraction: float = 0.2
    """Share of the samples ``linear_r2`` holds out to score its ridge map A -> B."""

    def __post_init__(self) -> None:
        if isinstance(self.knn_k, bool) or not isinstance(self.knn_k, int) or self.knn_k < 1:
            raise ConfigError(f"knn_k (--knn-k) must be a whole number >= 1; got {self.knn_k!r}")
        if not self.rbf_sigma_factor > 0:
            raise ConfigError(f"rbf_sigma_factor (--rbf-sigma-factor) must be > 0; got {self.rbf_sigma_factor!r}")
        if not 0 < self.r2_test_fraction < 1:
            raise ConfigError(f"r2_test_fraction (--r2-test-fraction) must be in (0, 1); got {self.r2_test_fraction!r}")
        for name, kind in (("knn_metric", Neighbourhood), ("rbf_median", RbfMedian),
                           ("rsa_dissimilarity", RsaDissimilarity), ("rsa_rank_correlation", RankCorrelation)):
            if getattr(self, name) not in get_args(kind):
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be one of {', '.join(get_args(kind))}; "
                                  f"got {getattr(self, name)!r}")

    def explained(self) -> dict[str, str]:
        """One plain sentence per group of metrics, saying what these values mean."""
        neighbours = "cosine similarity" if self.knn_metric == "cosine" else "Euclidean distance"
        median = ("the median Euclidean distance between distinct samples (pairs i < j)"
                  if self.rbf_median == "distinct-pairs" else
                  "the square root of the median squared Euclidean distance over the full N x N matrix, zero "
                  "diagonal included (as in Kornblith et al.'s code)")
        dissimilarity = ("1 - Pearson correlation between two samples' feature vectors"
                         if self.rsa_dissimilarity == "correlation" else "Euclidean distance between two samples")
        rank = "Spearman's rho" if self.rsa_rank_correlation == "spearman" else "Kendall's tau-b"
        return {
            "mutual_knn, knn_recall": f"the k = {self.knn_k} nearest other samples by {neighbours}",
            "rbf_cka, debiased_rbf_cka": f"RBF kernel exp(-d^2 / (2 sigma^2)), each representation its own sigma = "
                                         f"{self.rbf_sigma_factor:g} x {median}",
            "rsa": f"dissimilarity = {dissimilarity}; the two dissimilarity matrices (upper triangles) compared by "
                   f"{rank}",
            "linear_r2": f"ridge map A -> B fitted on {1 - self.r2_test_fraction:.0%} of the samples, R^2 on the "
                         f"other {self.r2_test_fraction:.0%} (split drawn with `seed`)",
        }

    def record(self) -> dict[str, Any]:
        """The values and their meaning, as written to alignment.json."""
        return {**asdict(self), "explained": self.explained()}


DEFAULT = AlignmentConventions()
