"""The model part of the training core for what trains on cached inputs: probe heads (one, or a HeadBank grid)
and single modules with their own loss (a segmentation decoder, a spatial probe)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fmprobe.heads.bank import HeadBank
from fmprobe.train.core import Batch
from fmprobe.train.losses import member_losses, separate_losses
from fmprobe.train.optim import BankAdamW, GroupAdamW, decay_groups
from fmprobe.train.seeding import seeded


class _Cached:
    """What every cached-input member set shares: no epoch hook, no data-parallel sync, no extra curves."""

    def start_epoch(self, epoch: int) -> None:
        pass

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def epoch_columns(self) -> dict[str, float]:
        return {}


class HeadMembers(_Cached):
    """The heads of a :class:`HeadBank`, each initialised as a separate run with ``seed`` would initialise it.

    Unfused, every head trains with torch's AdamW over its own decay / no-decay groups; fused, the members train as
    stacked tensors with :class:`BankAdamW` (each member's learning rate and weight decay)."""

    def __init__(self, bank: HeadBank, loss: nn.Module, *, warmup_steps: int, seed: int,
                 device: str | torch.device = "cpu"):  # fmt: skip
        self.bank, self.loss = bank.to(device), loss.to(device)
        self.names = [m.name for m in bank.members]
        for head in bank.heads:
            with seeded(seed, device):
                head.reset_parameters()
        bank.pack()
        lrs, decays = [m.lr for m in bank.members], [m.weight_decay for m in bank.members]
        if not bank.fused:  # each head its own AdamW groups: the arithmetic of its run alone
            groups = [g for i, head in enumerate(bank.heads)
                      for g in decay_groups(head, lr=lrs[i], weight_decay=decays[i], warmup_steps=warmup_steps,
                                            member=i)]  # fmt: skip
            self.optimizer: GroupAdamW | BankAdamW = GroupAdamW(groups, n_members=len(bank.heads))
        else:
            self.optimizer = BankAdamW(bank.optimizer_slots(), lrs, decays, warmup_steps=warmup_steps)

    def train(self, mode: bool = True) -> Any:
        return self.bank.train(mode)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.predict(batch.inputs)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        if len(self.names) == 1 and not self.bank.fused:  # one head: called directly, no bank round trip per step
            return self.bank.heads[0](inputs).unsqueeze(0)
        return self.bank(inputs)

    def losses(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if len(outputs) == 1:  # squeeze, a view: its backward is cheaper than indexing's
            value = self.loss(outputs.squeeze(0), batch.targets)
            return value, value.view(1)
        if not self.bank.fused:  # the loss call of each member's run alone
            values = separate_losses(self.loss, outputs, batch.targets)
            return values.sum(), values
        values = member_losses(self.loss, outputs, batch.targets)
        return values.sum(), values

    def state(self) -> list[tuple[torch.Tensor, int | list[int]]]:
        return self.bank.state()

    def member_states(self, tensors: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.bank.member_states(tensors)


class ModuleMember(_Cached):
    """One module trained on ``loss_fn(outputs, targets)``, its parameters in the given optimizer groups (see
    ``train.optim.GroupAdamW``); ``predict_fn`` turns eval outputs into what the scorer reads."""

    def __init__(self, name: str, module: nn.Module, groups: list[dict[str, Any]],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 predict_fn: Callable[[torch.Tensor], torch.Tensor] = lambda out: out):  # fmt: skip
        self.names, self.module, self.loss_fn, self.predict_fn = [name], module, loss_fn, predict_fn
        self.optimizer = GroupAdamW(groups)

    def train(self, mode: bool = True) -> Any:
        return self.module.train(mode)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.module(batch.inputs)[None]

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.predict_fn(self.module(inputs))[None]

    def losses(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        value = self.loss_fn(outputs[0], batch.targets)
        return value, value[None]

    def state(self) -> list[tuple[torch.Tensor, int]]:
        return [(v, 0) for v in self.module.state_dict().values()]

    def member_states(self, tensors: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [{k: t.detach().clone() for k, t in zip(self.module.state_dict(), tensors)}]
