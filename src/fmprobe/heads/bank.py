"""HeadBank: a grid of probe heads (head type x learning rate x weight decay) trained together from one pass over
cached features, each head with its own learning rate and weight decay, the best chosen on validation (after
dinov2's ``eval/linear.py`` AllClassifiers).

Every head sees the same batches in the same order as a separate ``train_head`` run with the same seed, starts
from the same initialisation (each head is reset under the seed on its own) and follows the same warmup + cosine
schedule at its own learning rate. Per step and per epoch the work is a fixed number of calls whatever the
number of heads: linear heads are one stacked weight tensor (one matmul), MLP heads of one width likewise, the
loss of every head is one ``vmap``-ed call, the optimizer updates each stacked tensor with per-head learning
rates in one go, and validation scores all heads with one forward and one metric call
(:meth:`TaskMetric.stacked`). Early stopping and the best-checkpoint choice are vectors over heads; a head whose
patience is exhausted stops updating (learning rate 0) while the others go on. Differences from separate runs:
float rounding of the fused kernels, dropout masks drawn from one shared stream, and ``train_loss`` in the
curves is the loss over the epoch's training predictions (equal to the per-batch mean for unweighted losses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmprobe.config import HeadConfig, TrainConfig
from fmprobe.errors import ConfigError, FmprobeError
from fmprobe.heads import build_head
from fmprobe.heads.linear import LinearHead, check_pooled
from fmprobe.heads.mlp import MLPHead
from fmprobe.train.losses import as_target_tensor
from fmprobe.train.seeding import data_generator, seeded
from fmprobe.train.trainer import (
    EVAL_BATCH, LOWER_IS_BETTER, TASK_TYPES, HeadData, TrainResult, feature_batch, lr_at, to_scores,
)  # fmt: skip

StackedScoreFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


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
    return [BankMember(member_name(h.name, lr, wd), h, lr, wd) for h in heads for lr in lrs for wd in weight_decays]


def member_name(head: str, lr: float, weight_decay: float) -> str:
    return f"{head}/lr{lr:g}/wd{weight_decay:g}"


class _Stacked(nn.Module):
    """Heads of one architecture as stacked tensors: entry j along dim 0 of every tensor is head ``rows[j]``."""

    def __init__(self, heads: list[nn.Module], rows: list[int]):
        super().__init__()
        self.rows = rows
        self.keys = list(heads[0].state_dict())
        self.tensors = nn.ParameterList(nn.Parameter(torch.stack([h.state_dict()[k] for h in heads]).detach().clone())
                                        for k in self.keys)  # fmt: skip
        self.register_buffer("p", torch.tensor([float(h.dropout.p) for h in heads]), persistent=False)
        self.any_dropout = bool(self.p.any())

    @torch.no_grad()
    def pack(self, heads: Sequence[nn.Module]) -> None:
        for key, t in zip(self.keys, self.tensors):
            t.copy_(torch.stack([heads[i].state_dict()[key] for i in self.rows]))

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout with each head's own rate along dim 0 (no-op in eval mode or at rate 0)."""
        if not self.training or not self.any_dropout:
            return x
        p = self.p.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return x * (torch.rand_like(x) >= p).to(x.dtype) / (1 - p)


