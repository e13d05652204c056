"""Alignment metrics against hand-written references from the published formulas (explicit loops, tiny N)."""

from itertools import permutations

import numpy as np
import pytest
from scipy.spatial.distance import correlation as correlation_distance
from scipy.spatial.distance import pdist
from scipy.stats import kendalltau, spearmanr

from fmprobe.diagnostics.alignment import (
    METRICS,
    align,
    debiased_cka,
    hsic_unbiased,
    knn_recall,
    layer_alignment_matrix,
    linear_cka,
    linear_r2,
    load_representation,
    mutual_knn,
    rbf_cka,
    rsa,
)
from fmprobe.diagnostics.alignment_conventions import DEFAULT, AlignmentConventions
from fmprobe.errors import ConfigError, FmprobeError


def _rng(seed=0):
    return np.random.default_rng(seed)


def _rotation(d, seed=1):
    q, _ = np.linalg.qr(_rng(seed).normal(size=(d, d)))
    return q


# ------------------------------------------------------------------------------------ loop references


def _centre_loops(x):
    n, d = x.shape
    out = np.zeros_like(x)
    for j in range(d):
        m = sum(x[i, j] for i in range(n)) / n
        for i in range(n):
            out[i, j] = x[i, j] - m
    return out


def _frob2_cross_loops(x, y):
    """||Y^T X||_F^2 = sum_{p,q} (sum_i y_ip x_iq)^2."""
    total = 0.0
    for p in range(y.shape[1]):
        for q in range(x.shape[1]):
            s = sum(y[i, p] * x[i, q] for i in range(x.shape[0]))
            total += s * s
    return total


def _linear_cka_loops(x, y):
    xc, yc = _centre_loops(x), _centre_loops(y)
    return _frob2_cross_loops(xc, yc) / np.sqrt(_frob2_cross_loops(xc, xc) * _frob2_cross_loops(yc, yc))


def _rbf_gram_loops(x, factor):
    n = x.shape[0]
    d = [[float(np.sqrt(sum((x[i, k] - x[j, k]) ** 2 for k in range(x.shape[1])))) for j in range(n)] for i in range(n)]
    sigma = factor * float(np.median([d[i][j] for i in range(n) for j in range(i + 1, n)]))
    return np.array([[np.exp(-d[i][j] ** 2 / (2 * sigma**2)) for j in range(n)] for i in range(n)])


def _hsic_biased_loops(k, l):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _hsic_u_statistic(k, l):
    """Song et al. 2012, Theorem 2: HSIC_1 = (n-4)!/n! * sum over distinct (i, j, q, r) of
    k_ij l_ij + k_ij l_qr - 2 k_ij l_iq   (summing over all distinct ordered tuples symmetrises h)."""
    n = k.shape[0]
    total = 0.0
    for i, j, q, r in permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def _knn_sets_loops(x, k, metric):
    n = x.shape[0]
    sets = []
    for i in range(n):
        if metric == "cosine":
            dist = [-(x[i] @ x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])) for j in range(n)]
        else:
            dist = [np.linalg.norm(x[i] - x[j]) for j in range(n)]
        order = sorted((j for j in range(n) if j != i), key=lambda j: dist[j])
        sets.append(order)
    return [set(o[:k]) for o in sets], [o[0] for o in sets]


# ------------------------------------------------------------------------------------ CKA


def test_linear_cka_invariances_give_one():
    x = _rng().normal(size=(40, 6))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ _rotation(6)) == pytest.approx(1.0)
    assert linear_cka(x, 3.7 * x + 5.0) == pytest.approx(1.0)
    assert linear_cka(x, _rng(9).normal(size=(40, 6))) < 0.6


@pytest.mark.parametrize("dx,dy", [(3, 2), (9, 8)])  # feature-space path and Gram path (D > N)
def test_linear_cka_matches_loop_formula(dx, dy):
    x, y = _rng(2).normal(size=(6, dx)), _rng(3).normal(size=(6, dy))
    y[:, 0] += x[:, 0]
    assert linear_cka(x, y) == pytest.approx(_linear_cka_loops(x, y), rel=1e-10)


