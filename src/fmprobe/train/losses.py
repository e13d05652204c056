"""Losses for probe heads, with class and positive weights computed from the training targets.

``type: auto`` picks CE (multiclass), BCE-with-logits (binary, multilabel) or MSE (regression).
Weighting, recorded in ``info`` so the run writes what was actually used:

- multiclass ``class_weights``: one weight per class; "balanced" is sklearn's n / (K * n_k). CE uses it as
  ``weight`` (weighted mean); softmax focal uses it as the per-class alpha (same weighted mean).
- binary / multilabel ``class_weights``: every element's loss is multiplied by w_pos[label] if its target is 1,
  else w_neg[label]. "balanced" is sklearn's "balanced" applied to each label on its own
  (w_pos = n / (2 n_pos), w_neg = n / (2 n_neg)), so both sides of every label weigh the same in total.
  An explicit list is [w_negative, w_positive] for binary, or one weight per label for multilabel
  (scaling that label's whole loss).
- ``pos_weight`` (BCE and sigmoid focal only): multiplies the positive term; "auto" is n_neg / n_pos per label.
  When both are set the weights multiply.
- ``label_smoothing``: torch's for CE; BCE targets become y * (1 - s) + s / 2.
- regression with ``task.missing_targets: mask``: MSE / Huber over the target cells that hold a value
  (:class:`ObservedLoss`), so each target trains on its own rows.

A key that does not apply to the task or loss type (e.g. class_weights on regression) raises ConfigError
naming the key rather than being ignored. Non-default ``focal_*`` / ``huber_delta`` count as set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from fmprobe.config import LossConfig, TaskConfig, unused_loss_keys
from fmprobe.errors import ConfigError

_AUTO = {"multiclass": "ce", "binary": "bce", "multilabel": "bce", "regression": "mse"}
_VALID_TASKS = {
    "ce": ("multiclass",),
    "bce": ("binary", "multilabel"),
    "focal": ("binary", "multilabel", "multiclass"),
    "mse": ("regression",),
    "huber": ("regression",),
}


class SigmoidLoss(nn.Module):
    """BCE-with-logits, or sigmoid focal loss when ``gamma`` is given; mean over all elements.

    Binary targets [B] are matched to logits [B, 1].
    """

    def __init__(
        self,
        *,
        gamma: float | None = None,
        alpha: float | None = None,
        pos_weight: torch.Tensor | None = None,
        neg_w: torch.Tensor | None = None,
        pos_w: torch.Tensor | None = None,
        smoothing: float = 0.0,
    ):
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.smoothing = smoothing
        self.register_buffer("pos_weight", pos_weight)
        self.register_buffer("neg_w", neg_w)
        self.register_buffer("pos_w", pos_w)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.elementwise(logits, y).mean()

    def elementwise(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-element losses of logits ``[..., B, C]`` (leading dims: members sharing the targets)."""
        if y.ndim == 1:
            y = y.unsqueeze(1)
        if y.shape != logits.shape[-2:]:
            raise ValueError(f"targets of shape {tuple(y.shape)} do not match logits of shape {tuple(logits.shape)}")
        y = y.expand_as(logits)
        target = y * (1 - self.smoothing) + self.smoothing / 2 if self.smoothing else y
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight, reduction="none")
        if self.gamma is not None:
            p = torch.sigmoid(logits)
            p_t = p * y + (1 - p) * (1 - y)
            loss = loss * (1 - p_t) ** self.gamma
            if self.alpha is not None:
                loss = loss * (self.alpha * y + (1 - self.alpha) * (1 - y))
        if self.pos_w is not None:
            loss = loss * (y * self.pos_w + (1 - y) * self.neg_w)
        return loss