class _StackedLinear(_Stacked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.tensors  # [L, O, D], [L, O]
        n, out = w.shape[:2]
        if self.training and self.any_dropout:  # each head its own input dropout mask
            return torch.baddbmm(b[:, None], self.drop(x.expand(n, *x.shape)), w.transpose(1, 2))
        return torch.addmm(b.reshape(-1), x, w.reshape(n * out, -1).t()).view(len(x), n, out).transpose(0, 1)


class _StackedMLP(_Stacked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = self.tensors  # [M, K, D], [M, K], [M, O, K], [M, O]
        m, k = w1.shape[:2]
        hidden = torch.addmm(b1.reshape(-1), x, w1.reshape(m * k, -1).t()).view(len(x), m, k).transpose(0, 1)
        return torch.baddbmm(b2[:, None], self.drop(F.gelu(hidden)), w2.transpose(1, 2))


class HeadBank(nn.Module):
    """``forward(x [B, ...]) -> logits [H, B, out_dim]`` for the H member heads.

    ``heads[i]`` is member i as its own module (built by ``build_head``); linear heads, and MLP heads of one
    width, are trained as stacked tensors (``pack`` copies the modules in, ``member_states`` copies states out).
    """

    def __init__(self, members: list[BankMember], in_dim: int, out_dim: int):
        super().__init__()
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"HeadBank members need distinct names, got {names}")
        self.members = members
        self.heads = nn.ModuleList(build_head(m.head, in_dim, out_dim) for m in members)
        linear = [i for i, h in enumerate(self.heads) if isinstance(h, LinearHead)]
        widths: dict[int, list[int]] = {}
        for i, h in enumerate(self.heads):
            if isinstance(h, MLPHead):
                widths.setdefault(h.fc1.out_features, []).append(i)
        stacks: list[_Stacked] = [_StackedLinear([self.heads[i] for i in linear], linear)] if linear else []
        stacks += [_StackedMLP([self.heads[i] for i in rows], rows) for rows in widths.values()]
        self.stacks = nn.ModuleList(stacks)
        fused = {i for s in stacks for i in s.rows}
        self.others = [i for i in range(len(members)) if i not in fused]
        order = [i for s in stacks for i in s.rows] + self.others
        self.register_buffer("order", torch.argsort(torch.tensor(order)), persistent=False)
        self.identity_order = order == sorted(order)

    def reset_parameters(self, seed: int) -> None:
        """Each head initialised as a separate run with ``seed`` would initialise it."""
        for head in self.heads:
            with seeded(seed, next(head.parameters()).device):
                head.reset_parameters()
        self.pack()

    def pack(self) -> None:
        for s in self.stacks:
            s.pack(self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacks:
            check_pooled(x, "linear/mlp")
        out = [s(x) for s in self.stacks] + [self.heads[i](x)[None] for i in self.others]
        logits = out[0] if len(out) == 1 else torch.cat(out)
        return logits if self.identity_order else logits.index_select(0, self.order)

    def optimizer_slots(self) -> list[tuple[nn.Parameter, int | list[int], bool]]:
        """(tensor, owning head or one head per dim-0 entry, whether weight decay applies) per trained tensor.

        Weight decay applies to a head's weight matrices only, never to biases or norm scales (as train_head)."""
        slots: list[tuple[nn.Parameter, int | list[int], bool]] = []
        for s in self.stacks:
            slots += [(t, s.rows, t.ndim > 2) for t in s.tensors]
        for i in self.others:
            slots += [(p, i, p.ndim > 1) for p in self.heads[i].parameters() if p.requires_grad]
        return slots

    def snapshot(self) -> list[torch.Tensor]:
        """A copy of every head's current state (stacked tensors, then the other heads' state dicts)."""
        return [t.detach().clone() for t in self._state_tensors()]

    @torch.no_grad()
    def update_snapshot(self, snap: list[torch.Tensor], heads: np.ndarray) -> None:
        """Overwrite the saved state of the heads where ``heads`` (bool [H]) is true with their current state."""
        if not heads.any():
            return
        keep = torch.from_numpy(heads)
        for saved, current, rows in zip(snap, self._state_tensors(), self._state_rows()):
            if isinstance(rows, int):
                if heads[rows]:
                    saved.copy_(current)
            else:
                mask = keep[rows].to(saved.device)
                saved[mask] = current[mask]

    def member_states(self, snap: list[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
        """Per head, a state dict its ``build_head`` module loads (from ``snap``, or the current state)."""
        tensors = self._state_tensors() if snap is None else snap
        states: list[dict[str, torch.Tensor]] = [{} for _ in self.heads]
        it = iter(tensors)
        for s in self.stacks:
            for key in s.keys:
                t = next(it)
                for j, i in enumerate(s.rows):
                    states[i][key] = t[j].detach().clone()
        for i in self.others:
            for key in self.heads[i].state_dict():
                states[i][key] = next(it).detach().clone()
        return states

    @torch.no_grad()
    def load_member_states(self, states: list[dict[str, torch.Tensor]]) -> None:
        for head, state in zip(self.heads, states):
            head.load_state_dict(state)
        self.pack()

    def _state_tensors(self) -> list[torch.Tensor]:
        return [t for s in self.stacks for t in s.tensors] + [
            v for i in self.others for v in self.heads[i].state_dict().values()]  # fmt: skip

    def _state_rows(self) -> list[int | list[int]]:
        return [s.rows for s in self.stacks for _ in s.tensors] + [
            i for i in self.others for _ in self.heads[i].state_dict()]  # fmt: skip


class BankAdamW:
    """``torch.optim.AdamW`` (default betas, eps; no amsgrad) for many heads in one step, each head with its own
    learning rate and weight decay. A stacked tensor is updated at once with per-head (per dim-0 entry) rates,
    so a step costs a fixed number of kernels however many heads share the tensor. A test checks it against
    torch's AdamW with one parameter group per head.
    """

    def __init__(self, slots: list[tuple[nn.Parameter, int | list[int], bool]], weight_decays: Sequence[float],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):  # fmt: skip
        self.params = [p for p, _, _ in slots]
        self.owners = [torch.tensor(o) if isinstance(o, list) else o for _, o, _ in slots]
        decays = torch.tensor(weight_decays, dtype=torch.float64)
        self.decay = [decays[o] if decay else torch.zeros(()) for (_, o, decay) in slots]
        self.betas, self.eps, self.steps = betas, eps, 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lrs: Sequence[float] | np.ndarray) -> None:
        """One update with learning rate ``lrs[h]`` for head h (0 leaves a head exactly as it is).

        Tensors without a gradient are skipped, as torch's AdamW skips them (e.g. an unused parameter)."""
        beta1, beta2 = self.betas
        self.steps += 1
        correction1, correction2 = 1 - beta1**self.steps, math.sqrt(1 - beta2**self.steps)
        lr_all = torch.as_tensor(np.asarray(lrs, dtype=np.float64))
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params, grads = [self.params[i] for i in live], [self.params[i].grad for i in live]
        avgs, avg_sqs = [self.exp_avg[i] for i in live], [self.exp_avg_sq[i] for i in live]
        lr = [lr_all[self.owners[i]] for i in live]
        shapes = [(-1,) + (1,) * (p.ndim - 1) if a.ndim else () for p, a in zip(params, lr)]
        decay = [(1 - a * self.decay[i]).to(p.dtype).view(s) for i, a, p, s in zip(live, lr, params, shapes)]
        torch._foreach_mul_(params, decay)
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(avg_sqs, beta2)
        torch._foreach_addcmul_(avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(avg_sqs)
        torch._foreach_div_(denom, correction2)
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(avgs, denom)
        torch._foreach_mul_(update, [(a / correction1).to(p.dtype).view(s) for a, p, s in zip(lr, params, shapes)])
        torch._foreach_sub_(params, update)


class _Stoppers:
    """Early stopping for H heads at once: epochs since each head's watched metric last improved."""

    def __init__(self, cfg: TrainConfig, primary: str, higher_is_better: bool, n_heads: int):
        es = cfg.early_stopping
        assert es is not None
        self.metric = es.metric or primary
        self.lower = (not higher_is_better) if self.metric == primary else self.metric in LOWER_IS_BETTER
        self.patience, self.min_delta = es.patience, es.min_delta
        self.best, self.since_best = np.full(n_heads, np.nan), np.zeros(n_heads, dtype=np.int64)

    def exhausted(self, metrics: dict[str, np.ndarray], heads: np.ndarray) -> np.ndarray:
        """Record this epoch for ``heads`` (bool [H]; a NaN counts as no improvement); True once patience is used up."""
        value = _lookup(metrics, self.metric, "train.early_stopping.metric")
        better = ~np.isnan(value) & (np.isnan(self.best) | _improved(value, self.best, self.lower, self.min_delta))
        self.best = np.where(heads & better, value, self.best)
        self.since_best = np.where(heads, np.where(better, 0, self.since_best + 1), self.since_best)
        return heads & (self.since_best >= self.patience)


def _improved(value: np.ndarray, best: np.ndarray, lower: bool, min_delta: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return value < best - min_delta if lower else value > best + min_delta


def _lookup(metrics: dict[str, np.ndarray], name: str, what: str) -> np.ndarray:
    if name not in metrics:
        raise ConfigError(f"{what} '{name}' is not among the computed metrics: {', '.join(sorted(metrics))}")
    return np.asarray(metrics[name], dtype=np.float64)


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
    score_fn: StackedScoreFn,
    primary: str,
    higher_is_better: bool = True,
    device: str | torch.device = "cpu",
) -> BankResult:
    """Train all ``members`` at once; ``cfg.lr`` and ``cfg.weight_decay`` are replaced by each member's own.

    ``score_fn(y_true, scores [H, N, ...]) -> {metric: [H]}`` scores every head at once (e.g.
    ``TaskMetric.stacked``); the checkpoint of each head is its best validation ``primary`` epoch.
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"train.warmup_epochs ({cfg.warmup_epochs}) exceeds train.epochs ({cfg.epochs})")
    y_train = as_target_tensor(train.y, task_type).to(device)
    y_val = as_target_tensor(val.y, task_type).to(device)
    n_batches = math.ceil(len(y_train) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    n_heads = len(members)
    base_lr = np.array([m.lr for m in members])
    per_head_loss = torch.vmap(loss.to(device), in_dims=(0, None))  # [H, N, out] -> [H]
    with seeded(seed, device):
        bank = HeadBank(members, in_dim, out_dim).to(device)
        bank.reset_parameters(seed)
        optimizer = BankAdamW(bank.optimizer_slots(), [m.weight_decay for m in members])
        stoppers = _Stoppers(cfg, primary, higher_is_better, n_heads) if cfg.early_stopping else None
        active = np.ones(n_heads, dtype=bool)
        stopped = np.zeros(n_heads, dtype=bool)
        best_state = bank.snapshot()
        best_score, best_epoch = np.full(n_heads, np.nan), np.zeros(n_heads, dtype=np.int64)
        epochs: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []  # (heads trained this epoch, curve columns)
        order = data_generator(seed)
        step = 0
        for epoch in range(1, cfg.epochs + 1):
            bank.train()
            perm = torch.randperm(len(y_train), generator=order)
            batches = perm.split(cfg.batch_size)
            seen = []
            for start in range(0, len(batches), cfg.grad_accum):
                lrs = np.where(active, base_lr * lr_at(step, base_lr=1.0, warmup_steps=warmup, total_steps=total), 0.0)
                group = batches[start : start + cfg.grad_accum]
                group_size = sum(len(b) for b in group)
                optimizer.zero_grad()
                for idx in group:
                    logits = bank(feature_batch(train.x, idx, device))
                    (summed_loss(loss, logits, y_train[idx]) * (len(idx) / group_size)).backward()
                    seen.append(logits.detach())
                optimizer.step(lrs)
                step += 1
            trained = active.copy()
            rows = torch.from_numpy(np.flatnonzero(trained))
            train_logits = torch.cat(seen, dim=1)[rows.to(device)]
            val_logits = bank_logits(bank, val.x, device)[rows]
            with torch.no_grad():
                train_loss = per_head_loss(train_logits, y_train[perm.to(device)]).double().cpu().numpy()
                val_loss = per_head_loss(val_logits.to(device), y_val).double().cpu().numpy()
            bad = np.flatnonzero(~np.isfinite(train_loss))
            if bad.size:
                name = members[int(rows[bad[0]])].name
                raise FmprobeError(f"head {name}: training loss became {train_loss[bad[0]]} in epoch {epoch}; "
                                   "lower its learning rate or check the features")  # fmt: skip
            val_metrics = score_fn(val.y, stacked_scores(val_logits.float().cpu(), task_type).numpy())
            train_metrics = score_fn(train.y[perm.numpy()],
                                     stacked_scores(train_logits.float().cpu(), task_type).numpy())  # fmt: skip
            score = _lookup(val_metrics, primary, "primary metric")
            if np.isnan(score).any():
                raise FmprobeError(f"validation {primary} is NaN in epoch {epoch}, so no checkpoint can be chosen; "
                                   "the validation split probably lacks a class — fix the split")  # fmt: skip
            full_score = np.full(n_heads, np.nan)
            full_score[trained] = score
            first = best_epoch == 0
            better = trained & (first | _improved(full_score, best_score, not higher_is_better, 0.0))
            bank.update_snapshot(best_state, better)
            best_score[better], best_epoch[better] = full_score[better], epoch
            columns = {"epoch": np.full(len(rows), float(epoch)), "train_loss": train_loss, "val_loss": val_loss,
                       "lr": lrs[trained], **{f"val_{k}": v for k, v in val_metrics.items()},
                       f"train_{primary}": _lookup(train_metrics, primary, "primary metric")}  # fmt: skip
            epochs.append((trained, columns))
            if stoppers is not None:
                watched = {k: _expand(v, trained) for k, v in val_metrics.items()}
                done = stoppers.exhausted({**watched, "loss": _expand(val_loss, trained)}, trained)
                active &= ~done
                stopped |= done & (epoch < cfg.epochs)
            if not active.any():
                break
    last = bank.member_states()
    best = bank.member_states(best_state)
    bank.load_member_states(best)
    curves = _curves(epochs, n_heads)
    results = {m.name: TrainResult(best[h], last[h], int(best_epoch[h]), float(best_score[h]), curves[h],
                                   bool(stopped[h])) for h, m in enumerate(members)}  # fmt: skip
    sign = 1.0 if higher_is_better else -1.0
    pick = np.where(np.isnan(best_score), -np.inf, sign * best_score)
    return BankResult(results, members[int(np.argmax(pick))].name, bank)


def summed_loss(loss: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sum over heads of each head's loss on logits ``[H, B, out]``, in one call; its gradient is each
    head's own gradient (disjoint parameters). Every loss ``build_loss`` makes is a (weighted) mean over
    samples, so the mean over the H stacked copies of the batch, times H, is that sum (tested per loss type)."""
    n_heads = len(logits)
    return loss(logits.reshape(n_heads * logits.shape[1], -1), y.repeat(n_heads, *([1] * (y.ndim - 1)))) * n_heads


def stacked_scores(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    """``to_scores`` for every head: logits ``[H, N, out]`` -> scores ``[H, N, ...]``."""
    n_heads, n = logits.shape[:2]
    scores = to_scores(logits.reshape(n_heads * n, -1), task_type)
    return scores.reshape(n_heads, n, *scores.shape[1:])


def _expand(values: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """Values for the heads where ``heads`` is true -> an array over all heads (NaN elsewhere)."""
    out = np.full(len(heads), np.nan)
    out[heads] = values
    return out


def _curves(epochs: list[tuple[np.ndarray, dict[str, np.ndarray]]], n_heads: int) -> list[list[dict[str, float]]]:
    """One row per epoch a head trained in, with train_head's columns."""
    curves: list[list[dict[str, float]]] = [[] for _ in range(n_heads)]
    for trained, columns in epochs:
        for j, h in enumerate(np.flatnonzero(trained)):
            row = {k: float(v[j]) for k, v in columns.items()}
            row["epoch"] = int(row["epoch"])
            curves[h].append(row)
    return curves


@torch.no_grad()
def bank_logits(bank: HeadBank, x: torch.Tensor | np.ndarray, device: str | torch.device) -> torch.Tensor:
    """Every head's logits ``[H, N, out]`` on ``x`` (eval mode, batches of EVAL_BATCH)."""
    bank.eval()
    idx = torch.arange(len(x))
    return torch.cat([bank(feature_batch(x, b, device)) for b in idx.split(EVAL_BATCH)], dim=1)