def test_rbf_cka_matches_loop_formula_and_depends_on_bandwidth():
    x, y = _rng(4).normal(size=(7, 3)), _rng(5).normal(size=(7, 2))
    y[:, 0] += np.sin(x[:, 0])
    for factor in (0.5, 1.0, 2.0):
        k, l = _rbf_gram_loops(x, factor), _rbf_gram_loops(y, factor)
        ref = _hsic_biased_loops(k, l) / np.sqrt(_hsic_biased_loops(k, k) * _hsic_biased_loops(l, l))
        assert rbf_cka(x, y, sigma_factor=factor) == pytest.approx(ref, rel=1e-10)
    assert rbf_cka(x, y, 0.5) != pytest.approx(rbf_cka(x, y, 2.0))
    assert rbf_cka(x, x @ _rotation(3)) == pytest.approx(1.0)


def _kornblith_gram_rbf(x, threshold):
    """``gram_rbf`` of Kornblith et al.'s reference code (CKA demo notebook): the median of the squared distances
    over the full n x n matrix, zero diagonal included."""
    dot = x @ x.T
    sq_norms = np.diag(dot)
    sq_distances = -2 * dot + sq_norms[:, None] + sq_norms[None, :]
    return np.exp(-sq_distances / (2 * threshold**2 * np.median(sq_distances)))


@pytest.mark.parametrize("n", [7, 8])  # odd and even number of entries in the full matrix's median
def test_rbf_full_matrix_median_reproduces_kornblith_reference_code(n):
    x, y = _rng(40).normal(size=(n, 3)), _rng(41).normal(size=(n, 4))
    y[:, 0] += np.cos(x[:, 1])
    for threshold in (0.2, 0.4, 0.8):  # the fractions of the median distance Kornblith et al. compare
        k, l = _kornblith_gram_rbf(x, threshold), _kornblith_gram_rbf(y, threshold)
        ref = _hsic_biased_loops(k, l) / np.sqrt(_hsic_biased_loops(k, k) * _hsic_biased_loops(l, l))
        assert rbf_cka(x, y, sigma_factor=threshold, median="full-matrix") == pytest.approx(ref, rel=1e-10)
    # the two medians differ (the zero diagonal pulls the full matrix's median down), so the choice is recorded
    assert rbf_cka(x, y, 0.4, "full-matrix") != pytest.approx(rbf_cka(x, y, 0.4, "distinct-pairs"))
    assert debiased_cka(x, x, "rbf", 0.4, "full-matrix") == pytest.approx(1.0)


