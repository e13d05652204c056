"""Stand-in copies of a recipe's YAML files: the same study, pointed at tiny models and stand-in data.

A recipe's ``config.yaml`` / ``sweep.yaml`` / ``gates.yaml`` name the real models and the real data layout.
:func:`standin_yaml` copies one of them with every occurrence of a real model id or path replaced by its stand-in
and with dotted keys set (small epochs, the stand-in manifest), so the stand-in run is the recipe itself and
not a second, drifting copy of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fmprobe.atomic import write_text
from fmprobe.config import read_yaml, set_path


def _replace(node: Any, replace: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {k: _replace(v, replace) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, replace) for v in node]
    if isinstance(node, str) and node in replace:
        return replace[node]
    return node


def standin_yaml(src: str | Path, dst: str | Path, *, replace: dict[str, Any] | None = None,
                 set: dict[str | tuple[str | int, ...], Any] | None = None) -> Path:  # fmt: skip
    """Copy the YAML ``src`` to ``dst``: string values equal to a key of ``replace`` are swapped for its value
    (anywhere in the tree, grids included), then each key of ``set`` is set: a dotted string (``train.epochs``)
    or a tuple of keys and list indices (``("grid", "train.lr")`` for a sweep's dotted grid key). Real ids not
    in ``replace`` are left alone, so a missed one fails loudly when the stand-in run tries to load it."""
    data = read_yaml(src, "recipe YAML") or {}
    data = _replace(data, replace or {})
    for key, value in (set or {}).items():
        set_path(data, key.split(".") if isinstance(key, str) else key, value)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_text(dst, yaml.safe_dump(data, sort_keys=False))
    return dst
