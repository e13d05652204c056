"""The members of end-to-end training: one backbone + head (+ segmentation decoder) as the training core sees it.

What trains is ``adapt.setup.prepare``'s business (its parameter groups, each with its learning rate, warmup and
start epoch); the checkpoint holds the trained parameters and the head's, standardiser's and decoder's buffers.
With several processes the forward runs through DDP (``adapt.data_parallel``), reducing gradients on the last
micro-batch of each accumulation group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fmprobe.adapt.data_parallel import DataParallel
from fmprobe.adapt.model import AdaptModel
from fmprobe.adapt.setup import Prepared
from fmprobe.train.core import Batch
from fmprobe.train.optim import GroupAdamW

if TYPE_CHECKING:
    from fmprobe.adapt.multitask import JointSegmentation


class EndToEndMembers:
    def __init__(self, name: str, model: AdaptModel, prepared: Prepared, loss: nn.Module, parallel: DataParallel, *,
                 device: torch.device, seg: JointSegmentation | None):  # fmt: skip
        self.names, self.model, self.prepared, self.loss = [name], model, prepared, loss
        self.parallel, self.device, self.seg = parallel, device, seg
        self.optimizer = GroupAdamW(prepared.groups)
        trainable = {id(p) for g in prepared.groups for p in g["params"]}
        self.keys = [k for k, p in model.named_parameters() if id(p) in trainable]
        self.keys += [k for k, _ in model.named_buffers() if k.startswith(("head.", "standardise.", "decoder."))]

    def start_epoch(self, epoch: int) -> None:
        self.prepared.gate(epoch)  # unfreeze_at_epoch: gradients only for groups whose epoch has come

    def train(self, mode: bool = True) -> Any:
        return self.model.train(mode)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.parallel.training_model()(batch.inputs)[None]

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)[None]

    def losses(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The task loss (reported) plus, with segmentation, the weighted decoder loss (minimised)."""
        value = self.loss(outputs[0].float(), batch.targets)
        joint = value if self.seg is None else value + self.seg.batch_loss(self.model, batch.extra["mask"])
        return joint, value[None]

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        return self.parallel.sync(last=last)

    def state(self) -> list[tuple[torch.Tensor, int]]:
        full = self.model.state_dict()
        return [(full[k], 0) for k in self.keys]

    def member_states(self, tensors: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [{k: t.detach().clone() for k, t in zip(self.keys, tensors)}]

    def epoch_columns(self) -> dict[str, float]:
        return self.seg.end_epoch() if self.seg is not None else {}
