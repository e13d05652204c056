"""knn, prototype and logreg heads against their references: scikit-learn's KNeighborsClassifier / Regressor with
DINOv2's exp(s/T) vote weights, a nearest centroid computed by hand, LogisticRegression(lbfgs) and Ridge at each C;
and the choice of k / C on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

from fmprobe.config import HeadConfig, LossConfig, TaskConfig, parse_config
from fmprobe.errors import ConfigError
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.probes.fitted import check_fitted, fit_subsets
from fmprobe.probes.logreg import fit_logistic, fit_ridge, linear_outputs
from fmprobe.probes.nonparametric import knn_scores, prototype_scores
from fmprobe.report.terminal import fitted_lines

T = 0.07


def dinov2_weights(distances: np.ndarray) -> np.ndarray:
    """DINOv2's vote weights from scikit-learn's cosine distances: exp(similarity / T), similarity = 1 - distance."""
    return np.exp((1 - distances) / T)


def dinov2_knn(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """DINOv2's eval/knn.py by hand: cosine similarity, the k most similar, softmax(s / T) over them, weighted
    one-hot (or value) sum."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    sims = unit(queries) @ unit(train).T
    top = np.argsort(-sims, axis=1)[:, :k]
    s = np.take_along_axis(sims, top, axis=1)
    w = np.exp(s / T)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("qk,qko->qo", w, labels[top])


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = {s: rng.normal(size=(n, 8)) for s, n in (("train", 60), ("val", 25), ("test", 30))}
    y = rng.integers(0, 3, size=60)
    return x, y


def test_knn_equals_sklearn_and_dinov2_by_hand(data):
    x, y = data
    subsets = [np.arange(60), np.arange(10, 50)]
    onehot = np.eye(3)[y]
    grid, effective = knn_scores({s: torch.from_numpy(v) for s, v in x.items()}, torch.from_numpy(onehot), subsets,
                                 [1, 5, 20, 100], T)  # fmt: skip
    assert effective.tolist() == [[1, 5, 20, 60], [1, 5, 20, 40]]  # k capped by the labelled rows
    for i, rows in enumerate(subsets):
        for g, k in enumerate([1, 5, 20, min(100, len(rows))]):
            sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=dinov2_weights, algorithm="brute")
            sk.fit(x["train"][rows], y[rows])
            for split in ("val", "test"):
                ours = grid[split][i][g]
                np.testing.assert_allclose(ours, sk.predict_proba(x[split]), atol=1e-5)
                np.testing.assert_allclose(ours, dinov2_knn(x["train"][rows], onehot[rows], x[split], k), atol=1e-5)


def test_knn_regression_and_leave_one_out_on_the_training_split(data):
    x, _ = data
    target = np.random.default_rng(1).normal(size=(60, 2))
    grid, _ = knn_scores({s: torch.from_numpy(v) for s, v in x.items()}, torch.from_numpy(target), [np.arange(60)],
                         [7], T)  # fmt: skip
    sk = KNeighborsRegressor(n_neighbors=7, metric="cosine", weights=dinov2_weights, algorithm="brute")
    sk.fit(x["train"], target)
    np.testing.assert_allclose(grid["test"][0][0], sk.predict(x["test"]), atol=1e-5)
    # a labelled row is never its own neighbour: its training score is the vote of the other rows
    for row in (0, 33):
        others = np.delete(np.arange(60), row)
        expected = dinov2_knn(x["train"][others], target[others], x["train"][[row]], 7)[0]
        np.testing.assert_allclose(grid["train"][0][0, row], expected, atol=1e-5)


