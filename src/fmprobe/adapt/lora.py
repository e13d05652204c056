"""LoRA adapters (peft) on the backbone's linear layers: presets per architecture or an explicit regex.

Presets resolve to the full paths of the modules they adapt, inside the transformer blocks only (so V-JEPA 2's
predictor, whose modules share the encoder's names, is never adapted). peft injects the adapters into
``encoder.model`` in place, so ``encode()`` stays the forward path and token layout matches the frozen path.
"""

from __future__ import annotations

import re
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from fmprobe.adapt.anatomy import anatomy, block_index, hf_model
from fmprobe.atomic import atomic_dir
from fmprobe.backbones.base import Encoder
from fmprobe.config import LoraAdaptConfig
from fmprobe.errors import ConfigError, EncoderError

PRESETS = ("qv", "qkv", "all-linear")


def lora_targets(encoder: Encoder, targets: str) -> list[str]:
    """Full module paths (in ``encoder.model``) the ``targets`` preset or regex names; never empty."""
    model = hf_model(encoder)
    parts = anatomy(encoder)
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    in_blocks = [n for n in linear if block_index(n, parts.blocks) is not None]
    if targets in ("qv", "qkv"):
        if parts.qkv is not None:
            if targets == "qv":
                raise ConfigError(
                    f"{encoder.name} projects q, k and v with one fused linear ({parts.qkv}), so LoRA cannot adapt "
                    "q and v without k; set adapt.lora.targets: qkv"
                )
            suffixes = [parts.qkv]
        else:
            suffixes = [parts.q, parts.v] if targets == "qv" else [parts.q, parts.k, parts.v]
        chosen = [n for n in in_blocks if any(n.endswith("." + s) for s in suffixes if s)]
    elif targets == "all-linear":
        chosen = in_blocks
    else:
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ConfigError(
                f"adapt.lora.targets '{targets}' is neither a preset ({', '.join(PRESETS)}) nor a valid regex: {err}"
            ) from None
        chosen = [n for n in linear if pattern.fullmatch(n)]
    if not chosen:
        examples = ", ".join(in_blocks[:6])
        raise ConfigError(
            f"adapt.lora.targets '{targets}' matches no linear layer of {encoder.name}; a regex must fully match "
            f"module paths such as {examples}"
        )
    return chosen


def apply_lora(encoder: Encoder, cfg: LoraAdaptConfig) -> tuple[PeftModel, list[str]]:
    """Inject LoRA into ``encoder.model`` (in place); only the adapter weights require grad afterwards.

    Returns the peft model and the adapted module paths. peft shortens long target lists to suffixes, so the
    modules it actually adapted are checked against the resolved list (a predictor must never be adapted).
    """
    targets = lora_targets(encoder, cfg.targets)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    peft_model = get_peft_model(hf_model(encoder), config)
    adapted = sorted(name for name, m in hf_model(encoder).named_modules() if isinstance(m, LoraLayer))
    if adapted != sorted(targets):
        extra, missing = sorted(set(adapted) - set(targets)), sorted(set(targets) - set(adapted))
        raise EncoderError(f"peft adapted other modules than asked: extra {extra[:4]}, missing {missing[:4]}")
    return peft_model, targets


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def save_adapter(peft_model: PeftModel, folder: Path) -> Path:
    """peft's save_pretrained of the adapter alone, written to a temporary folder then renamed into place."""
    with atomic_dir(folder) as tmp:
        peft_model.save_pretrained(tmp)
    return folder


def load_adapter(encoder: Encoder, folder: str | Path, *, merge: bool = False) -> PeftModel | nn.Module:
    """Put a saved adapter into ``encoder.model`` (in place); with ``merge`` fold it into the weights."""
    peft_model = PeftModel.from_pretrained(hf_model(encoder), str(folder))
    if merge:
        return merge_adapter(encoder, peft_model)
    return peft_model


def merge_adapter(encoder: Encoder, peft_model: PeftModel) -> nn.Module:
    """Fold the adapter into the base weights, in place: the encoder's model is a plain transformers model again."""
    merged = peft_model.merge_and_unload()
    assert merged is hf_model(encoder)  # peft injects into and unloads from the model object itself
    return merged
