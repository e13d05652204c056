"""HeadBank: many heads from one pass equal the same heads trained one by one, and the best is chosen on val."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmprobe.config import EarlyStoppingConfig, HeadConfig, LossConfig, TaskConfig, TrainConfig
from fmprobe.errors import ConfigError
from fmprobe.evaluate.bootstrap import TaskMetric
from fmprobe.heads import build_head
from fmprobe.heads.bank import BankAdamW, HeadBank, head_grid, train_bank
from fmprobe.train.losses import build_loss
from fmprobe.train.trainer import HeadData, train_head


def multiclass(n, seed, dim=12):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x[:, :3] + 0.8 * rng.normal(size=(n, 3))).argmax(1)
    return HeadData(torch.from_numpy(x), y)


TASK = TaskConfig(type="multiclass", targets=["y"], class_names=["a", "b", "c"])
METRIC = TaskMetric("multiclass", class_names=["a", "b", "c"])


def score_fn(y, s):
    return {k: float(v[0]) for k, v in METRIC.weighted(y, s, np.ones((1, len(y)))).items()}


def fit_both(members, cfg, loss_cfg=LossConfig()):
    train, val = multiclass(240, 0), multiclass(120, 1)
    loss, _ = build_loss(loss_cfg, TASK, train.y)
    common = dict(task_type="multiclass", loss=loss, seed=3, score_fn=score_fn, primary="balanced_accuracy")
    bank = train_bank(members, train, val, in_dim=12, out_dim=3, cfg=cfg, **common)
    separate = {m.name: train_head(build_head(m.head, 12, 3), train, val, **common,
                                   cfg=cfg.model_copy(update={"lr": m.lr, "weight_decay": m.weight_decay}))
                for m in members}  # fmt: skip
    return bank, separate


def test_bank_reproduces_separate_runs_head_by_head():
    heads = [HeadConfig(type="linear"), HeadConfig(type="mlp", hidden=8)]
    members = head_grid(heads, [1e-2], [0.0, 0.05]) + head_grid(heads[:1], [1e-1], [0.0])
    cfg = TrainConfig(epochs=5, batch_size=48, warmup_epochs=2, grad_accum=2,
                      early_stopping=EarlyStoppingConfig(patience=2))  # fmt: skip
    bank, separate = fit_both(members, cfg)
    assert len({m.name for m in members}) == 5
    for m in members:
        a, b = separate[m.name], bank.results[m.name]
        assert (a.best_epoch, a.stopped_early, len(a.curves)) == (b.best_epoch, b.stopped_early, len(b.curves)), m.name
        assert a.best_val_score == pytest.approx(b.best_val_score, abs=1e-6)
        for key in a.last_state:
            torch.testing.assert_close(a.last_state[key], b.last_state[key], atol=1e-5, rtol=1e-4)
        for row_a, row_b in zip(a.curves, b.curves):
            assert row_a["lr"] == pytest.approx(row_b["lr"]) and row_a["train_loss"] == pytest.approx(row_b["train_loss"], rel=1e-4)
    assert bank.results[bank.best].best_val_score == pytest.approx(max(r.best_val_score for r in separate.values()))
    # every head in the bank holds its best weights
    for i, m in enumerate(members):
        for key, value in bank.bank.heads[i].state_dict().items():
            torch.testing.assert_close(value, bank.results[m.name].best_state[key])


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
    ps = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = BankAdamW([ps[:2], ps[2:]], [0.1, 0.3])
    torch_opt = torch.optim.AdamW([{"params": [ref[0]], "weight_decay": 0.1, "lr": 0.01},
                                   {"params": [ref[1]], "weight_decay": 0.0, "lr": 0.01},
                                   {"params": [ref[2]], "weight_decay": 0.3, "lr": 0.05}])  # fmt: skip
    for step in range(4):
        grads = [torch.randn_like(p) for p in ps]
        for p, r, g in zip(ps, ref, grads):
            p.grad, r.grad = g.clone(), g.clone()
        ours.step([0.01, 0.05])
        torch_opt.step()
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r)


def test_grid_refuses_mixed_inputs_and_empty_axes():
    with pytest.raises(ConfigError, match="one input"):
        head_grid([HeadConfig(), HeadConfig(type="attentive", pooling="attentive")], [1e-3], [0.0])
    with pytest.raises(ConfigError, match="at least one"):
        head_grid([HeadConfig()], [], [0.0])
