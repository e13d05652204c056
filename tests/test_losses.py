import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmprobe.config import LossConfig, TaskConfig
from fmprobe.errors import ConfigError
from fmprobe.train.losses import as_target_tensor, build_loss

MULTICLASS = TaskConfig(type="multiclass", targets=["label"], class_names=["a", "b", "c"])
BINARY = TaskConfig(type="binary", targets=["sick"])
MULTILABEL = TaskConfig(type="multilabel", targets=["x", "y"])
REGRESSION = TaskConfig(type="regression", targets=["age"])

Y_MC = np.array([0] * 6 + [1] * 3 + [2] * 1)
Y_BIN = np.array([1.0, 0, 0, 0, 1, 0, 0, 0])
Y_ML = np.array([[1.0, 0], [0, 1], [0, 1], [0, 0], [1, 1]])


@pytest.mark.parametrize(
    "task,y,kind",
    [
        (MULTICLASS, Y_MC, "ce"),
        (BINARY, Y_BIN, "bce"),
        (MULTILABEL, Y_ML, "bce"),
        (REGRESSION, np.zeros((4, 1)), "mse"),
    ],
)
def test_auto_picks_loss_by_task(task, y, kind):
    _, info = build_loss(LossConfig(), task, y)
    assert info["type"] == kind


def test_multiclass_balanced_weights_are_sklearn_balanced_and_change_the_loss():
    balanced, info = build_loss(LossConfig(class_weights="balanced"), MULTICLASS, Y_MC)
    expected = len(Y_MC) / (3 * np.bincount(Y_MC))
    np.testing.assert_allclose(info["class_weights"], expected)
    plain, _ = build_loss(LossConfig(), MULTICLASS, Y_MC)
    logits = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    y = as_target_tensor(Y_MC, "multiclass")
    assert not torch.isclose(balanced(logits, y), plain(logits, y))
    torch.testing.assert_close(balanced(logits, y), F.cross_entropy(logits, y, weight=torch.tensor(expected).float()))


def test_balanced_with_class_absent_from_train_names_the_class():
    with pytest.raises(ConfigError, match=r"loss.class_weights.*\['c'\].*absent"):
        build_loss(LossConfig(class_weights="balanced"), MULTICLASS, np.array([0, 1, 1, 0]))


def test_explicit_class_weights_length_checked():
    with pytest.raises(ConfigError, match="loss.class_weights has 2 values; expected 3"):
        build_loss(LossConfig(class_weights=[1.0, 2.0]), MULTICLASS, Y_MC)
    _, info = build_loss(LossConfig(class_weights=[1.0, 2.0, 3.0]), MULTICLASS, Y_MC)
    assert info["class_weights"] == [1.0, 2.0, 3.0]


def test_binary_balanced_weights_each_side():
    loss, info = build_loss(LossConfig(class_weights="balanced"), BINARY, Y_BIN)
    n, n_pos = len(Y_BIN), Y_BIN.sum()
    assert info["class_weights"] == {
        "negative": [pytest.approx(n / (2 * (n - n_pos)))],
        "positive": [pytest.approx(n / (2 * n_pos))],
    }
    plain, _ = build_loss(LossConfig(), BINARY, Y_BIN)
    logits = torch.zeros(8, 1)
    y = as_target_tensor(Y_BIN, "binary")
    # at logits 0 every element costs log 2; balanced weights average to 1 over the training set
    torch.testing.assert_close(plain(logits, y), torch.tensor(np.log(2.0)).float())
    torch.testing.assert_close(loss(logits, y), torch.tensor(np.log(2.0)).float())
    confident_negative = torch.full((8, 1), -3.0)  # right on negatives, wrong on the minority positives
    assert loss(confident_negative, y) > plain(confident_negative, y)


def test_multilabel_balanced_label_without_positives_names_label():
    y = Y_ML.copy()
    y[:, 1] = 0
    with pytest.raises(ConfigError, match="label 'y'.*no positive"):
        build_loss(LossConfig(class_weights="balanced"), MULTILABEL, y)


def test_pos_weight_auto_is_neg_over_pos():
    loss, info = build_loss(LossConfig(pos_weight="auto"), MULTILABEL, Y_ML)
    pos = Y_ML.sum(0)
    np.testing.assert_allclose(info["pos_weight"], (len(Y_ML) - pos) / pos)
    logits = torch.randn(5, 2)
    y = as_target_tensor(Y_ML, "multilabel")
    expected = F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor((len(Y_ML) - pos) / pos).float())
    torch.testing.assert_close(loss(logits, y), expected)
    with pytest.raises(ConfigError, match="loss.pos_weight.*label 'sick'.*no positive"):
        build_loss(LossConfig(pos_weight="auto"), BINARY, np.zeros(4))
    with pytest.raises(ConfigError, match="loss.pos_weight has 1 values; expected 2"):
        build_loss(LossConfig(pos_weight=[2.0]), MULTILABEL, Y_ML)


def test_sigmoid_focal_gamma0_without_alpha_equals_bce():
    focal, info = build_loss(LossConfig(type="focal", focal_gamma=0.0, focal_alpha=None), MULTILABEL, Y_ML)
    bce, _ = build_loss(LossConfig(type="bce"), MULTILABEL, Y_ML)
    logits = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    y = as_target_tensor(Y_ML, "multilabel")
    torch.testing.assert_close(focal(logits, y), bce(logits, y))
    assert info["type"] == "focal" and info["focal_gamma"] == 0.0


