"""Read any submodule's output by its module path, with forward hooks that live for one forward pass.

Extraction points beyond the block outputs (an attention's projection, an MLP, a merger) are named by their
path in ``model.named_modules()``; a path that does not exist is refused with the nearest valid paths. A path
ending in ``:input`` reads what the module receives instead of what it returns (e.g. InternVL's projector input:
the pixel-shuffled tokens, which no module outputs).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fmprobe.errors import EncoderError


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in a module's output (a tensor, a tuple/list, or a transformers ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def resolve_module(model: nn.Module, path: str, *, owner: str) -> nn.Module:
    """``model.get_submodule(path)``, or an EncoderError naming close matches and a few valid paths."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        examples = [n for n in names if n.count(".") <= 2][:8]
        hint = f"close matches: {', '.join(close)}; " if close else ""
        raise EncoderError(
            f"{owner} has no module '{path}'; {hint}valid paths include: {', '.join(examples)} "
            f"(list them all with encoder.model.named_modules())"
        ) from None


INPUT_SUFFIX = ":input"


def split_input_suffix(path: str) -> tuple[str, bool]:
    """(module path, whether the module's input rather than its output is read)."""
    return (path[: -len(INPUT_SUFFIX)], True) if path.endswith(INPUT_SUFFIX) else (path, False)


@contextmanager
def record_outputs(model: nn.Module, paths: dict[str, str], *, owner: str) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first output tensor of each ``paths[key]`` module (its first input for ``<path>:input``) during
    the ``with`` body.

    The yielded dict is filled when the body's forward pass runs; on exit, a module that did not run, ran more than
    once, or returned no tensor is an EncoderError (its output would be ambiguous or missing).
    """
    calls: dict[str, list[Any]] = {key: [] for key in paths}
    handles = []
    try:
        for key, path in paths.items():
            module_path, reads_input = split_input_suffix(path)
            module = resolve_module(model, module_path, owner=owner)
            if reads_input:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, kwargs, key=key: calls[key].append(list(args) + list(kwargs.values())),
                    with_kwargs=True))  # fmt: skip
            else:
                handles.append(module.register_forward_hook(lambda _m, _args, out, key=key: calls[key].append(out)))
        recorded: dict[str, torch.Tensor] = {}
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
    for key, path in paths.items():
        if not calls[key]:
            raise EncoderError(f"{owner}: module '{path}' did not run during the forward pass; pick one that does")
        if len(calls[key]) > 1:
            raise EncoderError(
                f"{owner}: module '{path}' ran {len(calls[key])} times in one forward pass, so its output is "
                f"ambiguous; pick a module that runs once (e.g. one block rather than a shared submodule)"
            )
        tensor = first_tensor(calls[key][0])
        if tensor is None:
            raise EncoderError(f"{owner}: module '{path}' returned no tensor ({type(calls[key][0]).__name__})")
        recorded[key] = tensor
