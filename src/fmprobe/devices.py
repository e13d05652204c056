"""The torch device a config names, checked once for every place that computes (extraction, adaptation); the CPU
threads of work too small to share, and of the extraction's reading beside an encoder that has the cores."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

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


@contextmanager
def head_threads(tokens: bool) -> Iterator[None]:
    """Torch CPU threads for training a head on cached features, the caller's count restored after.

    Heads on pooled features are small tensors: extra threads only add synchronisation (a sweep benchmark: 6 s with
    1 thread, 36 s with 2 on 2 busy cores), so they run on one. Heads on tokens (attentive) have kernels large enough
    to share: they keep the process's threads (the demo's training: 16.7 s with its attentive fits on 2 threads, 20.2 s
    on 1). A sweep already gives each worker process its share of the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads if tokens else 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_torch_thread_here() -> None:
    """This thread's torch CPU ops on one thread, every other thread's count left alone: the prefetch thread's
    decoding and preprocessing would otherwise start an OpenMP team of its own, whose threads compete with the
    encoder's for the same cores.

    ``torch.set_num_threads`` cannot do it: called from any thread, it sets the count of every thread that has not
    asked for its own yet (the encoder's and training's, once). OpenMP's count is per thread; torch sets this
    thread's from the process count on its first call, so that call comes first, then OpenMP's own setter."""
    torch.get_num_threads()
    threadpool_limits(1, user_api="openmp")
