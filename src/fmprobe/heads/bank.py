"""HeadBank: a grid of probe heads (head type x learning rate x weight decay) trained together from one pass over
cached features, each head its own parameter groups, the best chosen on validation (after dinov2's
``eval/linear.py`` AllClassifiers).

Every head sees the same batches in the same order as a separate ``train_head`` run with the same seed, starts
from the same initialisation (each head is reset under the seed on its own) and follows the same warmup + cosine
schedule at its own learning rate; linear heads run as one batched matmul and MLP heads of one width as one
batched MLP. The summed loss gives each head exactly its own gradient (parameters are disjoint). A head whose
early stopping is exhausted stops updating (learning rate 0) while the others go on. Differences from separate
runs: dropout masks are drawn from one shared stream, and ``train_loss`` in the curves is the loss over the
epoch's training predictions (equal to the per-batch mean for unweighted losses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmprobe.config import HeadConfig, TrainConfig
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.heads import build_head
from fmprobe.heads.linear import LinearHead
from fmprobe.heads.mlp import MLPHead
from fmprobe.train.losses import as_target_tensor
from fmprobe.train.seeding import data_generator, seeded
from fmprobe.train.trainer import (
    EVAL_BATCH, HeadData, TrainResult, feature_batch, EarlyStopper, improved, lookup_metric, scalar_values, to_scores, lr_at,
)  # fmt: skip


@dataclass(frozen=True)
class BankMember:
    name: str
    head: HeadConfig
    lr: float
    weight_decay: float


def head_grid(heads: list[HeadConfig], lrs: list[float], weight_decays: list[float]) -> list[BankMember]:
    """Every head config x learning rate x weight decay, named ``<head>/lr<lr>/wd<wd>``."""
    if not heads or not lrs or not weight_decays:
        raise ConfigError("a head grid needs at least one head, one learning rate and one weight decay")
    pooled = {h.pooling == "attentive" for h in heads}
    if len(pooled) > 1:
        raise ConfigError("a HeadBank trains on one input: mix no attentive (token) heads with pooled heads")
    return [BankMember(f"{h.name}/lr{lr:g}/wd{wd:g}", h, lr, wd) for h in heads for lr in lrs for wd in weight_decays]


class HeadBank(nn.Module):
    """``forward(x [B, ...]) -> logits [H, B, out_dim]`` for the H member heads."""

    def __init__(self, members: list[BankMember], in_dim: int, out_dim: int):
        super().__init__()
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"HeadBank members need distinct names, got {names}")
        self.members = members
        self.heads = nn.ModuleList(build_head(m.head, in_dim, out_dim) for m in members)
        self.linear = [i for i, h in enumerate(self.heads) if isinstance(h, LinearHead)]
        widths: dict[int, list[int]] = {}
        for i, h in enumerate(self.heads):
            if isinstance(h, MLPHead):
                widths.setdefault(h.fc1.out_features, []).append(i)
        self.mlps = list(widths.values())
        fused = set(self.linear) | {i for g in self.mlps for i in g}
        self.others = [i for i in range(len(self.heads)) if i not in fused]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: list[torch.Tensor | None] = [None] * len(self.heads)
        if self.linear:
            heads = [self.heads[i] for i in self.linear]
            w = torch.stack([h.fc.weight for h in heads])
            b = torch.stack([h.fc.bias for h in heads])
            ps = [h.dropout.p for h in heads]
            if self.training and any(ps):  # each head its own input dropout mask
                logits = torch.einsum("lbd,lod->lbo", _drop(x.expand(len(ps), *x.shape), ps, True), w)
            else:
                logits = torch.einsum("bd,lod->lbo", x, w)
            logits = logits + b[:, None]
            for j, i in enumerate(self.linear):
                out[i] = logits[j]
        for group in self.mlps:
            heads = [self.heads[i] for i in group]
            hidden = torch.einsum("bd,mkd->mbk", x, torch.stack([h.fc1.weight for h in heads]))
            hidden = F.gelu(hidden + torch.stack([h.fc1.bias for h in heads])[:, None])
            hidden = _drop(hidden, [h.dropout.p for h in heads], self.training)
            logits = torch.einsum("mbk,mok->mbo", hidden, torch.stack([h.fc2.weight for h in heads]))
            logits = logits + torch.stack([h.fc2.bias for h in heads])[:, None]
            for j, i in enumerate(group):
                out[i] = logits[j]
        for i in self.others:
            out[i] = self.heads[i](x)
        return torch.stack(out)  # type: ignore[arg-type]


def _drop(x: torch.Tensor, ps: list[float], training: bool) -> torch.Tensor:
    """Dropout with its own rate per head along dim 0."""
    if not training or not any(ps):
        return x
    p = torch.tensor(ps, dtype=x.dtype, device=x.device).view(-1, *([1] * (x.ndim - 1)))
    keep = (torch.rand_like(x) >= p).to(x.dtype)
    return x * keep / (1 - p)


class BankAdamW:
    """``torch.optim.AdamW`` (default betas, eps; no amsgrad) for many heads in one step: each head is its own
    parameter group (its learning rate and weight decay; none on 1-D parameters), and every group is updated by
    the same few foreach kernels. torch's optimizer runs its kernels once per group, which for a bank of small
    heads costs more than the heads themselves. A test checks it against separate torch AdamW runs.
    """

    def __init__(self, params: list[list[nn.Parameter]], weight_decays: list[float],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):  # fmt: skip
        self.params = [p for group in params for p in group]
        self.owner = [h for h, group in enumerate(params) for _ in group]
        self.decay = [weight_decays[h] if p.ndim > 1 else 0.0 for h, p in zip(self.owner, self.params)]
        self.betas, self.eps, self.steps = betas, eps, 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lrs: list[float]) -> None:
        """One update with learning rate ``lrs[h]`` for head h (0 leaves a head exactly as it is)."""
        beta1, beta2 = self.betas
        self.steps += 1
        lr = [lrs[h] for h in self.owner]
        grads = [p.grad for p in self.params]
        torch._foreach_mul_(self.params, [1 - a * wd for a, wd in zip(lr, self.decay)])
        torch._foreach_lerp_(self.exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(self.exp_avg_sq, beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - beta2)
        correction1 = 1 - beta1**self.steps
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(1 - beta2**self.steps))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.exp_avg, denom, [-(a / correction1) for a in lr])


@dataclass
class BankResult:
    results: dict[str, TrainResult]  # per member, as train_head returns it
    best: str  # the member with the best validation score (test never enters)
    bank: HeadBank  # every head holds its best weights


def train_bank(
    members: list[BankMember],
    train: HeadData,
    val: HeadData,
    *,
    in_dim: int,
    out_dim: int,
    task_type: str,
    loss: nn.Module,
    cfg: TrainConfig,
    seed: int,
    score_fn: Callable[[np.ndarray, np.ndarray], dict[str, Any]],
    primary: str,
    higher_is_better: bool = True,
    device: str | torch.device = "cpu",
) -> BankResult:
    """Train all ``members`` at once; ``cfg.lr`` and ``cfg.weight_decay`` are replaced by each member's own."""
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"train.warmup_epochs ({cfg.warmup_epochs}) exceeds train.epochs ({cfg.epochs})")
    y_train = as_target_tensor(train.y, task_type)
    y_val = as_target_tensor(val.y, task_type)
    n_batches = math.ceil(len(y_train) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    n_heads = len(members)
    with seeded(seed, device):
        bank = HeadBank(members, in_dim, out_dim).to(device)
        for head in bank.heads:
            with seeded(seed, device):  # the init a separate run with this seed would draw
                head.reset_parameters()
        optimizer = BankAdamW([[p for p in h.parameters() if p.requires_grad] for h in bank.heads],
                               [m.weight_decay for m in members])  # fmt: skip
        loss.to(device)
        stoppers = [EarlyStopper.from_config(cfg, primary, higher_is_better) for _ in members]
        active = [True] * n_heads
        curves: list[list[dict[str, float]]] = [[] for _ in members]
        best_state: list[dict[str, torch.Tensor]] = [{} for _ in members]
        best_score, best_epoch = [math.nan] * n_heads, [0] * n_heads
        stopped = [False] * n_heads
        order = data_generator(seed)
        step = 0
        for epoch in range(1, cfg.epochs + 1):
            bank.train()
            perm = torch.randperm(len(y_train), generator=order)
            batches = perm.split(cfg.batch_size)
            seen = []
            lrs = [math.nan] * n_heads
            for start in range(0, len(batches), cfg.grad_accum):
                factor = lr_at(step, base_lr=1.0, warmup_steps=warmup, total_steps=total)
                lrs = [m.lr * factor if active[h] else 0.0 for h, m in enumerate(members)]
                group = batches[start : start + cfg.grad_accum]
                group_size = sum(len(b) for b in group)
                optimizer.zero_grad()
                for idx in group:
                    logits = bank(feature_batch(train.x, idx, device))
                    y = y_train[idx].to(device)
                    stacked = logits.reshape(n_heads * len(idx), -1)
                    # mean over H copies of the batch = mean of the per-head losses (same targets, same weights)
                    value = loss(stacked, y.repeat(n_heads, *([1] * (y.ndim - 1)))) * n_heads
                    (value * (len(idx) / group_size)).backward()
                    seen.append(logits.detach().float().cpu())
                optimizer.step(lrs)
                step += 1
            train_logits = torch.cat(seen, dim=1)
            val_logits = _bank_logits(bank, val.x, device)
            y_seen = y_train[perm]
            for h, m in enumerate(members):
                if not active[h]:
                    continue
                with torch.no_grad():
                    train_loss = float(loss(train_logits[h].to(device), y_seen.to(device)))
                    val_loss = float(loss(val_logits[h].to(device), y_val.to(device)))
                if not math.isfinite(train_loss):
                    raise FmprobeError(f"head {m.name}: training loss became {train_loss} in epoch {epoch}; "
                                       "lower its learning rate or check the features")  # fmt: skip
                val_metrics = scalar_values(score_fn(val.y, to_scores(val_logits[h], task_type).numpy()))
                train_metrics = scalar_values(score_fn(train.y[perm.numpy()], to_scores(train_logits[h], task_type).numpy()))
                score = lookup_metric(val_metrics, primary, "primary metric")
                if math.isnan(score):
                    raise FmprobeError(f"validation {primary} is NaN in epoch {epoch}; the validation split "
                                       "probably lacks a class — fix the split")  # fmt: skip
                curves[h].append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lrs[h],
                                  **{f"val_{k}": v for k, v in val_metrics.items()},
                                  f"train_{primary}": lookup_metric(train_metrics, primary, "primary metric")})  # fmt: skip
                if not best_state[h] or improved(score, best_score[h], not higher_is_better, 0.0):
                    best_score[h], best_epoch[h], best_state[h] = score, epoch, _copy(bank.heads[h])
                stopper = stoppers[h]
                if stopper is not None and stopper.exhausted({**val_metrics, "loss": val_loss}):
                    active[h], stopped[h] = False, epoch < cfg.epochs
            if not any(active):
                break
    results = {}
    for h, m in enumerate(members):
        last = _copy(bank.heads[h])
        bank.heads[h].load_state_dict(best_state[h])
        results[m.name] = TrainResult(best_state[h], last, best_epoch[h], best_score[h], curves[h], stopped[h])
    sign = 1.0 if higher_is_better else -1.0
    best = max(results, key=lambda k: -math.inf if math.isnan(results[k].best_val_score)
               else sign * results[k].best_val_score)  # fmt: skip
    return BankResult(results, best, bank)


@torch.no_grad()
def _bank_logits(bank: HeadBank, x: torch.Tensor | np.ndarray, device: str | torch.device) -> torch.Tensor:
    bank.eval()
    idx = torch.arange(len(x))
    return torch.cat([bank(feature_batch(x, b, device)).float().cpu() for b in idx.split(EVAL_BATCH)], dim=1)


def _copy(head: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}
