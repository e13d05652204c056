"""What a run ran on: package versions, git commit, machine. Written as env.json next to every result."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Any

_PACKAGES = ("fmprobe", "torch", "torchvision", "transformers", "timm", "open_clip_torch", "monai", "peft",
             "scikit-learn", "numpy", "pandas", "onnxruntime")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(__file__),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info(**extra: Any) -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "git_sha": _git_sha(),
        "packages": {p: _version(p) for p in _PACKAGES},
        **extra,
    }
