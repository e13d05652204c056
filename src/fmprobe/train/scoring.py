"""What a model's outputs mean for a task, and how the training loop scores them on validation.

Scores follow one convention everywhere: binary ``[N]`` P(positive); multiclass ``[N, K]`` softmax; multilabel
``[N, C]`` sigmoid; regression ``[N, C]`` values. Stacked over members they gain a leading ``[H]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fmprobe.train.losses import as_target_tensor, separate_losses

TASK_TYPES = ("binary", "multiclass", "multilabel", "regression")
StackedMetric = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]  # (y, scores [H, N, ...]) -> {m: [H]}


def to_scores(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    """Logits ``[..., N, out]`` -> scores in the task's convention (leading dims kept)."""
    if task_type == "binary":
        return torch.sigmoid(logits[..., 0])
    if task_type == "multiclass":
        return torch.softmax(logits, dim=-1)
    if task_type == "multilabel":
        return torch.sigmoid(logits)
    return logits


def member_scores(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    """Logits ``[H, N, out]`` -> scores ``[H, N, ...]``, each member's on its own: a vectorised kernel rounds the
    tail of a tensor differently, so a member's scores are bit for bit the same in any bank and alone."""
    return torch.stack([to_scores(member, task_type) for member in logits])


def as_logits(scores: torch.Tensor, task_type: str) -> torch.Tensor:
    """Logits whose scores are ``scores`` (the loss of an averaged prediction, e.g. test-time augmentation)."""
    eps = 1e-7
    if task_type == "binary":
        return torch.logit(scores.clamp(eps, 1 - eps)).unsqueeze(-1)
    if task_type == "multilabel":
        return torch.logit(scores.clamp(eps, 1 - eps))
    if task_type == "multiclass":
        return scores.clamp_min(eps).log()
    return scores


def scalar_values(metrics: dict) -> dict[str, float]:
    """The scalar entries of a metrics dict (drops e.g. confusion matrices)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    }


def each_member(score_fn: Callable[[np.ndarray, np.ndarray], dict]) -> StackedMetric:
    """A per-model metric function (``(y, scores) -> {metric: value}``) applied to every member's scores."""

    def stacked(y: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
        rows = [scalar_values(score_fn(y, s)) for s in scores]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}

    return stacked


class TaskScorer:
    """Validation scoring of a task's members: the loss and every metric, per member.

    ``metric(y, scores [H, N, ...])`` works in the task's units; ``shift``/``scale`` map fitted targets and
    outputs back to them (regression heads fit standardised targets)."""

    train_metric = True

    def __init__(self, task_type: str, loss: nn.Module, metric: StackedMetric, *, primary: str,
                 lower_is_better: bool, shift: np.ndarray | float = 0.0, scale: np.ndarray | float = 1.0,
                 device: str | torch.device = "cpu"):  # fmt: skip
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        self.task_type, self.loss, self.metric, self.device = task_type, loss, metric, device
        self.primary, self.lower_is_better = primary, lower_is_better
        self.shift, self.scale = shift, scale

    def to_units(self, values: np.ndarray) -> np.ndarray:
        return values * self.scale + self.shift

    @torch.no_grad()
    def __call__(self, y: np.ndarray, outputs: torch.Tensor, kind: str, *, loss: bool = True
                 ) -> dict[str, np.ndarray]:  # fmt: skip
        scores = member_scores(outputs, self.task_type) if kind == "logits" else outputs
        values = self.metric(self.to_units(y), self.to_units(scores.float().cpu().numpy()))
        if not loss:
            return values
        logits = outputs if kind == "logits" else as_logits(outputs, self.task_type)
        target = as_target_tensor(y, self.task_type).to(self.device)
        losses = separate_losses(self.loss, logits.to(self.device), target).double().cpu().numpy()  # as for scores
        return {"loss": losses, **values}