def test_prototype_equals_nearest_centroid_by_hand():
    x = {"train": np.array([[3.0, 0.0], [1.0, 0.2], [0.0, 2.0], [0.2, 1.0], [-1.0, -1.0], [-2.0, -1.5]]),
         "val": np.array([[1.0, 1.0]]), "test": np.array([[2.0, 0.1], [0.1, 3.0], [-1.0, -0.8], [1.0, -1.0]])}  # fmt: skip
    y = np.array([0, 0, 1, 1, 2, 2])
    grid = prototype_scores({s: torch.from_numpy(v) for s, v in x.items()}, torch.from_numpy(np.eye(3)[y]),
                            [np.arange(6)], multiclass=True)  # fmt: skip
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    means = np.stack([unit(x["train"])[y == c].mean(axis=0) for c in range(3)])
    d2 = ((unit(x["test"])[:, None, :] - means[None]) ** 2).sum(-1)
    expected = np.exp(-d2) / np.exp(-d2).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(grid["test"][0][0], expected, atol=1e-6)
    assert grid["test"][0][0].argmax(axis=1).tolist() == d2.argmin(axis=1).tolist() == [0, 1, 2, 0]  # nearest
    # binary (and per label for multilabel): the positive against the negative prototype
    labels = (y == 1).astype(float)[:, None]
    binary = prototype_scores({s: torch.from_numpy(v) for s, v in x.items()}, torch.from_numpy(labels),
                              [np.arange(6)], multiclass=False)  # fmt: skip
    pos, neg = unit(x["train"])[y == 1].mean(axis=0), unit(x["train"])[y != 1].mean(axis=0)
    d_pos, d_neg = ((unit(x["test"]) - pos) ** 2).sum(1), ((unit(x["test"]) - neg) ** 2).sum(1)
    np.testing.assert_allclose(binary["test"][0][0, :, 0], 1 / (1 + np.exp(d_pos - d_neg)), atol=1e-6)


CS = [0.01, 0.1, 1.0, 10.0]


@pytest.mark.parametrize("n", [200, 24])  # more rows than features, and fewer (solved in the rows' span)
def test_logreg_equals_sklearn_lbfgs_at_each_c(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n + 100, 30))
    y = (x @ rng.normal(size=(30, 3)) + 2 * rng.normal(size=(n + 100, 3))).argmax(axis=1)
    rows = np.arange(n)
    fit = fit_logistic(torch.from_numpy(x), torch.from_numpy(np.eye(3)[y]), [rows], CS, multinomial=True)
    assert fit.converged.all()
    probs = torch.softmax(linear_outputs(fit, torch.from_numpy(x[n:])), -1).numpy()[0]
    for g, c in enumerate(CS):
        sk = LogisticRegression(C=c, solver="lbfgs", tol=1e-10, max_iter=10000).fit(x[rows], y[rows])
        assert np.abs(fit.weights[0, g, :-1].numpy() - sk.coef_.T).max() < 1e-2
        accuracy = (probs[g].argmax(1) == y[n:]).mean()
        assert abs(accuracy - sk.score(x[n:], y[n:])) < 1e-3


def test_binary_multilabel_and_class_weights_equal_sklearn():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(150, 12))
    y = (x @ rng.normal(size=(12, 2)) + rng.normal(size=(150, 2)) > 0.8).astype(float)  # two imbalanced labels
    fit = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), [np.arange(150)], CS, multinomial=False)
    for g, c in enumerate(CS):
        for label in range(2):  # one-vs-rest: each label its own binary problem
            sk = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x, y[:, label])
            np.testing.assert_allclose(fit.weights[0, g, :-1, label].numpy(), sk.coef_[0], atol=1e-2)
            assert abs(fit.weights[0, g, -1, label].item() - sk.intercept_[0]) < 1e-2
    # loss.class_weights: balanced is scikit-learn's class_weight="balanced" (through fit_subsets' loss weights)
    task_cfg = TaskConfig(type="binary", targets=["y"])
    task = ResolvedTask.from_config(task_cfg, None)
    splits = {"train": x[:100], "val": x[100:125], "test": x[125:]}
    targets = {"train": y[:100, 0], "val": y[100:125, 0], "test": y[125:, 0]}
    head = HeadConfig(type="logreg", C=[0.1])
    fitted = fit_subsets(head, task, {s: torch.from_numpy(v) for s, v in splits.items()}, targets, [np.arange(100)],
                         loss_cfg=LossConfig(class_weights="balanced"), task_cfg=task_cfg)[0]  # fmt: skip
    sk = LogisticRegression(C=0.1, class_weight="balanced", tol=1e-10, max_iter=10000).fit(x[:100], y[:100, 0])
    np.testing.assert_allclose(fitted.scores["test"], sk.predict_proba(x[125:])[:, 1], atol=1e-3)


