import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, r2_score, roc_auc_score

from fmprobe.config import EarlyStoppingConfig, HeadConfig, LossConfig, TaskConfig, TrainConfig
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.heads import build_head
from fmprobe.heads.bank import BankMember
from fmprobe.train.heads import fit_heads
from fmprobe.train.losses import build_loss
from fmprobe.train.schedule import lr_factor
from fmprobe.train.scoring import TaskScorer, each_member, to_scores
from fmprobe.train.sources import HeadData


def lr_at(step, *, base_lr, warmup_steps, total_steps):
    return base_lr * lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps)


@torch.no_grad()
def predict(head, x, task_type):
    head.eval()
    return to_scores(head(torch.as_tensor(x).float()), task_type).numpy()


BINARY = TaskConfig(type="binary", targets=["y"])


def binary_scores(y, s):
    return {"auroc": roc_auc_score(y, s), "accuracy": accuracy_score(y, s > 0.5), "confusion": [[1]]}


def multiclass_scores(y, s):
    return {"balanced_accuracy": balanced_accuracy_score(y, s.argmax(1))}


def regression_scores(y, s):
    return {"r2": r2_score(y, s)}


def binary_data(n, seed, dim=8, noise=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] + noise * rng.normal(size=n) > 0).astype(np.float32)
    return HeadData(torch.from_numpy(x), y)


def fit(train, val, *, head_cfg=HeadConfig(), seed=0, loss_cfg=LossConfig(), task=BINARY, score_fn=binary_scores,
        primary="auroc", **train_kw):
    cfg = TrainConfig(**{"epochs": 5, "batch_size": 32, "lr": 1e-2, **train_kw})
    out_dim = int(train.y.max()) + 1 if task.type == "multiclass" else 1 if task.type == "binary" else train.y.shape[1]
    loss, _ = build_loss(loss_cfg, task, train.y)
    scorer = TaskScorer(task.type, loss, each_member(score_fn), primary=primary, lower_is_better=False)
    result, bank = fit_heads([BankMember("h", head_cfg, cfg.lr, cfg.weight_decay)], train, val,
                             in_dim=train.x.shape[-1], out_dim=out_dim, task_type=task.type, loss=loss, cfg=cfg,
                             seed=seed, scorer=scorer)  # fmt: skip
    return bank.heads[0], result.fits[0]


TRAIN, VAL = binary_data(200, 0), binary_data(100, 1)


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_is_bitwise_identical_and_seeds_differ():
    mlp = HeadConfig(type="mlp", hidden=16, dropout=0.2)
    _, r1 = fit(TRAIN, VAL, head_cfg=mlp, seed=3)
    _, r2 = fit(TRAIN, VAL, head_cfg=mlp, seed=3)
    _, r3 = fit(TRAIN, VAL, head_cfg=mlp, seed=4)
    assert states_equal(r1.last_state, r2.last_state) and r1.curves == r2.curves
    assert not states_equal(r1.last_state, r3.last_state)
    assert r1.curves != r3.curves


def test_caller_rng_state_is_not_disturbed():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fit(TRAIN, VAL, head_cfg=HeadConfig(type="mlp", hidden=8, dropout=0.5), epochs=1)
    torch.testing.assert_close(torch.rand(3), expected)


def test_curves_hold_per_epoch_train_and_val_metrics():
    head, result = fit(TRAIN, VAL, epochs=4, lr=5e-2)
    assert [row["epoch"] for row in result.curves] == [1, 2, 3, 4]
    row = result.curves[-1]
    assert {"train_loss", "val_loss", "lr", "val_auroc", "val_accuracy", "train_auroc"} <= row.keys()
    assert "val_confusion" not in row  # non-scalar metrics stay out of the curves
    assert row["train_auroc"] > 0.8 and row["val_auroc"] > 0.8
    assert result.curves[-1]["train_loss"] < result.curves[0]["train_loss"]
    assert not result.stopped_early


def test_best_state_reproduces_best_val_score_and_head_holds_it():
    head, result = fit(TRAIN, VAL, epochs=6, lr=0.5)  # a high lr makes the val score wander
    vals = [row["val_auroc"] for row in result.curves]
    assert result.best_epoch == 1 + int(np.argmax(vals))
    assert result.best_val_score == max(vals)
    assert result.best_epoch < len(result.curves)  # the case this test is about: the best epoch is not the last
    assert not states_equal(result.best_state, result.last_state)
    assert states_equal(head.state_dict(), result.best_state)  # the trained head holds the best weights
    fresh = build_head(HeadConfig(), 8, 1)
    fresh.load_state_dict(result.best_state)
    scores = predict(fresh, VAL.x, "binary")
    assert binary_scores(VAL.y, scores)["auroc"] == pytest.approx(result.best_val_score)


def test_early_stopping_stops_after_patience_and_keeps_val_best():
    es = EarlyStoppingConfig(patience=2, min_delta=1.0)  # no later epoch can beat epoch 1 by a whole AUROC unit
    _, result = fit(TRAIN, VAL, epochs=20, early_stopping=es)
    assert result.stopped_early and len(result.curves) == 3
    vals = [row["val_auroc"] for row in result.curves]
    assert result.best_epoch == 1 + int(np.argmax(vals))


def test_early_stopping_on_val_loss_with_noise_labels():
    rng = np.random.default_rng(0)
    noise_train = HeadData(TRAIN.x, rng.integers(0, 2, 200).astype(np.float32))
    es = EarlyStoppingConfig(metric="loss", patience=3)
    _, result = fit(noise_train, VAL, head_cfg=HeadConfig(type="mlp", hidden=64), epochs=60, lr=3e-2,
                    early_stopping=es)
    assert result.stopped_early
    losses = [row["val_loss"] for row in result.curves]
    best_loss_epoch = int(np.argmin(losses))
    assert len(losses) == best_loss_epoch + 1 + 3


