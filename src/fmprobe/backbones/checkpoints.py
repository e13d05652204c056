"""State-dict files into models built from code (timm, open_clip, MONAI, in-house), with every key accounted for.

Published checkpoints rarely match the module that loads them key for key: RETFound wraps its weights in
``{"model": ...}``, DDP checkpoints prefix ``module.``, MAE checkpoints carry a decoder the encoder does not have.
Each adjustment is a config line (``model.weights_key``; ``drop_keys``, regexes of the keys as stored; then
``rename``, key prefixes replaced); what is still missing or
unexpected afterwards is an error under ``strict`` (the default) and a logged warning without it. Either way the
:class:`LoadReport` lists it, so a network half at its random initialisation is never probed by accident.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

log = logging.getLogger("fmprobe")
SHOWN = 8  # keys named in a message


@dataclass
class LoadReport:
    """What loading a weights file did: keys renamed, dropped on request, missing and unexpected."""

    source: str
    loaded: int = 0  # checkpoint tensors the model has (loaded unless an error stopped it)
    renamed: int = 0
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint: left at initialisation
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model: ignored

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors matched from {self.source}"]
        if self.renamed:
            parts.append(f"{self.renamed} keys renamed")
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped ({_names(self.dropped)})")
        parts.append(f"{len(self.missing)} missing" + (f" ({_names(self.missing)})" if self.missing else ""))
        unexpected = f" ({_names(self.unexpected)})" if self.unexpected else ""
        parts.append(f"{len(self.unexpected)} unexpected{unexpected}")
        return "; ".join(parts)


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f", ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def read_state_dict(path: str | Any, key: str | None, *, source: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file, or of an object already loaded
    (``source`` names it), taking the ``key`` entry when given.

    Files are read with ``weights_only`` (no code runs while loading). A dict holding other dicts (a training
    checkpoint) without ``key`` is refused, naming the entries that hold tensors.
    """
    obj: Any = path
    if isinstance(path, str):
        source = path
        obj = _read_file(path)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise EncoderError(f"model.weights_key '{key}' is not in '{source}' (top-level entries: {found})")
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise EncoderError(f"'{source}' holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k, v in obj.items()
                  if isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())]  # fmt: skip
        hint = f"; set model.weights_key to one of {nested}" if nested else ""
        raise EncoderError(f"'{source}' is not a flat state dict (entries: {sorted(map(str, obj))[:SHOWN]}){hint}")
    return obj


def _read_file(path: str) -> Any:
    file = Path(path).expanduser()
    if not file.is_file():
        raise EncoderError(f"model.weights '{path}' is not a file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for a bad file; all mean "not loadable"
        raise EncoderError(f"cannot read model.weights '{path}' as a state dict: {err}") from None


def load_weights(module: nn.Module, model: ModelConfig, *, owner: str) -> LoadReport:
    """Read the ``model.weights`` file and load it into ``module`` (see :func:`load_state`)."""
    assert model.weights is not None
    return load_state(module, read_state_dict(model.weights, model.weights_key), model, owner=owner)


def load_state(module: nn.Module, state: dict[str, torch.Tensor], model: ModelConfig, *, owner: str) -> LoadReport:
    """Load ``state`` into ``module`` after ``model.drop_keys`` (matched against the keys as stored) and
    ``model.rename``, under ``model.strict``; see the module doc."""
    report = LoadReport(source=str(model.weights))
    patterns = [_regex(p) for p in model.drop_keys]
    report.dropped = sorted(k for k in state if any(p.search(k) for p in patterns))
    kept: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in report.dropped:
            continue
        new = _rename(key, model.rename)
        report.renamed += new != key
        if new in kept:
            raise EncoderError(f"model.rename maps two checkpoint keys onto '{new}'; make the prefixes distinct")
        kept[new] = tensor
    expected = module.state_dict()
    report.missing = sorted(set(expected) - set(kept))
    report.unexpected = sorted(set(kept) - set(expected))
    report.loaded = len(kept) - len(report.unexpected)
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})" for k, v in kept.items()
             if k in expected and v.shape != expected[k].shape]  # fmt: skip
    if wrong:
        raise EncoderError(f"{owner}: '{model.weights}' has tensors of other shapes than the model: {_names(wrong)}; "
                           "check model.name / model.args describe the architecture the checkpoint was trained with")
    if (report.missing or report.unexpected) and model.strict:
        raise EncoderError(
            f"{owner}: '{model.weights}' does not match the model: {report.summary()}. Fix the keys with "
            "model.weights_key (the entry holding the weights), model.rename (e.g. {'module.': ''}) or model.drop_keys "
            "(regexes of checkpoint keys to discard), or accept the mismatch with model.strict: false"
        )
    module.load_state_dict({k: v for k, v in kept.items() if k in expected}, strict=False)
    if report.missing or report.unexpected:
        log.warning("%s: model.strict is false: %s", owner, report.summary())
    return report


def _rename(key: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise EncoderError(f"model.drop_keys '{pattern}' is not a valid regex: {err}") from None