class SoftmaxFocalLoss(nn.Module):
    """Multiclass focal loss -w_y (1 - p_y)^gamma log p_y, weighted mean like torch's weighted CE."""

    def __init__(self, *, gamma: float, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.elementwise(logits, y)
        if self.weight is None:
            return loss.mean()
        w = self.weight[y]
        return (loss * w).sum() / w.sum()

    def elementwise(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Unweighted per-sample losses of logits ``[..., B, K]`` (leading dims: members sharing the targets)."""
        index = y.expand(*logits.shape[:-1]).unsqueeze(-1)
        logp = F.log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)
        return -((1 - logp.exp()) ** self.gamma) * logp


class ObservedLoss(nn.Module):
    """MSE or Huber over the regression target cells that hold a value (NaN: none, ``task.missing_targets: mask``),
    averaged over those cells: each target learns from its own rows. Equal to ``nn.MSELoss`` / ``nn.HuberLoss``
    when nothing is missing (tested)."""

    def __init__(self, kind: str, *, delta: float = 1.0):
        super().__init__()
        if kind not in ("mse", "huber"):
            raise ValueError(f"ObservedLoss takes mse or huber, got {kind!r}")
        self.kind, self.delta = kind, delta

    def forward(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        values, observed = self.elementwise(outputs, y)
        return values.sum() / observed.sum().clamp_min(1)

    def elementwise(self, outputs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell losses of outputs ``[..., B, C]`` (0 where the target is missing) and the observed cells
        ``[B, C]``; no gradient reaches an output whose target is missing."""
        observed = ~torch.isnan(y)
        target = torch.where(observed, y, torch.zeros_like(y)).expand_as(outputs)
        if self.kind == "mse":
            values = F.mse_loss(outputs, target, reduction="none")
        else:
            values = F.huber_loss(outputs, target, reduction="none", delta=self.delta)
        return values * observed, observed


def separate_losses(loss: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's loss ``[H]`` from its own call of the loss module on its outputs ``[H, B, ...]``: bit for bit
    the loss of its run alone (a vectorised call rounds differently)."""
    return torch.stack([loss(member, y) for member in logits])


def member_losses(loss: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's loss ``[H]`` on outputs ``[H, B, ...]`` against the targets ``y`` they share.

    One member: the loss module itself (the exact value a single model trains on). Several: one vectorised call
    with each loss's own normalisation (a mean over elements; the class-weighted mean of weighted CE and focal),
    equal to calling the module on each member (tested for every loss ``build_loss`` makes)."""
    if len(logits) == 1:
        return loss(logits[0], y)[None]
    n = len(logits)
    if isinstance(loss, SigmoidLoss):
        return loss.elementwise(logits, y).flatten(1).mean(1)
    if isinstance(loss, SoftmaxFocalLoss):
        values = loss.elementwise(logits, y)
        if loss.weight is None:
            return values.mean(1)
        w = loss.weight[y]
        return (values * w).sum(1) / w.sum()
    if isinstance(loss, nn.CrossEntropyLoss):
        values = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(n), weight=loss.weight,
                                 label_smoothing=loss.label_smoothing, reduction="none").view(n, -1)  # fmt: skip
        return values.mean(1) if loss.weight is None else values.sum(1) / loss.weight[y].sum()
    if isinstance(loss, ObservedLoss):
        values, observed = loss.elementwise(logits, y)
        return values.flatten(1).sum(1) / observed.sum().clamp_min(1)
    if isinstance(loss, nn.MSELoss):
        return F.mse_loss(logits, y.expand_as(logits), reduction="none").flatten(1).mean(1)
    if isinstance(loss, nn.HuberLoss):
        return F.huber_loss(logits, y.expand_as(logits), reduction="none", delta=loss.delta).flatten(1).mean(1)
    raise TypeError(f"member_losses does not know the loss {type(loss).__name__}")


def element_weights(loss: nn.Module, y: np.ndarray) -> np.ndarray:
    """The weight ``loss`` gives each target, for fits that take sample weights in a sum of losses (scikit-learn's
    ``class_weight``): ``[N]`` per sample for cross-entropy (its class's weight), ``[N, C]`` per element for the
    sigmoid losses (class weights, times ``pos_weight`` on positives); ones where nothing is weighted."""
    y = np.asarray(y)
    if isinstance(loss, nn.CrossEntropyLoss):
        if loss.weight is None:
            return np.ones(len(y))
        return loss.weight.double().numpy()[y.astype(np.int64)]
    if isinstance(loss, SigmoidLoss):
        y2 = y.reshape(len(y), -1).astype(np.float64)
        w = np.ones_like(y2)
        if loss.pos_w is not None:
            w = y2 * loss.pos_w.double().numpy() + (1 - y2) * loss.neg_w.double().numpy()
        if loss.pos_weight is not None:
            w = w * np.where(y2 == 1, loss.pos_weight.double().numpy(), 1.0)
        return w
    raise TypeError(f"element_weights does not know the loss {type(loss).__name__}")


def as_target_tensor(y: np.ndarray, task_type: str) -> torch.Tensor:
    """Targets in the shared convention -> the tensor the losses take (long class indices or float32)."""
    y = np.asarray(y)
    if task_type == "multiclass":
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"multiclass targets must be int class indices [N], got {y.dtype} {y.shape}")
        return torch.tensor(y, dtype=torch.long)  # a copy: the caller's array may be read-only
    expected = 1 if task_type == "binary" else 2
    if y.ndim != expected:
        shape = "[N]" if expected == 1 else "[N, C]"
        raise ValueError(f"{task_type} targets must have shape {shape}, got {y.shape}")
    return torch.tensor(y, dtype=torch.float32)


def build_loss(
    cfg: LossConfig, task: TaskConfig, y_train: np.ndarray, *, num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The loss module for ``task`` and a dict of what was computed (type, weights as lists).

    ``num_classes`` (multiclass) defaults to ``len(task.class_names)``; it is needed only for class weights.
    """
    kind = _AUTO[task.type] if cfg.type == "auto" else cfg.type
    _check_applicable(cfg, kind, task.type)
    info: dict[str, Any] = {"type": kind, "class_weights": None, "pos_weight": None}
    if kind == "huber":
        info["huber_delta"] = cfg.huber_delta
    if task.missing_targets == "mask":  # regression only (config): each target on the rows that have it
        info["missing_targets"] = "masked: the mean over the target cells that hold a value"
        return ObservedLoss(kind, delta=cfg.huber_delta), info
    if kind == "mse":
        return nn.MSELoss(), info
    if kind == "huber":
        return nn.HuberLoss(delta=cfg.huber_delta), info
    y = np.asarray(y_train)
    if task.type == "multiclass":
        weight = _multiclass_weights(cfg.class_weights, task, y, num_classes)
        info["class_weights"] = None if weight is None else weight.tolist()
        w = _tensor(weight)
        if kind == "ce":
            info["label_smoothing"] = cfg.label_smoothing
            return nn.CrossEntropyLoss(weight=w, label_smoothing=cfg.label_smoothing), info
        info.update(focal_gamma=cfg.focal_gamma, focal_alpha="class_weights")
        return SoftmaxFocalLoss(gamma=cfg.focal_gamma, weight=w), info
    y2 = y.reshape(len(y), -1).astype(np.float64)
    names = _label_names(task, y2)
    weights = _label_weights(cfg.class_weights, y2, names, task.type)
    pos_weight = _pos_weight(cfg.pos_weight, y2, names)
    if weights is not None:
        info["class_weights"] = {"negative": weights[0].tolist(), "positive": weights[1].tolist()}
    if pos_weight is not None:
        info["pos_weight"] = pos_weight.tolist()
    common = dict(
        pos_weight=_tensor(pos_weight),
        neg_w=None if weights is None else _tensor(weights[0]),
        pos_w=None if weights is None else _tensor(weights[1]),
    )
    if kind == "bce":
        info["label_smoothing"] = cfg.label_smoothing
        return SigmoidLoss(smoothing=cfg.label_smoothing, **common), info
    info.update(focal_gamma=cfg.focal_gamma, focal_alpha=cfg.focal_alpha)
    return SigmoidLoss(gamma=cfg.focal_gamma, alpha=cfg.focal_alpha, **common), info


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.as_tensor(a, dtype=torch.float32)


def _is_set(cfg: LossConfig, key: str) -> bool:
    return getattr(cfg, key) != LossConfig.model_fields[key].default


def _check_applicable(cfg: LossConfig, kind: str, task_type: str) -> None:
    if task_type not in _VALID_TASKS[kind]:
        valid = [k for k, tasks in _VALID_TASKS.items() if task_type in tasks]
        raise ConfigError(
            f"loss.type '{kind}' is not valid for a {task_type} task; valid choices: auto, {', '.join(valid)}"
        )
    for key in sorted(unused_loss_keys(kind, task_type)):  # the one definition of which key applies where
        if _is_set(cfg, key):
            raise ConfigError(_NOT_APPLICABLE[key](kind, task_type))


_NOT_APPLICABLE = {  # why a set loss key does not apply, and what to do
    "class_weights": lambda kind, task: f"loss.class_weights is not valid for a {task} task; remove it",
    "pos_weight": lambda kind, task: (
        f"loss.pos_weight applies only to bce/focal on binary or multilabel tasks, not {kind} on {task}; "
        + ("use loss.class_weights for multiclass" if task == "multiclass" else "remove it")),
    "label_smoothing": lambda kind, task: f"loss.label_smoothing applies only to ce and bce losses, not {kind}; remove it",
    "huber_delta": lambda kind, task: f"loss.huber_delta applies only to the huber loss, not {kind}; remove it",
    "focal_gamma": lambda kind, task: f"loss.focal_gamma applies only to the focal loss, not {kind}; remove it",
    "focal_alpha": lambda kind, task: (
        "loss.focal_alpha applies only to sigmoid focal loss (binary/multilabel)"
        + ("; multiclass focal takes loss.class_weights as alpha" if task == "multiclass" else "") + "; remove it"),
}


def _multiclass_weights(
    spec: str | list[float], task: TaskConfig, y: np.ndarray, num_classes: int | None
) -> np.ndarray | None:
    if spec == "none":
        return None
    if num_classes is None:
        if task.class_names is None:
            raise ConfigError("loss.class_weights needs the number of classes: set task.class_names")
        num_classes = len(task.class_names)
    names = task.class_names or [str(k) for k in range(num_classes)]
    if isinstance(spec, list):
        if len(spec) != num_classes:
            raise ConfigError(
                f"loss.class_weights has {len(spec)} values; expected {num_classes}, one per class ({', '.join(names)})"
            )
        return np.asarray(spec, dtype=np.float64)
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"training targets hold class indices outside 0..{num_classes - 1}; check task.class_names")
    counts = np.bincount(y, minlength=num_classes)
    absent = [names[k] for k in np.flatnonzero(counts == 0)]
    if absent:
        raise ConfigError(
            f"loss.class_weights: balanced cannot weight class(es) {absent}: absent from the training split; "
            "give explicit weights or fix the split"
        )
    return compute_class_weight("balanced", classes=np.arange(num_classes), y=y)


def _label_names(task: TaskConfig, y2: np.ndarray) -> list[str]:
    if y2.shape[1] != len(task.targets):
        raise ValueError(f"training targets have {y2.shape[1]} columns but task.targets names {len(task.targets)}")
    return list(task.targets)


def _label_weights(
    spec: str | list[float], y2: np.ndarray, names: list[str], task_type: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-label (negative, positive) element weights."""
    if spec == "none":
        return None
    if isinstance(spec, list):
        if task_type == "binary":
            if len(spec) != 2:
                raise ConfigError(f"loss.class_weights has {len(spec)} values; expected 2 ([negative, positive])")
            return np.array([spec[0]]), np.array([spec[1]])
        if len(spec) != len(names):
            raise ConfigError(
                f"loss.class_weights has {len(spec)} values; expected {len(names)}, one per label ({', '.join(names)})"
            )
        w = np.asarray(spec, dtype=np.float64)
        return w, w.copy()
    neg, pos = [], []
    for c, name in enumerate(names):
        col = y2[:, c]
        for side, value in (("positive", 1.0), ("negative", 0.0)):
            if not np.any(col == value):
                raise ConfigError(
                    f"loss.class_weights: balanced cannot weight label '{name}': it has no {side} samples in the "
                    "training split; give explicit weights or fix the split"
                )
        w_neg, w_pos = compute_class_weight("balanced", classes=np.array([0.0, 1.0]), y=col)
        neg.append(w_neg)
        pos.append(w_pos)
    return np.array(neg), np.array(pos)


def _pos_weight(spec: str | list[float], y2: np.ndarray, names: list[str]) -> np.ndarray | None:
    if spec == "none":
        return None
    if isinstance(spec, list):
        if len(spec) != len(names):
            raise ConfigError(
                f"loss.pos_weight has {len(spec)} values; expected {len(names)}, one per label ({', '.join(names)})"
            )
        return np.asarray(spec, dtype=np.float64)
    n_pos = (y2 == 1).sum(axis=0)
    n_neg = (y2 == 0).sum(axis=0)
    for c, name in enumerate(names):
        if n_pos[c] == 0 or n_neg[c] == 0:
            side = "positive" if n_pos[c] == 0 else "negative"
            raise ConfigError(
                f"loss.pos_weight: auto cannot weight label '{name}': it has no {side} samples in the training split; "
                "give explicit weights or fix the split"
            )
    return n_neg / n_pos
