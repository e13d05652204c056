"""Several processes, one run: what `torchrun` / `accelerate launch` set up, and the few collectives fmprobe needs.

A launcher starts N copies of `fmprobe run|extract CONFIG` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in their environment. :func:`init` joins them into one process group (gloo for CPU tensors and
Python objects, plus NCCL for CUDA tensors when the run trains on a GPU); without a launcher (or with one
process) it does nothing and every helper below answers as the single process: rank 0 of 1, gathers of one.

Work is split deterministically (contiguous blocks, or round-robin over a stable order) so that every process
knows which items every other one holds and results can be put back in single-process order.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fmprobe.errors import ConfigError

T = TypeVar("T")


def launched() -> bool:
    """True when a launcher asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(*, cuda: bool = False) -> None:
    """Join the launcher's process group (idempotent; a no-op for one process).

    ``cuda``: the run trains on CUDA tensors, so add an NCCL backend and bind this process to its local GPU.
    """
    if not launched() or dist.is_initialized():
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; start several processes "
            "with `torchrun --nproc_per_node N -m fmprobe ...` or `accelerate launch --num_processes N -m fmprobe ...`"
        )
    backend = "gloo"
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError("adapt.device is cuda but no CUDA GPU is available; set adapt.device: cpu")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)
    atexit.register(_finish)


def _finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this process's own GPU (LOCAL_RANK) when several processes share a node."""
    if device.type == "cuda" and device.index is None and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def describe() -> dict[str, Any]:
    """What env.json records about the process group (nothing for a single process)."""
    if not active():
        return {}
    return {"distributed": {"world_size": world_size(), "backend": str(dist.get_backend())}}


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every process (others pass anything, e.g. None)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every process's ``obj``, in rank order, on every process (also a barrier)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def block(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """This process's contiguous part of ``range(n)``: sizes differ by at most one, earlier ranks first."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    size, extra = divmod(n, w)
    start = r * size + min(r, extra)
    return range(start, start + size + (r < extra))


def round_robin(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """This process's items of ``range(n)`` when item i goes to rank ``i % world``."""
    return range(rank() if rank_ is None else rank_, n, world_size() if world is None else world)


def gather_blocks(part: Sequence[T]) -> list[T]:
    """Concatenate every process's :func:`block` results back into one list in the original order."""
    return [item for chunk in all_gather_object(list(part)) for item in chunk]


def gather_round_robin(part: Sequence[T]) -> list[T]:
    """Put every process's :func:`round_robin` results back in the original order, on every process."""
    return interleave(all_gather_object(list(part)))


def interleave(parts: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of round-robin dealing: ``parts[r]`` holds items r, r + W, ...; returns items 0, 1, 2, ..."""
    total = sum(len(p) for p in parts)
    return [parts[i % len(parts)][i // len(parts)] for i in range(total)]