def test_ridge_equals_sklearn_for_every_alpha():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(80, 10))
    y = x @ rng.normal(size=(10, 2)) + rng.normal(size=(80, 2))
    subsets = [np.arange(80), np.arange(7)]  # a subset with fewer rows than features too
    fit = fit_ridge(torch.from_numpy(x), torch.from_numpy(y), subsets, CS)
    for i, rows in enumerate(subsets):
        for g, c in enumerate(CS):
            sk = Ridge(alpha=1 / c).fit(x[rows], y[rows])
            np.testing.assert_allclose(fit.weights[i, g, :-1].numpy(), sk.coef_.T, atol=1e-8)
            np.testing.assert_allclose(fit.weights[i, g, -1].numpy(), sk.intercept_, atol=1e-8)


def test_k_and_c_are_chosen_on_validation_smallest_on_ties(data):
    x, y = data
    task_cfg = TaskConfig(type="multiclass", targets=["y"], class_names=["a", "b", "c"])
    task = ResolvedTask.from_config(task_cfg, ["a", "b", "c"])
    inputs = {s: torch.from_numpy(v) for s, v in x.items()}
    rng = np.random.default_rng(5)
    targets = {"train": y, "val": rng.integers(0, 3, 25), "test": rng.integers(0, 3, 30)}
    for head in (HeadConfig(type="knn", k=[27, 1, 3, 9]), HeadConfig(type="logreg", C=[10.0, 1e-3, 1e-1])):
        fitted = fit_subsets(head, task, inputs, targets, [np.arange(60), np.arange(30)], loss_cfg=LossConfig(),
                             task_cfg=task_cfg)  # fmt: skip
        for f in fitted:
            values = f.selected["validation"]  # every k / C tried, in grid order, with its validation score
            best = max(values.values())
            chosen = f.selected["k" if head.type == "knn" else "C"]
            assert chosen == min(float(v) for v, score in values.items() if score == best)  # ties: the smallest
            assert f.best_val_score == best
        # one validation image repeated: every k / C predicts it the same way, so all tie
        same = {**inputs, "val": inputs["val"][:1].expand(25, -1)}
        tied = fit_subsets(head, task, same, targets, [np.arange(60)], loss_cfg=LossConfig(), task_cfg=task_cfg)[0]
        assert len(set(tied.selected["validation"].values())) == 1
        assert tied.selected["k" if head.type == "knn" else "C"] == (1 if head.type == "knn" else 1e-3)


def test_refusals_name_what_to_do(toy_study):
    with pytest.raises(ConfigError, match="pooling must be mean, cls or cls\\+mean"):
        parse_config(toy_study("binary", heads=[{"type": "knn", "pooling": "attentive"}]))
    with pytest.raises(ConfigError, match="key 'k' does not apply to a logreg head"):
        check_fitted(parse_config(toy_study("binary", heads=[{"type": "linear"}, {"type": "logreg", "k": [3]}])))
    with pytest.raises(ConfigError, match="prototype head needs classes"):
        check_fitted(parse_config(toy_study("regression", heads=[{"type": "prototype"}])))
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        check_fitted(parse_config(toy_study("binary", heads=[{"type": "logreg"}], loss={"label_smoothing": 0.1})))
    with pytest.raises(ConfigError, match="C needs distinct positive values"):
        parse_config(toy_study("binary", heads=[{"type": "logreg", "C": [1.0, 1.0]}]))