def test_unknown_early_stopping_metric_lists_available():
    with pytest.raises(ConfigError, match=r"train.early_stopping.metric 'f1'.*accuracy, auroc, loss"):
        fit(TRAIN, VAL, early_stopping=EarlyStoppingConfig(metric="f1"))


def test_nan_validation_primary_raises():
    one_class_val = HeadData(VAL.x, np.ones(100, dtype=np.float32))
    with pytest.raises(FmprobeError, match="validation auroc is NaN"):
        fit(TRAIN, one_class_val, score_fn=lambda y, s: {"auroc": math.nan})


def test_lr_schedule_warmup_then_cosine():
    kw = {"base_lr": 1.0, "warmup_steps": 4, "total_steps": 12}
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0
    assert lr_at(8, **kw) == pytest.approx(0.5)
    assert lr_at(11, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    # the trainer steps per optimizer step: 200 samples / 32 = 7 batches, accum 2 -> 4 steps per epoch
    _, result = fit(TRAIN, VAL, epochs=5, warmup_epochs=2, grad_accum=2, lr=0.1)
    expected = [lr_at(4 * e - 1, base_lr=0.1, warmup_steps=8, total_steps=20) for e in range(1, 6)]
    assert [row["lr"] for row in result.curves] == pytest.approx(expected)


@pytest.mark.parametrize("n,half", [(8, 4), (7, 4)])
def test_grad_accum_matches_full_batch(n, half):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(n, 4)).astype(np.float32))
    y = (x.numpy() @ rng.normal(size=(4, 2))).astype(np.float32)
    data = HeadData(x, y)
    task = TaskConfig(type="regression", targets=["a", "b"], primary_metric="r2/a")
    common = dict(task=task, score_fn=regression_scores, primary="r2", epochs=3, lr=0.1)
    _, full = fit(data, data, batch_size=n, **common)
    _, accum = fit(data, data, batch_size=half, grad_accum=2, **common)
    _, small = fit(data, data, batch_size=half, **common)
    for k in full.last_state:
        torch.testing.assert_close(accum.last_state[k], full.last_state[k], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(small.last_state["fc.weight"], full.last_state["fc.weight"], atol=1e-4)


def test_balanced_class_weights_change_trained_predictions():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])

    def sample(counts):
        y = np.repeat(np.arange(3), counts)
        return HeadData(torch.from_numpy((means[y] + rng.normal(size=(len(y), 2))).astype(np.float32)), y)

    train, val = sample([300, 25, 25]), sample([60, 60, 60])
    task = TaskConfig(type="multiclass", targets=["c"], class_names=["a", "b", "c"])
    common = dict(task=task, score_fn=multiclass_scores, primary="balanced_accuracy", epochs=8, lr=0.1)
    plain_head, plain = fit(train, val, **common)
    balanced_head, balanced = fit(train, val, loss_cfg=LossConfig(class_weights="balanced"), **common)
    pred_plain = predict(plain_head, val.x, "multiclass").argmax(1)
    pred_balanced = predict(balanced_head, val.x, "multiclass").argmax(1)
    assert (pred_balanced != 0).sum() > (pred_plain != 0).sum() + 40  # minority classes predicted far more often
    assert balanced.best_val_score > plain.best_val_score


def test_fp16_and_numpy_features_are_cast_per_batch():
    x16 = TRAIN.x.half()
    _, from_half = fit(HeadData(x16, TRAIN.y), VAL, epochs=2)
    _, from_numpy = fit(HeadData(x16.numpy(), TRAIN.y), VAL, epochs=2)
    _, from_float = fit(HeadData(x16.float(), TRAIN.y), VAL, epochs=2)
    assert states_equal(from_half.last_state, from_float.last_state)
    assert states_equal(from_numpy.last_state, from_float.last_state)


def test_attentive_head_learns_from_tokens_and_predict_conventions():
    rng = np.random.default_rng(0)
    n, ntok, dim = 200, 6, 8
    tokens = rng.normal(size=(n, ntok, dim)).astype(np.float32)
    y = rng.integers(0, 2, n).astype(np.float32)
    tokens[:, 2, 0] = (y * 2 - 1) * 3  # only token 2 carries the label ...
    tokens[:, 2, 1] = 4.0  # ... and a marker the queries can find it by
    data = HeadData(torch.from_numpy(tokens[:120]).half(), y[:120])
    val = HeadData(torch.from_numpy(tokens[120:]).half(), y[120:])
    cfg = HeadConfig(type="attentive", pooling="attentive", num_heads=2, hidden=16)
    head, result = fit(data, val, head_cfg=cfg, epochs=8, lr=3e-2)
    assert result.best_val_score > 0.95
    scores = predict(head, val.x, "binary")
    assert scores.shape == (80,) and scores.min() >= 0 and scores.max() <= 1
    attn = head.last_attention
    assert attn.shape == (80, 2, 1, ntok)
    assert attn[..., 2].mean() > 2 / ntok  # attention went to the informative token


def test_length_mismatch_and_too_long_warmup_raise():
    with pytest.raises(ValueError, match="train: 200 feature rows but 10 targets"):
        fit(HeadData(TRAIN.x, TRAIN.y[:10]), VAL)
    with pytest.raises(ConfigError, match="train.warmup_epochs"):
        fit(TRAIN, VAL, epochs=2, warmup_epochs=3)
