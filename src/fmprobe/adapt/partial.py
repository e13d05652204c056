"""Which backbone weights train: the last N blocks (up to the head's layer) + final norm, named modules, drop-path."""

from __future__ import annotations

import sys

from torch import nn

from fmprobe.adapt.anatomy import anatomy, family, head_block, hf_model, num_blocks
from fmprobe.backbones.base import Encoder, LayerRef
from fmprobe.backbones.hooks import resolve_module
from fmprobe.errors import ConfigError


def partial_modules(encoder: Encoder, n_blocks: int, layer: LayerRef) -> list[str]:
    """Module paths ``partial`` trains: blocks r-N+1..r where r feeds the head, plus the final norm when the head
    reads the model's final output (layer -1). N = 0 trains the final norm alone (BLIP-2's ``ln_vision``)."""
    parts = anatomy(encoder)
    last, final = head_block(encoder, layer)
    if n_blocks > last + 1:
        raise ConfigError(
            f"adapt.partial_blocks is {n_blocks} but the head reads block {last}, so only {last + 1} blocks feed it; "
            f"set adapt.partial_blocks to at most {last + 1}"
        )
    if n_blocks == 0 and not (final and parts.final_norm is not None):
        why = (f"the head reads block {last}, after which no norm applies" if not final
               else f"{encoder.name} applies no final norm to its tokens")
        raise ConfigError(
            f"adapt.partial_blocks: 0 trains the final norm alone, but {why}, so nothing in the backbone would train; "
            f"set adapt.partial_blocks to 1 or more, or use adapt.strategy: frozen"
        )
    paths = [f"{parts.blocks}.{i}" for i in range(last - n_blocks + 1, last + 1)]
    if final and parts.final_norm is not None:
        paths.append(parts.final_norm)
    return paths


def unfreeze(encoder: Encoder, paths: list[str]) -> list[nn.Parameter]:
    """Turn gradients on for every parameter under ``paths`` (resolved with a helpful error); returns them."""
    model = hf_model(encoder)
    params: list[nn.Parameter] = []
    for path in paths:
        module = resolve_module(model, path, owner=encoder.name)
        for p in module.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def set_drop_path(encoder: Encoder, rate: float) -> None:
    """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last block), with the family's own
    DropPath module (timm blocks: ``drop_path1`` after attention and ``drop_path2`` after the MLP); refused for
    families whose blocks have none."""
    model = hf_model(encoder)
    blocks = model.get_submodule(anatomy(encoder).blocks)
    n = num_blocks(encoder)
    slots = ("drop_path1", "drop_path2") if all(hasattr(b, "drop_path1") for b in blocks) else ("drop_path",)
    if not all(hasattr(b, slot) for b in blocks for slot in slots):
        raise ConfigError(f"{encoder.name} ({family(encoder)}) has no drop-path in its blocks; remove adapt.drop_path")
    module = sys.modules["timm.layers" if slots[0] == "drop_path1" else type(blocks[0]).__module__]
    drop_cls = next((getattr(module, k) for k in dir(module) if k.endswith("DropPath")), None)
    if drop_cls is None:
        raise ConfigError(f"{family(encoder)} defines no DropPath module; remove adapt.drop_path")
    for i, block in enumerate(blocks):
        for slot in slots:
            setattr(block, slot, drop_cls(rate * i / max(1, n - 1)).train(block.training))
    if hasattr(model, "config"):
        model.config.drop_path_rate = rate
