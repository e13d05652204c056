"""Reading the diagnostics' output files (spatial.json, alignment.json, pair.json) back, given the file or its folder,
and what a spatial.json says about itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmprobe.errors import ConfigError, FmprobeError


def read_output(path: str | Path, name: str) -> dict[str, Any]:
    """A diagnostics output file (``name``), given as the file or the folder holding it."""
    path = Path(path).expanduser()
    file = path / name if path.is_dir() else path
    try:
        return json.loads(file.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read '{file}': {err.strerror}; give the {name} a command wrote, or its folder"
                          ) from None
    except json.JSONDecodeError as err:
        raise FmprobeError(f"'{file}' is not valid JSON: {err}") from None


def data_kind(spatial: dict[str, Any]) -> str:
    """``still`` or ``moving`` (clips)."""
    return "still" if spatial.get("frames") is None else "moving"


def model_of(spatial: dict[str, Any]) -> str:
    """The model a spatial.json measured (its label; the encoder's name in files without one)."""
    return spatial.get("model") or spatial["encoder"]