def test_focal_gamma_downweights_easy_examples():
    focal, _ = build_loss(LossConfig(type="focal", focal_alpha=None), BINARY, Y_BIN)
    bce, _ = build_loss(LossConfig(), BINARY, Y_BIN)
    y = as_target_tensor(Y_BIN, "binary")
    easy = (y * 2 - 1).unsqueeze(1) * 4.0  # confidently right
    hard = -easy
    assert focal(easy, y) / bce(easy, y) < 0.01
    assert focal(hard, y) / bce(hard, y) > 0.9


def test_softmax_focal_gamma0_with_class_weights_equals_weighted_ce():
    focal, info = build_loss(LossConfig(type="focal", focal_gamma=0.0, class_weights="balanced"), MULTICLASS, Y_MC)
    ce, _ = build_loss(LossConfig(class_weights="balanced"), MULTICLASS, Y_MC)
    logits = torch.randn(10, 3, generator=torch.Generator().manual_seed(2))
    y = as_target_tensor(Y_MC, "multiclass")
    torch.testing.assert_close(focal(logits, y), ce(logits, y))
    assert info["focal_alpha"] == "class_weights"


def test_bce_label_smoothing_targets():
    loss, info = build_loss(LossConfig(label_smoothing=0.2), BINARY, Y_BIN)
    logits = torch.randn(8, 1)
    y = as_target_tensor(Y_BIN, "binary")
    expected = F.binary_cross_entropy_with_logits(logits[:, 0], y * 0.8 + 0.1)
    torch.testing.assert_close(loss(logits, y), expected)
    assert info["label_smoothing"] == 0.2


def test_huber_uses_delta():
    loss, info = build_loss(LossConfig(type="huber", huber_delta=0.5), REGRESSION, np.zeros((3, 1)))
    assert info["huber_delta"] == 0.5
    torch.testing.assert_close(loss(torch.tensor([[2.0]]), torch.tensor([[0.0]])), torch.tensor(0.5 * (2.0 - 0.25)))


@pytest.mark.parametrize(
    "cfg,task,y,key",
    [
        (LossConfig(class_weights="balanced"), REGRESSION, np.zeros((3, 1)), "loss.class_weights"),
        (LossConfig(pos_weight="auto"), MULTICLASS, Y_MC, "loss.pos_weight"),
        (LossConfig(type="mse", pos_weight=[1.0]), REGRESSION, np.zeros((3, 1)), "loss.pos_weight"),
        (LossConfig(type="ce"), BINARY, Y_BIN, "loss.type 'ce'"),
        (LossConfig(type="bce"), REGRESSION, np.zeros((3, 1)), "loss.type 'bce'"),
        (LossConfig(type="focal", label_smoothing=0.1), BINARY, Y_BIN, "loss.label_smoothing"),
        (LossConfig(huber_delta=2.0), REGRESSION, np.zeros((3, 1)), "loss.huber_delta"),
        (LossConfig(focal_gamma=1.0), BINARY, Y_BIN, "loss.focal_gamma"),
        (LossConfig(type="focal", focal_alpha=0.5), MULTICLASS, Y_MC, "loss.focal_alpha"),
        (LossConfig(class_weights="balanced"), TaskConfig(type="multiclass", targets=["l"]), Y_MC, "task.class_names"),
    ],
)
def test_options_not_valid_for_the_task_raise_naming_the_key(cfg, task, y, key):
    with pytest.raises(ConfigError, match=key):
        build_loss(cfg, task, y)


def test_target_shapes_checked():
    with pytest.raises(ValueError, match=r"multiclass targets must be int"):
        as_target_tensor(np.array([0.0, 1.0]), "multiclass")
    with pytest.raises(ValueError, match=r"regression targets must have shape \[N, C\]"):
        as_target_tensor(np.zeros(3), "regression")


def test_masked_regression_loss_is_the_plain_loss_on_the_cells_that_hold_a_value():
    task = TaskConfig(type="regression", targets=["age", "mmse"], primary_metric="r2/age", missing_targets="mask")
    rng = np.random.default_rng(0)
    y = rng.normal(size=(12, 2)).astype(np.float32)
    out = torch.randn(12, 2, requires_grad=True)
    loss, info = build_loss(LossConfig(), task, y)
    assert info["missing_targets"].startswith("masked") and loss(out, torch.tensor(y)).item() == pytest.approx(
        torch.nn.functional.mse_loss(out, torch.tensor(y)).item())  # nothing missing: the MSE itself
    y[[1, 4, 7], 1] = np.nan  # three sessions without MMSE
    y[2, 0] = np.nan  # one without age
    value = loss(out, torch.tensor(y))
    observed = np.isfinite(y)
    want = ((out.detach().numpy() - np.nan_to_num(y)) ** 2)[observed].mean()
    assert value.item() == pytest.approx(want, rel=1e-6)
    value.backward()
    assert torch.isfinite(out.grad).all() and (out.grad[~torch.tensor(observed)] == 0).all()
    huber, _ = build_loss(LossConfig(type="huber", huber_delta=0.5), task, y)
    cells = torch.nn.functional.huber_loss(out[torch.tensor(observed)], torch.tensor(y)[torch.tensor(observed)],
                                           delta=0.5)
    assert huber(out, torch.tensor(y)).item() == pytest.approx(cells.item(), rel=1e-6)
