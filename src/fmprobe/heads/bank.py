"""HeadBank: a grid of probe heads (head type x learning rate x weight decay) as one module, after dinov2's
``eval/linear.py`` AllClassifiers: ``forward(x) -> logits [H, B, out]`` for H member heads reading one input.

Each member is its own ``build_head`` module (``heads[i]``). With ``fuse``, linear heads, and MLP heads of one
width, run as stacked tensors (one matmul for all of them), built by parameter name from the member modules
(``pack``); each member's dropout rate comes from its config. Training lives in ``fmprobe.train``; this module
only computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmprobe.config import HeadConfig
from fmprobe.errors import ConfigError
from fmprobe.heads import build_head
from fmprobe.heads.linear import LinearHead, check_pooled
from fmprobe.heads.mlp import MLPHead


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
    """Heads of one architecture as stacked tensors: entry j along dim 0 of each tensor is head ``rows[j]``."""

    NAMES: tuple[str, ...] = ()

    def __init__(self, heads: list[nn.Module], rows: list[int], dropout: list[float]):
        super().__init__()
        self.rows = rows
        self.tensors = nn.ParameterList(
            nn.Parameter(torch.stack([dict(h.named_parameters())[name] for h in heads]).detach().clone())
            for name in self.NAMES)  # fmt: skip
        self.register_buffer("p", torch.tensor(dropout, dtype=torch.float32), persistent=False)
        self.any_dropout = bool(self.p.any())

    def weight(self, name: str) -> nn.Parameter:
        return self.tensors[self.NAMES.index(name)]

    @torch.no_grad()
    def pack(self, heads: Sequence[nn.Module]) -> None:
        for name, t in zip(self.NAMES, self.tensors):
            t.copy_(torch.stack([dict(heads[i].named_parameters())[name] for i in self.rows]))

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout with each head's own rate along dim 0 (no-op in eval mode or at rate 0)."""
        if not self.training or not self.any_dropout:
            return x
        p = self.p.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return x * (torch.rand_like(x) >= p).to(x.dtype) / (1 - p)


class _StackedLinear(_Stacked):
    NAMES = ("fc.weight", "fc.bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight("fc.weight"), self.weight("fc.bias")  # [L, O, D], [L, O]
        n, out = w.shape[:2]
        if self.training and self.any_dropout:  # each head its own input dropout mask
            return torch.baddbmm(b[:, None], self.drop(x.expand(n, *x.shape)), w.transpose(1, 2))
        return torch.addmm(b.reshape(-1), x, w.reshape(n * out, -1).t()).view(len(x), n, out).transpose(0, 1)


class _StackedMLP(_Stacked):
    NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1 = self.weight("fc1.weight"), self.weight("fc1.bias")  # [M, K, D], [M, K]
        w2, b2 = self.weight("fc2.weight"), self.weight("fc2.bias")  # [M, O, K], [M, O]
        m, k = w1.shape[:2]
        hidden = torch.addmm(b1.reshape(-1), x, w1.reshape(m * k, -1).t()).view(len(x), m, k).transpose(0, 1)
        return torch.baddbmm(b2[:, None], self.drop(F.gelu(hidden)), w2.transpose(1, 2))


class HeadBank(nn.Module):
    """``forward(x [B, ...]) -> logits [H, B, out_dim]`` of the member heads."""

    def __init__(self, members: list[BankMember], in_dim: int, out_dim: int, *, fuse: bool = True):
        super().__init__()
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"HeadBank members need distinct names, got {names}")
        self.members, self.fused = members, fuse
        self.heads = nn.ModuleList(build_head(m.head, in_dim, out_dim) for m in members)
        stacks: list[_Stacked] = []
        if fuse:
            linear = [i for i, h in enumerate(self.heads) if isinstance(h, LinearHead)]
            widths: dict[int, list[int]] = {}
            for i, h in enumerate(self.heads):
                if isinstance(h, MLPHead):
                    widths.setdefault(h.fc1.out_features, []).append(i)
            groups = ([(_StackedLinear, linear)] if linear else []) + [(_StackedMLP, rows) for rows in widths.values()]
            stacks = [kind([self.heads[i] for i in rows], rows, [members[i].head.dropout for i in rows])
                      for kind, rows in groups]  # fmt: skip
        self.stacks = nn.ModuleList(stacks)
        fused = {i for s in stacks for i in s.rows}
        self.others = [i for i in range(len(members)) if i not in fused]
        order = [i for s in stacks for i in s.rows] + self.others
        self.register_buffer("order", torch.argsort(torch.tensor(order)), persistent=False)
        self.identity_order = order == sorted(order)

    def pack(self) -> None:
        """Copy the member modules' parameters into the stacked tensors."""
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

        Weight decay applies to a head's weight matrices only, never to biases or norm scales."""
        slots: list[tuple[nn.Parameter, int | list[int], bool]] = []
        for s in self.stacks:
            slots += [(t, s.rows, t.ndim > 2) for t in s.tensors]
        for i in self.others:
            slots += [(p, i, p.ndim > 1) for p in self.heads[i].parameters() if p.requires_grad]
        return slots

    def state(self) -> list[tuple[torch.Tensor, int | list[int]]]:
        """Every tensor of the members' states with its owner(s): stacked tensors, then the other heads' states."""
        return [(t, s.rows) for s in self.stacks for t in s.tensors] + [
            (v, i) for i in self.others for v in self.heads[i].state_dict().values()]  # fmt: skip

    def member_states(self, tensors: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Per head, a state dict its ``build_head`` module loads, from ``tensors`` (in ``state()`` order)."""
        states: list[dict[str, torch.Tensor]] = [{} for _ in self.heads]
        it = iter(tensors)
        for s in self.stacks:
            for name in s.NAMES:
                t = next(it)
                for j, i in enumerate(s.rows):
                    states[i][name] = t[j].detach().clone()
        for i in self.others:
            for key in self.heads[i].state_dict():
                states[i][key] = next(it).detach().clone()
        return states

    @torch.no_grad()
    def load_member_states(self, states: list[dict[str, torch.Tensor]]) -> None:
        for head, state in zip(self.heads, states):
            head.load_state_dict(state)
        self.pack()
