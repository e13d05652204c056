"""The half every encoder over a torch module built from code shares (timm, open_clip, MONAI, in-house).

Layer references (``model.layers``):

- an int ``i`` >= 0 is the output of extraction point ``i``: a transformer block (a CNN stage for timm CNNs,
  a block of ``contract.blocks`` for ``kind: python``), raw, before any final norm; other negative ints count
  from the end;
- ``-1`` is the model's final output (after its final norm, as the library's own forward returns it);
- ``"pooled"`` is the model's pooled embedding ``[B, D]`` (timm's pre-logits features, open_clip's image
  embedding, a python model's ``output: pooled``), as one token on the grid ``(1, 1, 1)``;
- any other string is a module path inside ``encoder.model``, read by a forward hook.

Every output becomes tokens by its rank: ``[B, N, D]`` tokens with the model's prefix tokens (CLS, registers)
split off, ``[B, D, h, w]`` / ``[B, D, d, h, w]`` feature maps flattened in raster order, ``[B, D]`` pooled.
Attention maps, where the model computes them explicitly, are read as the output of the dropout that follows
each block's softmax (``attention_paths``), with fused attention kernels switched off for that call.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fmprobe.backbones.base import Encoder, EncoderOutput, InputSpec, LayerRef
from fmprobe.backbones.checkpoints import LoadReport
from fmprobe.backbones.hooks import record_outputs
from fmprobe.backbones.weights_digest import WeightsDigest
from fmprobe.errors import EncoderError

POOLED = "pooled"
_INT_RE = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class Point:
    """One extraction point: a numbered block, the final output, the pooled embedding, or a module path."""

    kind: Literal["block", "final", "pooled", "module"]
    index: int = -1
    path: str = ""


@dataclass
class Outputs:
    """What one forward pass produced: block outputs (with their prefix tokens when returned apart)."""

    blocks: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    final: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


class ModuleEncoder(Encoder):
    """Subclasses implement :meth:`run` (one forward pass) and may override the attention and grid hooks."""

    has_pooled = False  # whether "pooled" is an extraction point
    no_points_hint = ""  # how to get numbered extraction points when the model has none

    def __init__(
        self, model: nn.Module, *, name: str, input_spec: InputSpec, num_prefix: int, num_points: int,
        identity: dict[str, Any], load_report: LoadReport | None,
    ):  # fmt: skip
        super().__init__()
        self.model = model.requires_grad_(False)
        self.name = name
        self.input_spec = input_spec
        self.num_prefix = num_prefix
        self.num_points = num_points
        self.num_blocks = num_points or None  # the layers' depth on the layers page
        self.load_report = load_report
        self._identity = json.dumps(identity, sort_keys=True, default=str)
        self._digest = WeightsDigest()
        self.eval()  # frozen until an adaptation strategy turns gradients on

    # -- subclass hooks -----------------------------------------------------------------------------------------
    def run(self, pixels: torch.Tensor, blocks: list[int], final: bool, pooled: bool) -> Outputs:
        raise NotImplementedError  # pragma: no cover - interface

    def patch_grid(self, pixels: torch.Tensor) -> tuple[int, int, int] | None:
        """The grid of ``[B, N, D]`` token outputs for this batch (None: the model outputs no token sequences)."""
        return None

    def attention_paths(self) -> list[str]:
        """Per block, the module whose output is the softmax attention ``[B, heads, Q, K]``."""
        raise EncoderError(f"{self.name} ({type(self.model).__name__}) does not expose attention maps")

    @contextmanager
    def explicit_attention(self) -> Iterator[None]:
        """Switch fused attention kernels (which never materialise the maps) off for one call."""
        fused = [m for m in self.model.modules() if getattr(m, "fused_attn", False) is True]
        for m in fused:
            m.fused_attn = False
        try:
            yield
        finally:
            for m in fused:
                m.fused_attn = True

    # -- Encoder ------------------------------------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor, layers: list[LayerRef], attentions: bool = False) -> EncoderOutput:
        self.check_input(pixels)
        if not layers:
            raise EncoderError(f"{self.name}: no layers requested; set model.layers (e.g. [-1])")
        points = {str(ref): self.point(ref) for ref in layers}
        hooked = {key: p.path for key, p in points.items() if p.kind == "module"}
        maps = self.attention_paths() if attentions else []
        hooked.update({f"attention:{i}": path for i, path in enumerate(maps)})
        param = next(self.model.parameters())
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        blocks = sorted({p.index for p in points.values() if p.kind == "block"})
        kinds = {p.kind for p in points.values()}
        with self.explicit_attention() if attentions else nullcontext(), \
                record_outputs(self.model, hooked, owner=self.name) as recorded:  # fmt: skip
            out = self.run(pixels, blocks, "final" in kinds, "pooled" in kinds)
        grid = self.patch_grid(pixels)
        result = EncoderOutput(tokens={}, prefix={}, grid={})
        for key, p in points.items():
            prefix: torch.Tensor | None = None
            if p.kind == "block":
                tensor, prefix = out.blocks[p.index]
            elif p.kind in ("final", "pooled"):
                tensor = out.final if p.kind == "final" else out.pooled
                assert tensor is not None, f"{type(self).__name__}.run did not return the {p.kind} output"
            else:
                tensor = recorded[key]
            where = f"module '{p.path}'" if p.kind == "module" else f"layer {key}"
            result.prefix[key], result.tokens[key], result.grid[key] = self.as_tokens(tensor, prefix, grid, where)
        if attentions:
            result.attentions = {str(i): recorded[f"attention:{i}"] for i in range(len(maps))}
        return result

    def point(self, ref: LayerRef) -> Point:
        if isinstance(ref, str) and _INT_RE.match(ref.strip()):
            ref = int(ref)
        if ref == POOLED:
            if not self.has_pooled:
                raise EncoderError(f"{self.name} has no pooled output; read -1 or a block index instead")
            return Point("pooled")
        if isinstance(ref, str):
            return Point("module", path=ref)
        if ref == -1:
            return Point("final")
        n = self.num_points
        if n == 0:
            raise EncoderError(f"{self.name} has no numbered extraction points{self.no_points_hint}; read layer -1 or "
                               "a module path")
        if not -n <= ref < n:
            raise EncoderError(
                f"{self.name}: layer {ref} is out of range; the model has {n} extraction points (0..{n - 1}, negative "
                f"counts from the end, -1 is the final output after the last norm, '{POOLED}' the pooled embedding)"
            )
        return Point("block", ref % n)

    def as_tokens(
        self, tensor: torch.Tensor, prefix: torch.Tensor | None, grid: tuple[int, int, int] | None, where: str
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """(prefix [B, P, D], tokens [B, N, D], grid) of one output, by its rank (see the module doc)."""
        if tensor.dim() == 2:
            tokens = tensor[:, None]
            return tokens[:, :0], tokens, (1, 1, 1)
        if tensor.dim() in (4, 5):
            spatial = tuple(tensor.shape[2:])
            tokens = tensor.flatten(2).transpose(1, 2)
            empty = tokens[:, :0]
            return (empty if prefix is None else prefix), tokens, ((1, *spatial) if len(spatial) == 2 else spatial)
        n_patch = math.prod(grid) if grid is not None else None
        if tensor.dim() == 3 and n_patch is not None:
            if prefix is None and tensor.shape[1] == self.num_prefix + n_patch:
                return tensor[:, : self.num_prefix], tensor[:, self.num_prefix :], grid
            if tensor.shape[1] == n_patch:
                return (tensor[:, :0] if prefix is None else prefix), tensor, grid
        expected = (f"tokens [B, {self.num_prefix} prefix + {n_patch} patch tokens, D] (grid {grid}), "
                    if n_patch is not None else "")  # fmt: skip
        raise EncoderError(
            f"{self.name}: {where} outputs shape {tuple(tensor.shape)}, not {expected}a feature map [B, D, h, w] / "
            f"[B, D, d, h, w] or a pooled [B, D]; pick an output of one of these shapes"
        )

    def fingerprint(self) -> str:
        """sha256 of what builds the model (architecture, arguments, input spec) and every weight."""
        return self._digest(self.model, type(self).__name__ + self._identity + repr(self.input_spec))
