"""Optimizer parameter groups for end-to-end training: head, adapters, backbone and named modules, each with its
own learning rate, weight decay and warmup, layer-wise LR decay over blocks, and a start epoch (unfreezing).
The training core's ``GroupAdamW`` schedules each group from these keys."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn



@dataclass(frozen=True)
class GroupSpec:
    """Resolved settings of one kind of parameter."""

    lr: float
    weight_decay: float
    warmup_epochs: int
    start_epoch: int = 1  # 1-based; lr is 0 before it (unfreeze_at_epoch)


def build_groups(
    named: dict[str, list[tuple[str, nn.Parameter]]],
    specs: dict[str, GroupSpec],
    *,
    layer_of: dict[str, int] | None = None,
    num_layers: int = 0,
    layer_decay: float = 1.0,
    steps_per_epoch: int,
) -> list[dict[str, Any]]:
    """Groups for ``torch.optim.AdamW``: one per (kind, layer depth, decayed or not).

    ``named`` maps a kind (head, adapters, backbone, module:<path>) to its (name, parameter) pairs; ``layer_of``
    gives a parameter's layer id (0 = embeddings, i + 1 = block i, num_layers + 1 = after the blocks) for kinds
    under layer-wise decay (adapters, backbone): lr x decay^(num_layers + 1 - id). Weight decay never applies to
    1-D parameters (biases, norm scales).
    """
    groups: dict[tuple[str, int, bool], dict[str, Any]] = {}
    for kind, pairs in named.items():
        spec = specs[kind]
        for name, p in pairs:
            if not p.requires_grad:
                continue
            depth = 0
            if layer_of is not None and kind in ("adapters", "backbone"):
                depth = num_layers + 1 - layer_of[name]
            decay = p.ndim > 1 and spec.weight_decay > 0
            key = (kind, depth, decay)
            if key not in groups:
                groups[key] = {
                    "params": [], "name": f"{kind}/depth{depth}" + ("" if decay else "/no_decay"), "kind": kind,
                    "base_lr": spec.lr * layer_decay**depth, "lr": 0.0,
                    "weight_decay": spec.weight_decay if decay else 0.0,
                    "warmup_steps": spec.warmup_epochs * steps_per_epoch,
                    "start_step": (spec.start_epoch - 1) * steps_per_epoch,
                }  # fmt: skip
            groups[key]["params"].append(p)
    return list(groups.values())


def count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