def test_hsic_unbiased_matches_u_statistic_brute_force():
    x, y = _rng(6).normal(size=(6, 3)), _rng(7).normal(size=(6, 4))
    y[:, :2] += x[:, :2]
    k, l = x @ x.T, np.exp(-((y[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    assert hsic_unbiased(k, l) == pytest.approx(_hsic_u_statistic(k, l), rel=1e-10)
    assert hsic_unbiased(k, k) == pytest.approx(_hsic_u_statistic(k, k), rel=1e-10)


def test_debiased_cka_is_one_for_same_geometry_and_near_zero_for_independent_wide_features():
    x = _rng(8).normal(size=(30, 5))
    assert debiased_cka(x, x @ _rotation(5) * 2.0) == pytest.approx(1.0)
    assert debiased_cka(x, x, kernel="rbf") == pytest.approx(1.0)
    # With D >> N the biased estimator drifts towards 1 for independent data; the unbiased one does not.
    a, b = _rng(10).normal(size=(40, 2000)), _rng(11).normal(size=(40, 2000))
    assert linear_cka(a, b) > 0.8
    assert abs(debiased_cka(a, b)) < 0.1


def test_cka_refuses_constant_representation():
    x = _rng().normal(size=(10, 3))
    with pytest.raises(FmprobeError, match="no variance"):
        linear_cka(x, np.ones((10, 2)))


# ------------------------------------------------------------------------------------ neighbours


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_mutual_knn_and_recall_match_loop_definitions(metric):
    x, y = _rng(12).normal(size=(25, 4)), _rng(13).normal(size=(25, 3))
    y[:, 0] += 2 * x[:, 0]
    k = 5
    sets_a, _ = _knn_sets_loops(x, k, metric)
    sets_b, nearest_b = _knn_sets_loops(y, k, metric)
    ref_mutual = np.mean([len(sa & sb) / k for sa, sb in zip(sets_a, sets_b, strict=True)])
    ref_recall = np.mean([nb in sa for nb, sa in zip(nearest_b, sets_a, strict=True)])
    assert mutual_knn(x, y, k=k, metric=metric) == pytest.approx(ref_mutual)
    assert knn_recall(x, y, k=k, metric=metric) == pytest.approx(ref_recall)


def test_neighbour_metrics_identical_is_one_and_cosine_ignores_row_scale():
    x = _rng(14).normal(size=(50, 8))
    assert mutual_knn(x, x) == 1.0
    assert knn_recall(x, x) == 1.0
    scaled = x * _rng(15).uniform(0.5, 3.0, size=(50, 1))
    assert mutual_knn(x, scaled, metric="cosine") == 1.0
    assert mutual_knn(x, x @ _rotation(8), metric="euclidean") == 1.0
    assert mutual_knn(x, _rng(16).normal(size=(50, 8))) < 0.5


def test_neighbour_metrics_refuse_bad_k_and_zero_rows():
    x = _rng().normal(size=(8, 3))
    with pytest.raises(FmprobeError, match="k must be"):
        mutual_knn(x, x, k=8)
    z = x.copy()
    z[3] = 0
    with pytest.raises(FmprobeError, match=r"row\(s\) \[3\]"):
        knn_recall(x, z, k=2)


# ------------------------------------------------------------------------------------ RSA


def test_rsa_matches_scipy_reference_and_identical_is_one():
    x, y = _rng(17).normal(size=(9, 5)), _rng(18).normal(size=(9, 4))
    y[:, 0] += x[:, 0]
    pairs = [(i, j) for i in range(9) for j in range(i + 1, 9)]
    ra = [correlation_distance(x[i], x[j]) for i, j in pairs]
    rb = [correlation_distance(y[i], y[j]) for i, j in pairs]
    assert rsa(x, y) == pytest.approx(spearmanr(ra, rb).statistic, rel=1e-10)
    ea = [np.linalg.norm(x[i] - x[j]) for i, j in pairs]
    eb = [np.linalg.norm(y[i] - y[j]) for i, j in pairs]
    assert rsa(x, y, distance="euclidean") == pytest.approx(spearmanr(ea, eb).statistic, rel=1e-10)
    assert rsa(x, x) == pytest.approx(1.0)
    assert rsa(x, 2 * x + 1) == pytest.approx(1.0)
    assert rsa(x, x @ _rotation(5), distance="euclidean") == pytest.approx(1.0)


def test_rsa_kendall_rank_correlation_matches_scipy_reference():
    x, y = _rng(42).normal(size=(12, 5)), _rng(43).normal(size=(12, 4))
    y[:, 0] += x[:, 0]
    for distance, scipy_name in (("correlation", "correlation"), ("euclidean", "euclidean")):
        ref = kendalltau(pdist(x, scipy_name), pdist(y, scipy_name)).statistic
        assert rsa(x, y, distance, rank="kendall") == pytest.approx(ref, rel=1e-10)
    assert rsa(x, y, rank="kendall") != pytest.approx(rsa(x, y, rank="spearman"))
    with pytest.raises(FmprobeError, match="unknown rank correlation 'pearson'"):
        rsa(x, y, rank="pearson")


def test_rsa_correlation_refuses_constant_rows():
    x = _rng().normal(size=(6, 3))
    x[4] = 2.0
    with pytest.raises(FmprobeError, match=r"row\(s\) \[4\]"):
        rsa(x, x)


# ------------------------------------------------------------------------------------ linear map


def test_linear_r2_exact_map_near_one_and_noise_not_above_zero():
    a = _rng(19).normal(size=(300, 10))
    b = a @ _rng(20).normal(size=(10, 4)) + 1.0
    assert linear_r2(a, b) > 0.99
    noise = _rng(21).normal(size=(300, 4))
    assert linear_r2(a, noise) <= 0.05


def test_linear_r2_is_seeded():
    a = _rng(22).normal(size=(100, 5))
    b = a[:, :2] + _rng(23).normal(size=(100, 2))
    assert linear_r2(a, b, seed=3) == linear_r2(a, b, seed=3)
    assert linear_r2(a, b, seed=3) != linear_r2(a, b, seed=4)


# ------------------------------------------------------------------------------------ entry points


def test_align_runs_every_metric_and_refuses_bad_input():
    a = _rng(24).normal(size=(60, 6))
    out = align(a, a @ _rotation(6))
    assert set(out) == set(METRICS)
    assert all(isinstance(v, float) for v in out.values())
    for name in ("linear_cka", "rbf_cka", "debiased_cka", "debiased_rbf_cka", "mutual_knn", "knn_recall"):
        assert out[name] == pytest.approx(1.0), name
    assert out["rsa"] < 0.99  # correlation distance is taken across feature dims, so rotations change it
    assert out["linear_r2"] > 0.99
    assert list(align(a, a, ["rsa"])) == ["rsa"]
    with pytest.raises(FmprobeError, match="unknown alignment metric 'cca'"):
        align(a, a, ["cca"])
    with pytest.raises(FmprobeError, match="A has 60 rows and B has 59"):
        align(a, a[:-1])
    bad = a.copy()
    bad[7, 2] = np.nan
    with pytest.raises(FmprobeError, match=r"B has NaN/inf in row\(s\) \[7\]"):
        align(a, bad)
    with pytest.raises(FmprobeError, match="expected \\[N, D\\]"):
        align(a[:, 0], a)


def test_layer_alignment_matrix_shape_names_and_errors():
    rng = _rng(25)
    layers = {"block0": rng.normal(size=(30, 4)), "block1": rng.normal(size=(30, 5)), "block2": rng.normal(size=(30, 3))}
    other = {"enc.a": layers["block1"] @ _rotation(5), "enc.b": rng.normal(size=(30, 2))}
    m, rows, cols = layer_alignment_matrix(layers, other, "linear_cka")
    assert m.shape == (3, 2) and rows == ["block0", "block1", "block2"] and cols == ["enc.a", "enc.b"]
    assert m[1, 0] == pytest.approx(1.0)
    assert m[1, 0] > m[0, 0] and m[1, 0] > m[2, 0]
    assert m[0, 1] == pytest.approx(linear_cka(layers["block0"], other["enc.b"]))
    with pytest.raises(FmprobeError, match="layer 'block0' of A vs layer 'short' of B"):
        layer_alignment_matrix(layers, {"short": rng.normal(size=(20, 2))}, "rsa")
    with pytest.raises(FmprobeError, match="no layers given for B"):
        layer_alignment_matrix(layers, {}, "rsa")


def test_load_representation(tmp_path):
    x = _rng(26).normal(size=(5, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    np.testing.assert_allclose(load_representation(tmp_path / "a.npy"), x)
    tokens = _rng(27).normal(size=(5, 4, 3))
    np.save(tmp_path / "t.npy", tokens)
    with pytest.warns(UserWarning, match="averaging over T=4"):
        np.testing.assert_allclose(load_representation(tmp_path / "t.npy"), tokens.mean(axis=1))
    np.save(tmp_path / "v.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(FmprobeError, match=r"v\.npy' has shape \(2, 3, 4, 5\)"):
        load_representation(tmp_path / "v.npy")
    np.savez(tmp_path / "z.npz", x=x)
    with pytest.raises(FmprobeError, match="must be a .npy"):
        load_representation(tmp_path / "z.npz")
    with pytest.raises(FmprobeError, match="could not read"):
        load_representation(tmp_path / "missing.npy")


# ------------------------------------------------------------------------------------ conventions


def test_conventions_drive_every_metric_that_depends_on_them():
    a = _rng(44).normal(size=(40, 6))
    b = np.tanh(a @ _rng(45).normal(size=(6, 5))) + 0.5 * _rng(46).normal(size=(40, 5))
    c = AlignmentConventions(knn_k=4, knn_metric="euclidean", rbf_sigma_factor=0.5, rbf_median="full-matrix",
                             rsa_dissimilarity="euclidean", rsa_rank_correlation="kendall", r2_test_fraction=0.3)
    got = align(a, b, seed=2, conventions=c)
    assert got == {
        "linear_cka": linear_cka(a, b),
        "rbf_cka": rbf_cka(a, b, 0.5, "full-matrix"),
        "debiased_cka": debiased_cka(a, b),
        "debiased_rbf_cka": debiased_cka(a, b, "rbf", 0.5, "full-matrix"),
        "mutual_knn": mutual_knn(a, b, k=4, metric="euclidean"),
        "rsa": rsa(a, b, "euclidean", "kendall"),
        "knn_recall": knn_recall(a, b, k=4, metric="euclidean"),
        "linear_r2": linear_r2(a, b, seed=2, test_size=0.3),
    }
    default = align(a, b, seed=2)
    changed = {m for m in got if got[m] != default[m]}
    assert changed == set(METRICS) - {"linear_cka", "debiased_cka"}  # the linear kernels have no convention
    m, _, _ = layer_alignment_matrix({"a": a}, {"b": b}, "mutual_knn", conventions=c)
    assert m[0, 0] == got["mutual_knn"]


def test_conventions_defaults_are_the_metric_functions_defaults_and_bad_values_are_refused():
    a = _rng(47).normal(size=(30, 4))
    b = a + _rng(48).normal(size=(30, 4))
    assert DEFAULT == AlignmentConventions()
    assert align(a, b) == align(a, b, conventions=AlignmentConventions(
        knn_k=10, knn_metric="cosine", rbf_sigma_factor=1.0, rbf_median="distinct-pairs",
        rsa_dissimilarity="correlation", rsa_rank_correlation="spearman", r2_test_fraction=0.2))
    record = DEFAULT.record()
    assert record["knn_k"] == 10 and record["rbf_median"] == "distinct-pairs"
    assert "k = 10 nearest other samples by cosine similarity" in record["explained"]["mutual_knn, knn_recall"]
    assert "sigma = 1 x the median Euclidean distance between distinct samples" in (
        record["explained"]["rbf_cka, debiased_rbf_cka"])
    assert "1 - Pearson correlation" in record["explained"]["rsa"] and "Spearman" in record["explained"]["rsa"]
    for bad, match in (({"knn_k": 0}, r"knn_k \(--knn-k\) must be a whole number >= 1"),
                       ({"rbf_sigma_factor": 0.0}, r"--rbf-sigma-factor\) must be > 0"),
                       ({"rbf_median": "mean"}, r"--rbf-median\) must be one of distinct-pairs, full-matrix"),
                       ({"rsa_rank_correlation": "pearson"}, "must be one of spearman, kendall"),
                       ({"r2_test_fraction": 1.0}, r"must be in \(0, 1\)")):
        with pytest.raises(ConfigError, match=match):
            AlignmentConventions(**bad)
