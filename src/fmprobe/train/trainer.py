"""Train one probe head on cached features: AdamW, warmup + cosine, accumulation, early stopping, best/last.

The head is re-initialised from ``seed`` (``head.reset_parameters()``), so each seed is a genuinely different
run and the same seed is bitwise the same run on CPU, whatever happened to the module before. The best
checkpoint is chosen on the validation primary metric only; test data never enters here. After training the
head holds the best weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from fmprobe.config import TrainConfig
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.train.losses import as_target_tensor
from fmprobe.train.seeding import data_generator, seeded

# Early-stopping metrics (other than the primary, whose direction the caller gives) where lower is better.
LOWER_IS_BETTER = frozenset({"loss", "mae", "rmse"})
TASK_TYPES = ("binary", "multiclass", "multilabel", "regression")


class HeadData(NamedTuple):
    """Features ([N, D] pooled or [N, Ntok, D] tokens; fp16 or memmap-backed arrays are cast per batch) and targets."""

    x: torch.Tensor | np.ndarray
    y: np.ndarray


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    last_state: dict[str, torch.Tensor]
    best_epoch: int  # 1-based, as in curves
    best_val_score: float
    curves: list[dict[str, float]]  # one row per epoch
    stopped_early: bool


EVAL_BATCH = 512  # no gradients at evaluation: larger batches, fewer Python round trips


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup to base_lr, then cosine to zero.

    Warmup step s uses base_lr * (s + 1) / warmup_steps, so the first update is not wasted at lr 0.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def predict(head: nn.Module, x: torch.Tensor | np.ndarray, task_type: str, batch_size: int) -> np.ndarray:
    """Scores in the shared convention.

    binary [N] P(positive); multiclass [N, K] softmax; multilabel [N, C] sigmoid; regression [N, C] values.
    """
    return to_scores(_logits(head, x, max(batch_size, EVAL_BATCH)), task_type).numpy()


def train_head(
    head: nn.Module,
    train: HeadData,
    val: HeadData,
    *,
    task_type: str,
    loss: nn.Module,
    cfg: TrainConfig,
    seed: int,
    score_fn: Callable[[np.ndarray, np.ndarray], dict[str, Any]],
    primary: str,
    higher_is_better: bool = True,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Fit ``head`` on ``train``, select on ``val`` with ``score_fn(y_true, scores)[primary]``."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"train.warmup_epochs ({cfg.warmup_epochs}) exceeds train.epochs ({cfg.epochs})")
    y_train = _targets(train, task_type, "train")
    y_val = _targets(val, task_type, "val")
    n_batches = math.ceil(len(y_train) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    stopper = EarlyStopper.from_config(cfg, primary, higher_is_better)

    head.to(device)
    loss.to(device)
    curves: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] = {}
    best_score, best_epoch, stopped = math.nan, 0, False
    with seeded(seed, device):
        if not hasattr(head, "reset_parameters"):
            raise TypeError(f"{type(head).__name__} needs reset_parameters() so each seed starts from its own init")
        head.reset_parameters()
        optimizer = torch.optim.AdamW(_param_groups(head, cfg.weight_decay), lr=cfg.lr, foreach=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, base_lr=1.0, warmup_steps=warmup, total_steps=total)
        )
        order = data_generator(seed)
        for epoch in range(1, cfg.epochs + 1):
            train_loss, lr, train_logits, seen = _train_epoch(
                head, train.x, y_train, loss, optimizer, schedule, order, cfg, device
            )
            if not math.isfinite(train_loss):
                raise FmprobeError(
                    f"training loss became {train_loss} in epoch {epoch}; lower train.lr or check the features"
                )
            val_logits = _logits(head, val.x, EVAL_BATCH)
            with torch.no_grad():
                val_loss = float(loss(val_logits.to(device), y_val.to(device)))
            val_metrics = scalar_values(score_fn(val.y, to_scores(val_logits, task_type).numpy()))
            # Running train metric: the epoch's own forward passes (no extra pass over the training set).
            train_metrics = scalar_values(score_fn(train.y[seen], to_scores(train_logits, task_type).numpy()))
            score = lookup_metric(val_metrics, primary, "primary metric")
            if math.isnan(score):
                raise FmprobeError(
                    f"validation {primary} is NaN in epoch {epoch}, so no checkpoint can be chosen; "
                    "the validation split probably lacks a class — fix the split"
                )
            curves.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "lr": lr,
                    **{f"val_{k}": v for k, v in val_metrics.items()},
                    f"train_{primary}": lookup_metric(train_metrics, primary, "primary metric"),
                }
            )
            if not best_state or improved(score, best_score, not higher_is_better, 0.0):
                best_score, best_epoch, best_state = score, epoch, _copy_state(head)
            if stopper is not None and stopper.exhausted({**val_metrics, "loss": val_loss}):
                stopped = epoch < cfg.epochs
                break
    last_state = _copy_state(head)
    head.load_state_dict(best_state)
    return TrainResult(best_state, last_state, best_epoch, best_score, curves, stopped)


def _targets(data: HeadData, task_type: str, split: str) -> torch.Tensor:
    y = as_target_tensor(data.y, task_type)
    if len(data.x) != len(y):
        raise ValueError(f"{split}: {len(data.x)} feature rows but {len(y)} targets")
    if len(y) == 0:
        raise ValueError(f"{split}: no samples")
    return y


def _param_groups(head: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only, never on biases or norm scales (1-D parameters)."""
    decay = [p for p in head.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in head.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def feature_batch(x: torch.Tensor | np.ndarray, idx: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    rows = x[idx] if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x[idx.numpy()]))
    return rows.to(device=device, dtype=torch.float32)


