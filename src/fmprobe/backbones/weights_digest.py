"""The weights half of an encoder's fingerprint: a sha256 over a header and every tensor of a state dict.

Hashing a large model takes seconds, so the digest is memoised and recomputed only when a tensor changed
(torch version counters and storage pointers move on every in-place update or reassignment).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class WeightsDigest:
    """``digest(module, header, prefix)``: sha256 of ``header`` and the state-dict entries under ``prefix``."""

    def __init__(self) -> None:
        self._memo: tuple[str, tuple[int, ...], str] | None = None

    def __call__(self, module: nn.Module, header: str, prefix: str = "") -> str:
        state = {k: v for k, v in module.state_dict(keep_vars=True).items() if k.startswith(prefix)}
        versions = tuple(x for t in state.values() for x in (t._version, t.data_ptr()))
        if self._memo is not None and self._memo[:2] == (header, versions):
            return self._memo[2]
        digest = hashlib.sha256(header.encode())
        for key, tensor in state.items():
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        self._memo = (header, versions, digest.hexdigest())
        return self._memo[2]
