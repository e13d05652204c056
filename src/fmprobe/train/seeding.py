"""Seeding that makes a run a function of its seed without disturbing the caller's random state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run a block with torch's RNG (CPU, and the CUDA device if used) seeded; restore the outer state after."""
    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def data_generator(seed: int) -> torch.Generator:
    """A separate stream for the data order, so dropout draws never shift which samples come next."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def restart_stream(seed: int) -> None:
    """Inside a ``seeded`` block: continue from the torch stream of ``seed`` (e.g. each data-parallel process its
    own dropout stream); the block still restores the caller's state when it ends."""
    torch.manual_seed(seed)
