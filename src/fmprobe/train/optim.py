"""AdamW under fmprobe's one schedule, for H members at once.

Both optimizers take, per step, the schedule's learning rates (``set_lrs``: warmup + cosine per parameter group,
0 for members that stopped early) and update with torch's AdamW rule (default betas and eps, no amsgrad):

- :class:`GroupAdamW` wraps ``torch.optim.AdamW`` over parameter groups that carry their own base learning rate,
  warmup and start step (a head's decay / no-decay groups; end-to-end training's head, adapter, backbone and
  per-depth groups). It works with a ``GradScaler``.
- :class:`BankAdamW` updates stacked tensors (one entry per member along dim 0) with per-member learning rates in
  a fixed number of kernels whatever the number of members: the HeadBank's fused optimizer. A test checks it
  against ``torch.optim.AdamW`` with one parameter group per member.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fmprobe.errors import ConfigError
from fmprobe.train.schedule import lr_factor


class ScheduledOptimizer(Protocol):
    def set_lrs(self, step: int, total_steps: int, active: np.ndarray) -> np.ndarray:
        """Set this step's learning rates; returns each member's (its first group's) learning rate."""

    def zero_grad(self) -> None: ...

    def step(self, scaler: Any = None) -> None: ...


def decay_groups(module: nn.Module, *, lr: float, weight_decay: float, warmup_steps: int, member: int = 0
                 ) -> list[dict[str, Any]]:  # fmt: skip
    """A module's two groups: weight decay on weight matrices, never on biases or norm scales (1-D)."""
    trained = [p for p in module.parameters() if p.requires_grad]
    common = {"base_lr": lr, "warmup_steps": warmup_steps, "start_step": 0, "member": member}
    return [{"params": [p for p in trained if p.ndim > 1], "weight_decay": weight_decay, **common},
            {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0, **common}]  # fmt: skip


class GroupAdamW:
    """``torch.optim.AdamW`` whose groups each follow the schedule from their own ``start_step``.

    Every group dict holds ``base_lr``, ``warmup_steps``, ``start_step`` (lr 0 before it) and ``member``."""

    def __init__(self, groups: list[dict[str, Any]], n_members: int = 1):
        for g in groups:
            g.setdefault("member", 0)
        self.torch = torch.optim.AdamW(groups, lr=0.0, fused=True)  # one kernel per step: 3-4x foreach on CPU
        self.n_members = n_members

    def set_lrs(self, step: int, total_steps: int, active: np.ndarray) -> np.ndarray:
        lrs: list[float | None] = [None] * self.n_members  # per step: plain Python, no array round trips
        for g in self.torch.param_groups:
            start, member = g["start_step"], g["member"]
            on = active[member] and step >= start
            g["lr"] = g["base_lr"] * lr_factor(step - start, warmup_steps=g["warmup_steps"],
                                               total_steps=total_steps - start) if on else 0.0  # fmt: skip
            if lrs[member] is None:
                lrs[member] = g["lr"]
        return np.array([np.nan if lr is None else lr for lr in lrs])

    def zero_grad(self) -> None:
        self.torch.zero_grad(set_to_none=True)

    def step(self, scaler: Any = None) -> None:
        if scaler is None:
            self.torch.step()
        else:
            scaler.step(self.torch)
            scaler.update()


class BankAdamW:
    """AdamW for many members in one step, each with its own learning rate and weight decay.

    ``slots`` are (tensor, owning member or one member per dim-0 entry, whether weight decay applies)."""

    def __init__(self, slots: list[tuple[nn.Parameter, int | list[int], bool]], base_lrs: Sequence[float],
                 weight_decays: Sequence[float], *, warmup_steps: int = 0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):  # fmt: skip
        self.params = [p for p, _, _ in slots]
        self.owners = [torch.tensor(o) if isinstance(o, list) else o for _, o, _ in slots]
        decays = torch.tensor(weight_decays, dtype=torch.float64)
        self.decay = [decays[o] if decay else torch.zeros(()) for (_, o, decay) in slots]
        self.base_lrs, self.warmup_steps = np.asarray(base_lrs, dtype=np.float64), warmup_steps
        self.betas, self.eps, self.steps = betas, eps, 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.lrs = np.zeros(len(self.base_lrs))

    def set_lrs(self, step: int, total_steps: int, active: np.ndarray) -> np.ndarray:
        factor = lr_factor(step, warmup_steps=self.warmup_steps, total_steps=total_steps)
        self.lrs = np.where(active, self.base_lrs * factor, 0.0)
        return self.lrs

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, scaler: Any = None) -> None:
        if scaler is not None:
            raise ConfigError("a HeadBank trains in float32 on cached features; it takes no gradient scaler")
        self.update(self.lrs)

    @torch.no_grad()
    def update(self, lrs: Sequence[float] | np.ndarray) -> None:
        """One update with learning rate ``lrs[h]`` for member h (0 leaves a member exactly as it is).

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