def _train_epoch(
    head: nn.Module,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor,
    loss: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    order: torch.Generator,
    cfg: TrainConfig,
    device: str | torch.device,
) -> tuple[float, float, torch.Tensor, np.ndarray]:
    """One pass; returns the sample-weighted mean training loss, the lr of the epoch's last update, and
    the logits seen during the pass with the sample order they came in (for the running train metric)."""
    head.train()
    perm = torch.randperm(len(y), generator=order)
    batches = perm.split(cfg.batch_size)
    total, lr = 0.0, math.nan
    seen_logits = []
    for start in range(0, len(batches), cfg.grad_accum):
        group = batches[start : start + cfg.grad_accum]
        group_size = sum(len(b) for b in group)
        optimizer.zero_grad(set_to_none=True)
        for idx in group:
            logits = head(feature_batch(x, idx, device))
            value = loss(logits, y[idx].to(device))
            seen_logits.append(logits.detach().float().cpu())
            (value * (len(idx) / group_size)).backward()  # the group's gradient = the full-batch mean's
            total += value.item() * len(idx)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
    return total / len(y), lr, torch.cat(seen_logits), perm.numpy()


@torch.no_grad()
def _logits(head: nn.Module, x: torch.Tensor | np.ndarray, batch_size: int) -> torch.Tensor:
    device = next(head.parameters()).device
    head.eval()
    idx = torch.arange(len(x))
    return torch.cat([head(feature_batch(x, b, device)).float().cpu() for b in idx.split(batch_size)])


def to_scores(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    if task_type == "binary":
        return torch.sigmoid(logits[:, 0])
    if task_type == "multiclass":
        return torch.softmax(logits, dim=1)
    if task_type == "multilabel":
        return torch.sigmoid(logits)
    return logits


def scalar_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict (drops e.g. confusion matrices)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    }


def lookup_metric(metrics: dict[str, float], name: str, what: str) -> float:
    if name not in metrics:
        raise ConfigError(f"{what} '{name}' is not among the computed metrics: {', '.join(sorted(metrics))}")
    return metrics[name]


def improved(value: float, best: float, lower: bool, min_delta: float) -> bool:
    return value < best - min_delta if lower else value > best + min_delta


class EarlyStopper:
    """Counts epochs since the watched validation metric last improved by more than min_delta."""

    def __init__(self, metric: str, lower: bool, patience: int, min_delta: float):
        self.metric, self.lower, self.patience, self.min_delta = metric, lower, patience, min_delta
        self.best, self.since_best = math.nan, 0

    @classmethod
    def from_config(cls, cfg: TrainConfig, primary: str, higher_is_better: bool) -> EarlyStopper | None:
        es = cfg.early_stopping
        if es is None:
            return None
        metric = es.metric or primary
        lower = (not higher_is_better) if metric == primary else metric in LOWER_IS_BETTER
        return cls(metric, lower, es.patience, es.min_delta)

    def exhausted(self, metrics: dict[str, float]) -> bool:
        """Record this epoch's metrics (a NaN counts as no improvement); True once patience is used up."""
        value = lookup_metric(metrics, self.metric, "train.early_stopping.metric")
        if not math.isnan(value) and (math.isnan(self.best) or improved(value, self.best, self.lower, self.min_delta)):
            self.best, self.since_best = value, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience


def _copy_state(head: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}
