"""The torch device a config names, checked once for every place that computes (extraction, adaptation)."""

from __future__ import annotations

import torch

from fmprobe import distributed
from fmprobe.errors import ConfigError


def config_device(value: str, key: str) -> torch.device:
    """``cpu`` or ``cuda[:i]``; a GPU that is not there is an error naming ``key``, never a quiet CPU run."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ConfigError(f"{key} '{value}' is not a torch device; use cpu or cuda (cuda:0, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key} '{value}' is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is '{value}' but no CUDA GPU is available; set {key}: cpu")
    return distributed.local_device(device)  # several processes on one node: each its own GPU
