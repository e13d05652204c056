"""The one training loop of fmprobe.

``fit`` trains H members at once — H = 1 for one head; a HeadBank grid; backbone + head (+ decoder) end to end; a
segmentation decoder; a spatial probe — from three pluggable parts:

- the *members* (:class:`Members`): forward, per-member losses, the optimizer, the tensors that make up each
  member's state;
- the *batch source* (:class:`BatchSource`): the epoch's accumulation groups of batches (cached features, or
  pixels with augmentation, mixing and data parallelism) and each split's predictions;
- the *scorer* (:class:`Scorer`): validation metrics per member (a task metric stacked over members, mIoU, ...).

The loop owns what every training needs: the schedule (warmup + cosine per parameter group), gradient
accumulation (each batch's mean loss weighted by its share of the group, so a group's gradient is the full
batch's), mixed precision with a gradient scaler, per-member early stopping (a stopped member's learning rate is
0 while the others go on) and best state (each member's best validation epoch; test never enters), and the
curves. It never touches the random state: callers run it inside ``train.seeding.seeded`` (dropout draws) and
sources draw their order from their own generator. After ``fit`` every member holds its best weights.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.metrics import lower_is_better
from fmprobe.train.optim import ScheduledOptimizer
from fmprobe.train.stopping import EarlyStopping, improved, lookup

StateSlot = tuple[torch.Tensor, "int | Sequence[int]"]  # a state tensor and its member (or one per dim-0 entry)


@dataclass
class Batch:
    """One micro-batch as the members and the loop see it."""

    inputs: Any  # what ``Members.forward`` takes
    targets: torch.Tensor  # what the loss takes (mixed soft targets with mixup)
    index: torch.Tensor  # rows of the training split, for the running train metric
    weight: float  # factor of the batch's mean loss in the backward pass (its share of the group)
    count: float  # factor of the batch's loss in the epoch's training loss (its samples)
    real: int  # leading rows that are real samples (0 for a data-parallel placeholder)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. segmentation masks


class Members(Protocol):
    names: list[str]
    optimizer: ScheduledOptimizer

    def start_epoch(self, epoch: int) -> None:
        """Before each epoch's training (e.g. unfreezing at an epoch)."""

    def train(self, mode: bool = True) -> Any: ...

    def forward(self, batch: Batch) -> torch.Tensor:
        """Training outputs ``[H, b, ...]`` of every member."""

    def predict(self, inputs: Any) -> torch.Tensor:
        """Eval outputs ``[H, b, ...]`` (what the scorer reads; e.g. labels instead of per-pixel logits)."""

    def losses(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The scalar to minimise (the sum of the members' losses, auxiliary terms included) and each member's
        loss to report ``[H]``."""

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward (data parallel: reduce on the group's last)."""

    def state(self) -> list[StateSlot]:
        """The tensors a member's checkpoint holds, with their owners."""

    def member_states(self, tensors: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Per member, its state dict from ``tensors`` (a snapshot in ``state()`` order)."""

    def epoch_columns(self) -> dict[str, float]:
        """Extra curve columns of the epoch just trained (e.g. an auxiliary loss)."""


class BatchSource(Protocol):
    steps_per_epoch: int

    def groups(self, epoch: int) -> Iterator[list[Batch]]:
        """The epoch's accumulation groups, in training order."""

    def targets(self, split: str) -> np.ndarray:
        """Fit-space targets of a split (``train``: indexed by ``Batch.index``)."""

    def predict(self, members: Members, split: str) -> tuple[torch.Tensor, str]:
        """Every member's outputs ``[H, N, ...]`` on a split in eval mode, and their kind (logits or scores)."""

    def gather(self, loss_sum: np.ndarray, seen: int, outputs: list[torch.Tensor], index: list[torch.Tensor]
               ) -> tuple[np.ndarray, int, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        """The epoch's training record of every process (data parallel); unchanged for one process."""


class Scorer(Protocol):
    primary: str
    lower_is_better: bool
    train_metric: bool  # also score the epoch's own training outputs (``train_<primary>`` in the curves)

    def __call__(self, y: np.ndarray, outputs: torch.Tensor, kind: str, *, loss: bool = True
                 ) -> dict[str, np.ndarray]:  # fmt: skip
        """``{metric: [H]}`` of outputs ``[H, N, ...]`` (``loss`` among them when it can be computed).
        ``loss=False`` is asked only of scorers with ``train_metric``, for the epoch's training outputs, whose
        loss the epoch already reported."""


@dataclass(frozen=True)
class StopRule:
    metric: str  # a validation metric, or ``loss``
    patience: int
    min_delta: float = 0.0


@dataclass(frozen=True)
class EpochReport:
    """What ``FitPlan.on_epoch`` hears after every epoch (progress displays, time estimates)."""

    epoch: int  # 1-based, as numbered in the curves
    epochs: int  # the most this fit will train
    names: list[str]
    trained: np.ndarray  # bool [H]: the members that trained this epoch
    columns: dict[str, np.ndarray]  # this epoch's curve columns, for the members that trained
    best_score: np.ndarray  # [H] best validation primary so far (NaN without a scorer)
    seconds: float  # wall time of the epoch, validation included


@dataclass(frozen=True)
class FitPlan:
    epochs: int
    stopping: StopRule | None = None
    epoch_offset: int = 0  # numbering of the curves' epochs (a second stage continues the first)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scaler: Any = None  # torch.amp.GradScaler for fp16
    on_epoch: Callable[[EpochReport], None] | None = None


@dataclass
class Fit:
    """One member's training: its checkpoints, what was selected and its curves."""

    best_state: dict[str, torch.Tensor]
    last_state: dict[str, torch.Tensor]
    best_epoch: int  # as numbered in the curves (1-based, plus the plan's offset)
    best_val_score: float  # NaN without a scorer
    curves: list[dict[str, float]]  # one row per epoch the member trained in
    stopped_early: bool
    last_epoch: int  # the last epoch the plan allowed, numbered as best_epoch: best == last may not have converged


@dataclass
class FitResult:
    fits: list[Fit]  # in member order
    names: list[str]
    best: int  # the member with the best validation score

    def __getitem__(self, name: str) -> Fit:
        return self.fits[self.names.index(name)]


def fit(members: Members, source: BatchSource, scorer: Scorer | None, plan: FitPlan) -> FitResult:
    """Train every member for ``plan.epochs`` epochs (fewer when all stopped early); see the module docstring."""
    n = len(members.names)
    total = plan.epochs * source.steps_per_epoch
    stopper = None
    if plan.stopping is not None:
        if scorer is None:
            raise FmprobeError("early stopping needs a validation scorer")
        rule = plan.stopping
        lower = scorer.lower_is_better if rule.metric == scorer.primary else lower_is_better(rule.metric)
        stopper = EarlyStopping(rule.metric, lower, rule.patience, rule.min_delta, n)
    active, stopped = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    best = _snapshot(members)
    best_score, best_epoch = np.full(n, np.nan), np.zeros(n, dtype=np.int64)
    epochs: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []  # (members trained in the epoch, curve columns)
    step = 0
    y_train = source.targets("train") if scorer is not None and scorer.train_metric else None
    for epoch in range(1, plan.epochs + 1):
        started = time.perf_counter()
        trained = active.copy()
        loss_sum, seen, lrs, outputs, index, step = _train_epoch(members, source, plan, epoch, y_train is not None,
                                                                 active, step, total)  # fmt: skip
        loss_sum, seen, outputs, index = source.gather(loss_sum, seen, outputs, index)
        train_loss = loss_sum / max(seen, 1)
        bad = np.flatnonzero(trained & ~np.isfinite(train_loss))
        if bad.size:
            raise FmprobeError(f"{_who(members, bad[0])}training loss became {train_loss[bad[0]]} in epoch {epoch}; "
                               "lower the learning rate or check the inputs")  # fmt: skip
        rows = np.flatnonzero(trained)
        columns: dict[str, np.ndarray] = {"epoch": np.full(len(rows), float(plan.epoch_offset + epoch)),
                                          "train_loss": train_loss[rows]}  # fmt: skip
        if scorer is None:
            columns["lr"] = lrs[rows]
            better = trained
        else:
            val_out, kind = source.predict(members, "val")
            val = scorer(source.targets("val"), val_out[torch.from_numpy(rows)], kind)
            score = _expand(lookup(val, scorer.primary, "primary metric"), trained)
            if np.isnan(score[rows]).any():
                raise FmprobeError(f"validation {scorer.primary} is NaN in epoch {epoch}, so no checkpoint can be "
                                   "chosen; the validation split probably lacks a class — fix the split")  # fmt: skip
            if "loss" in val:
                columns["val_loss"] = val["loss"]
            columns["lr"] = lrs[rows]
            columns.update({f"val_{k}": v for k, v in val.items() if k != "loss"})
            if y_train is not None:
                train_out = torch.cat(outputs, dim=1)[torch.from_numpy(rows)]
                metrics = scorer(y_train[torch.cat(index).numpy()], train_out, "logits", loss=False)
                columns[f"train_{scorer.primary}"] = lookup(metrics, scorer.primary, "primary metric")
            better = trained & ((best_epoch == 0) | improved(score, best_score, scorer.lower_is_better, 0.0))
            best_score[better] = score[better]
            if stopper is not None:
                done = stopper.update({k: _expand(v, trained) for k, v in val.items()}, trained)
                active &= ~done
                stopped |= done & (epoch < plan.epochs)
        _update_snapshot(best, members, better)
        best_epoch[better] = plan.epoch_offset + epoch
        columns.update({k: np.full(len(rows), v) for k, v in members.epoch_columns().items()})
        epochs.append((trained, columns))
        if plan.on_epoch is not None:
            plan.on_epoch(EpochReport(plan.epoch_offset + epoch, plan.epoch_offset + plan.epochs, list(members.names),
                                      trained, columns, best_score.copy(), time.perf_counter() - started))
        if not active.any():
            break
    last = members.member_states([t for t, _ in members.state()])
    best_states = members.member_states(best)
    _restore(best, members)
    curves = _curves(epochs, n)
    fits = [Fit(best_states[h], last[h], int(best_epoch[h]), float(best_score[h]), curves[h], bool(stopped[h]),
                plan.epoch_offset + plan.epochs) for h in range(n)]  # fmt: skip
    pick = best_score if scorer is None or not scorer.lower_is_better else -best_score
    chosen = int(np.argmax(np.where(np.isnan(pick), -np.inf, pick)))
    return FitResult(fits, list(members.names), chosen)


def _train_epoch(members: Members, source: BatchSource, plan: FitPlan, epoch: int, keep: bool, active: np.ndarray,
                 step: int, total: int) -> tuple[np.ndarray, int, np.ndarray, list[torch.Tensor], list[torch.Tensor], int]:  # fmt: skip
    """One pass over the source's groups: the summed (count-weighted) reported losses, the samples seen, the last
    step's learning rates, the kept training outputs with their rows, and the next step."""
    n = len(members.names)
    members.start_epoch(epoch)
    members.train(True)
    reports: list[torch.Tensor] = []
    counts: list[float] = []
    seen, lrs = 0, np.full(n, np.nan)
    outputs: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    for group in source.groups(epoch):
        lrs = members.optimizer.set_lrs(step, total, active)
        members.optimizer.zero_grad()
        for i, batch in enumerate(group):
            with members.sync(last=i == len(group) - 1):
                with plan.autocast():
                    out = members.forward(batch)
                    objective, report = members.losses(out, batch)
                if batch.weight != 1.0:  # the group's gradient = the full batch mean's
                    objective = objective * batch.weight
                (objective if plan.scaler is None else plan.scaler.scale(objective)).backward()
            reports.append(report.detach())
            counts.append(batch.count)
            seen += batch.real
            if keep:
                kept, rows = out.detach(), batch.index
                if batch.real != kept.shape[1]:  # padded rows of a data-parallel placeholder
                    kept, rows = kept[:, : batch.real], rows[: batch.real]
                outputs.append(kept.float().cpu())
                index.append(rows)
        if group:
            members.optimizer.step(plan.scaler)
        step += 1
    loss_sum = np.zeros(n)
    if reports:
        loss_sum = (torch.stack(reports).double().cpu() * torch.tensor(counts, dtype=torch.float64)[:, None]).sum(0)
        loss_sum = loss_sum.numpy()
    return loss_sum, seen, lrs, outputs, index, step


def _who(members: Members, h: int) -> str:
    return f"{members.names[h]}: " if len(members.names) > 1 else ""


def _expand(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Values of the members where ``rows`` (bool [H]) is true -> an array over all members (NaN elsewhere)."""
    out = np.full(len(rows), np.nan)
    out[rows] = values
    return out


def _snapshot(members: Members) -> list[torch.Tensor]:
    return [t.detach().clone() for t, _ in members.state()]


@torch.no_grad()
def _update_snapshot(snap: list[torch.Tensor], members: Members, which: np.ndarray) -> None:
    """Overwrite the saved state of the members where ``which`` (bool [H]) is true with their current state."""
    if not which.any():
        return
    keep = torch.from_numpy(which)
    for saved, (current, owner) in zip(snap, members.state()):
        if isinstance(owner, int):
            if which[owner]:
                saved.copy_(current)
        else:
            mask = keep[torch.as_tensor(owner)].to(saved.device)
            saved[mask] = current[mask]


@torch.no_grad()
def _restore(snap: list[torch.Tensor], members: Members) -> None:
    for saved, (current, _) in zip(snap, members.state()):
        current.copy_(saved)


def _curves(epochs: list[tuple[np.ndarray, dict[str, np.ndarray]]], n: int) -> list[list[dict[str, float]]]:
    """One row per epoch a member trained in."""
    curves: list[list[dict[str, float]]] = [[] for _ in range(n)]
    for trained, columns in epochs:
        for j, h in enumerate(np.flatnonzero(trained)):
            row = {k: float(v[j]) for k, v in columns.items()}
            row["epoch"] = int(row["epoch"])
            curves[h].append(row)
    return curves
