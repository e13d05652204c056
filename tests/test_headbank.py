"""HeadBank: many heads from one pass equal the same heads trained one by one, and the best is chosen on val."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmprobe.config import EarlyStoppingConfig, HeadConfig, LossConfig, TaskConfig, TrainConfig
from fmprobe.errors import ConfigError
from fmprobe.evaluate.task import TaskMetric
from fmprobe.heads.bank import HeadBank, head_grid
from fmprobe.train.heads import fit_heads
from fmprobe.train.losses import as_target_tensor, build_loss, member_losses
from fmprobe.train.optim import BankAdamW
from fmprobe.train.scoring import TaskScorer, each_member
from fmprobe.train.sources import HeadData


def multiclass(n, seed, dim=12):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x[:, :3] + 0.8 * rng.normal(size=(n, 3))).argmax(1)
    return HeadData(torch.from_numpy(x), y)


TASK = TaskConfig(type="multiclass", targets=["y"], class_names=["a", "b", "c"])
METRIC = TaskMetric("multiclass", class_names=["a", "b", "c"])


def score_fn(y, s):
    return {k: float(v[0]) for k, v in METRIC.weighted(y, s, np.ones((1, len(y)))).items()}


def run(members, train, val, *, loss, cfg, seed, metric, task_type="multiclass", primary="balanced_accuracy",
        in_dim=12, out_dim=3):
    scorer = TaskScorer(task_type, loss, metric, primary=primary, lower_is_better=False)
    return fit_heads(members, train, val, in_dim=in_dim, out_dim=out_dim, task_type=task_type, loss=loss, cfg=cfg,
                     seed=seed, scorer=scorer)


def fit_both(members, cfg, loss_cfg=LossConfig()):
    """The members as one bank (stacked metrics), and each member as a separate one-head run (its own metric)."""
    train, val = multiclass(240, 0), multiclass(120, 1)
    loss, _ = build_loss(loss_cfg, TASK, train.y)
    bank = run(members, train, val, loss=loss, cfg=cfg, seed=3, metric=METRIC.stacked)
    separate = {m.name: run([m], train, val, loss=loss, cfg=cfg, seed=3, metric=each_member(score_fn))[0].fits[0]
                for m in members}  # fmt: skip
    return bank, separate


def test_bank_reproduces_separate_runs_head_by_head():
    heads = [HeadConfig(type="linear"), HeadConfig(type="mlp", hidden=8)]
    members = head_grid(heads, [1e-2], [0.0, 0.05]) + head_grid(heads[:1], [1e-1], [0.0])
    cfg = TrainConfig(epochs=5, batch_size=48, warmup_epochs=2, grad_accum=2,
                      early_stopping=EarlyStoppingConfig(patience=2))  # fmt: skip
    (result, bank), separate = fit_both(members, cfg)
    assert len({m.name for m in members}) == 5
    for m in members:
        a, b = separate[m.name], result[m.name]
        assert (a.best_epoch, a.stopped_early, len(a.curves)) == (b.best_epoch, b.stopped_early, len(b.curves)), m.name
        assert a.best_val_score == pytest.approx(b.best_val_score, abs=1e-6)
        for key in a.last_state:
            torch.testing.assert_close(a.last_state[key], b.last_state[key], atol=1e-5, rtol=1e-4)
        for row_a, row_b in zip(a.curves, b.curves):
            assert row_a["lr"] == pytest.approx(row_b["lr"]) and row_a["train_loss"] == pytest.approx(row_b["train_loss"], rel=1e-4)
    assert result.fits[result.best].best_val_score == pytest.approx(max(r.best_val_score for r in separate.values()))
    # every head in the bank holds its best weights
    for i, m in enumerate(members):
        for key, value in bank.heads[i].state_dict().items():
            torch.testing.assert_close(value, result[m.name].best_state[key])


def test_fused_forward_equals_each_head():
    members = head_grid([HeadConfig(type="linear"), HeadConfig(type="mlp", hidden=5)], [1e-3, 1e-2], [0.0])
    bank = HeadBank(members, 7, 4).eval()
    x = torch.randn(9, 7)
    out = bank(x)
    assert out.shape == (4, 9, 4)
    for i, head in enumerate(bank.heads):
        torch.testing.assert_close(out[i], head(x))


def test_bank_optimizer_matches_torch_adamw_per_group():
    torch.manual_seed(0)
    # head 0 owns a matrix and a bias, head 1 a matrix; a stacked [2, 3, 2] tensor holds one matrix per head
    ps = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3)),
          torch.nn.Parameter(torch.randn(2, 2)), torch.nn.Parameter(torch.randn(2, 3, 2))]  # fmt: skip
    ref = [torch.nn.Parameter(t.detach().clone()) for t in ps[:3] + list(ps[3])]
    ours = BankAdamW([(ps[0], 0, True), (ps[1], 0, False), (ps[2], 1, True), (ps[3], [0, 1], True)], [0.01, 0.05],
                     [0.1, 0.3])
    torch_opt = torch.optim.AdamW([{"params": [ref[0], ref[3]], "weight_decay": 0.1, "lr": 0.01},
                                   {"params": [ref[1]], "weight_decay": 0.0, "lr": 0.01},
                                   {"params": [ref[2], ref[4]], "weight_decay": 0.3, "lr": 0.05}])  # fmt: skip
    for step in range(4):
        grads = [torch.randn_like(p) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        for r, g in zip(ref, grads[:3] + list(grads[3])):
            r.grad = g.clone()
        ours.update([0.01, 0.05])
        torch_opt.step()
    for p, r in zip(ps[:3] + list(ps[3]), ref):
        torch.testing.assert_close(p, r)
    frozen = ps[3][1].detach().clone()
    ps[3].grad = torch.randn_like(ps[3])
    ours.update([0.01, 0.0])  # learning rate 0: that head does not move at all
    assert torch.equal(ps[3][1], frozen)


def test_grid_refuses_mixed_inputs_and_empty_axes():
    with pytest.raises(ConfigError, match="one input"):
        head_grid([HeadConfig(), HeadConfig(type="attentive", pooling="attentive")], [1e-3], [0.0])
    with pytest.raises(ConfigError, match="at least one"):
        head_grid([HeadConfig()], [], [0.0])


@pytest.mark.parametrize("task_type,loss_cfg", [
    ("multiclass", LossConfig(class_weights="balanced", label_smoothing=0.1)),
    ("multiclass", LossConfig(type="focal", class_weights="balanced")),
    ("binary", LossConfig(pos_weight="auto", class_weights="balanced")),
    ("multilabel", LossConfig(type="focal", focal_alpha=0.3)),
    ("regression", LossConfig(type="huber")),
    ("regression", LossConfig()),
    ("regression with missing targets", LossConfig()),
    ("regression with missing targets", LossConfig(type="huber")),
])  # fmt: skip
def test_member_losses_equal_each_heads_loss(task_type, loss_cfg):
    rng = np.random.default_rng(0)
    n, heads = 30, 4
    if task_type == "multiclass":
        task, y, out = TASK, rng.integers(0, 3, n), 3
    elif task_type == "binary":
        task, y, out = TaskConfig(type="binary", targets=["y"]), (rng.random(n) < 0.3).astype(np.float32), 1
    elif task_type == "multilabel":
        task, y, out = TaskConfig(type="multilabel", targets=["a", "b"]), (rng.random((n, 2)) < 0.3).astype(np.float32), 2
    else:
        masked = task_type.endswith("missing targets")
        task = TaskConfig(type="regression", targets=["a", "b"], primary_metric="r2/a",
                          missing_targets="mask" if masked else "refuse")
        y, out = rng.normal(size=(n, 2)), 2
        if masked:  # a third of the cells without a value, never a whole row
            y[rng.random(n) < 0.3, 0] = np.nan
            y[np.isfinite(y[:, 0]) & (rng.random(n) < 0.4), 1] = np.nan
    loss, _ = build_loss(loss_cfg, task, y)
    yt = as_target_tensor(y, task.type)
    logits = torch.randn(heads, n, out)
    expected = torch.stack([loss(logits[h], yt) for h in range(heads)])
    torch.testing.assert_close(member_losses(loss, logits, yt), expected)
    assert torch.equal(member_losses(loss, logits[:1], yt), loss(logits[0], yt)[None])  # one member: the loss itself


def test_token_bank_of_attentive_heads_reproduces_separate_runs():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(96, 4, 8)).astype(np.float32))
    y = (x[:, :, :2].mean(1).sum(1) > 0).numpy().astype(np.float32)
    train, val = HeadData(x[:64], y[:64]), HeadData(x[64:], y[64:])
    task = TaskConfig(type="binary", targets=["y"])
    metric = TaskMetric("binary")
    loss, _ = build_loss(LossConfig(), task, train.y)
    head = HeadConfig(type="attentive", pooling="attentive", hidden=8, num_heads=2)
    members = head_grid([head], [1e-2, 3e-2], [0.0, 0.1])
    cfg = TrainConfig(epochs=3, batch_size=16)
    common = dict(task_type="binary", loss=loss, seed=1, primary="auroc", cfg=cfg, in_dim=8, out_dim=1)
    result, _ = run(members, train, val, metric=metric.stacked, **common)
    for m in members:
        ref = run([m], train, val, metric=each_member(lambda a, s: {k: float(v[0]) for k, v in metric.weighted(
            a, s, np.ones((1, len(a)))).items()}), **common)[0].fits[0]  # fmt: skip
        got = result[m.name]
        assert got.best_epoch == ref.best_epoch and got.best_val_score == pytest.approx(ref.best_val_score, abs=1e-6)
        for key in ref.last_state:
            torch.testing.assert_close(got.last_state[key], ref.last_state[key], atol=1e-5, rtol=1e-4)