def test_a_fitted_head_s_identity_ignores_sgd_settings(toy_study):
    """A learning-rate sweep leaves knn's predictions unchanged, rightly: that is no identical_predictions case."""
    from fmprobe.experiments.identity import head_identities

    heads = [{"type": "linear"}, {"type": "knn"}, {"type": "logreg"}]
    slow, fast = (head_identities(parse_config(toy_study("binary", heads=heads, train={"lr": lr}))) for lr in (0.01, 0.1))
    assert slow["knn"] == fast["knn"] and slow["logreg"] == fast["logreg"] and slow["linear"] != fast["linear"]
    weighted = head_identities(parse_config(toy_study("binary", heads=heads, loss={"class_weights": "balanced"})))
    assert weighted["knn"] == slow["knn"] and weighted["logreg"] != slow["logreg"]  # logreg fits with the weights


def test_fitted_heads_run_beside_a_grid_and_on_regression(toy_study, one_torch_thread):
    from fmprobe.experiments.run import run_experiment

    config = toy_study("binary", heads=[{"type": "linear"}, {"type": "logreg", "C": [0.01, 1.0]}],
                       train={"epochs": 3, "grid": {"lr": [0.01, 0.1]}})  # fmt: skip
    metrics = run_experiment(parse_config(config), progress=False).metrics
    assert set(metrics["selection"]["grid"]["heads"]) == {"linear"}  # the lr grid is the trained head's
    logreg = metrics["heads"]["logreg"]
    assert {s["C"] for s in logreg["selected"].values()} <= {0.01, 1.0} and logreg["trainable_params"] == 32 + 1
    # the summary says which C was chosen, with its validation score (every seed fits the same: shown once)
    c = logreg["selected"]["0"]["C"]
    score = logreg["selected"]["0"]["validation"][str(c)]
    assert fitted_lines(metrics) == [f"fitted heads, chosen on validation auroc: logreg → C {c:g} ({score:.3f}) of 2"]
    # regression: ridge (alpha = 1 / C) and the weighted-mean k-NN, on label fractions too
    config = toy_study("regression", name="reg", heads=[{"type": "knn", "k": [3, 9]}, {"type": "logreg"}],
                       train={"label_fractions": [0.5, 1.0]})  # fmt: skip
    metrics = run_experiment(parse_config(config), progress=False).metrics
    assert metrics["heads"]["logreg"]["loss"]["type"] == "squared error"
    assert metrics["heads"]["logreg"]["splits"]["test"]["mean"]["r2"] > 0.5  # the brightness carries the target
    block = metrics["efficiency"]
    assert block["metric"] == "r2" and [p["status"] for p in block["points"]] == ["ok"] * 4


def test_a_logreg_stopped_at_its_iteration_limit_is_flagged(toy_study, one_torch_thread, monkeypatch):
    """An L-BFGS that ran out of iterations has not reached the optimum logreg defines: said, per member."""
    import functools

    import fmprobe.probes.fitted as fitted_module
    from fmprobe.experiments.run import run_experiment

    config = toy_study("binary", heads=[{"type": "logreg", "C": [10.0]}], train={"seeds": [0, 1]})
    with monkeypatch.context() as patch:
        patch.setattr(fitted_module, "fit_logistic", functools.partial(fitted_module.fit_logistic, max_iter=2))
        head = run_experiment(parse_config(config), progress=False).metrics["heads"]["logreg"]
    flag = next(f for f in head["flags"] if f["name"] == "solver_not_converged")
    assert flag["details"]["iterations"] == {"0": 2, "1": 2} and "did not converge" in flag["message"]
    assert all(s["converged"] is False for s in head["selected"].values())
    assert "not_converged" not in {f["name"] for f in head["flags"]}  # the trained heads' epoch flag: not this
    solved = run_experiment(parse_config({**config, "name": "solved"}), progress=False).metrics["heads"]["logreg"]
    assert "solver_not_converged" not in {f["name"] for f in solved["flags"]}
