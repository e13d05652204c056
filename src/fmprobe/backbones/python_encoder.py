"""Any PyTorch module (``model.kind: python``): in-house models, MONAI networks, anything a function can build.

``factory: package.module:function`` is imported (the package must be importable, e.g. on PYTHONPATH) and called
with ``model.args``; it returns the ``nn.Module``. ``weights`` (optional: the factory may load its own) is a
state-dict file loaded with the report of checkpoints.py. What the module takes and returns is declared in
``model.contract`` (see ``ContractConfig``): the module's ``forward`` must return one tensor of the declared kind,
else the error names what it returned. ``-1`` is that output; ints read the blocks of ``contract.blocks``; strings
are module paths. The factory module's source is part of the fingerprint, so editing the model's code makes new
cache entries.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any

import torch
from torch import nn

from fmprobe.backbones.base import InputSpec
from fmprobe.backbones.checkpoints import load_weights
from fmprobe.backbones.hf_vision import torch_dtype
from fmprobe.backbones.hooks import record_outputs
from fmprobe.backbones.module_encoder import ModuleEncoder, Outputs
from fmprobe.config import ContractConfig, ModelConfig
from fmprobe.errors import EncoderError

RANKS = {"tokens": ("[B, N, D]", 3), "pooled": ("[B, D]", 2)}


class PythonEncoder(ModuleEncoder):
    """A module built by a user's factory, read as its contract declares."""

    no_points_hint = " (declare model.contract.blocks, the module path of its block list)"

    def __init__(self, model: nn.Module, contract: ContractConfig, **kwargs: Any):
        self.contract = contract
        super().__init__(model, **kwargs)

    def run(self, pixels: torch.Tensor, blocks: list[int], final: bool, pooled: bool) -> Outputs:
        paths = {str(i): f"{self.contract.blocks}.{i}" for i in blocks}
        with record_outputs(self.model, paths, owner=self.name) as recorded:
            result = self.model(pixels)
        self._check(result)
        return Outputs(blocks={i: (recorded[str(i)], None) for i in blocks}, final=result)

    def _check(self, result: Any) -> None:
        """The module's output must be one tensor of the contract's rank."""
        output = self.contract.output
        spatial = len(self.contract.size)
        shape, rank = RANKS.get(output, (f"[B, D, {', '.join('dhw'[-spatial:])}]", 2 + spatial))
        if isinstance(result, torch.Tensor) and result.dim() == rank:
            return
        if isinstance(result, torch.Tensor):
            got = f"a tensor shaped {tuple(result.shape)}"
        elif isinstance(result, (tuple, list)):
            inner = ", ".join(tuple(x.shape).__repr__() if isinstance(x, torch.Tensor) else type(x).__name__
                              for x in result)  # fmt: skip
            got = f"a {type(result).__name__} of {len(result)} ({inner})"
        else:
            got = f"a {type(result).__name__}"
        raise EncoderError(
            f"{self.name}: model.contract says output: {output} {shape}, but the module returned {got}; make forward "
            "return that one tensor (wrap the model in a module that picks it) or fix the contract"
        )

    def patch_grid(self, pixels: torch.Tensor) -> tuple[int, int, int] | None:
        patch = self.contract.patch_size
        if patch is None:
            return None
        grid = tuple(int(s) // p for s, p in zip(pixels.shape[-len(patch) :], patch))
        return (1, *grid) if len(grid) == 2 else grid  # type: ignore[return-value]


def load_python(model: ModelConfig) -> PythonEncoder:
    """Import and call ``model.factory``, load ``model.weights`` if given, wrap the module frozen."""
    assert model.factory is not None and model.contract is not None  # ModelConfig requires both for kind: python
    module_name, _, function = model.factory.partition(":")
    if not module_name or not function:
        raise EncoderError(f"model.factory '{model.factory}' must be 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise EncoderError(f"model.factory: cannot import '{module_name}' ({err}); put its package on PYTHONPATH or "
                           "install it") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise EncoderError(f"model.factory: '{module_name}' has no function '{function}'")
    net = factory(**model.args)
    if not isinstance(net, nn.Module):
        raise EncoderError(f"model.factory '{model.factory}' returned a {type(net).__name__}, not a torch nn.Module")
    contract = model.contract
    report = load_weights(net, model, owner=model.name) if model.weights is not None else None
    num_points = 0
    if contract.blocks is not None:
        try:
            num_points = len(net.get_submodule(contract.blocks))  # type: ignore[arg-type]
        except (AttributeError, TypeError):
            raise EncoderError(f"model.contract.blocks '{contract.blocks}' is not a list of blocks in the module"
                               ) from None
    identity = {"factory": model.factory, "args": model.args, "contract": contract.model_dump(),
                "source": _source_digest(module)}  # fmt: skip
    return PythonEncoder(net.to(torch_dtype(model)), contract, name=model.name, input_spec=contract_spec(contract),
                         num_prefix=contract.prefix_tokens, num_points=num_points, identity=identity,
                         load_report=report)  # fmt: skip


def contract_spec(contract: ContractConfig) -> InputSpec:
    if contract.input == "volume":
        d, h, w = contract.size
        return InputSpec.volume((d, h, w))
    assert contract.mean is not None and contract.std is not None  # ContractConfig requires them for images
    patch = contract.patch_size[0] if contract.patch_size else 1
    return InputSpec(kind="image", image_size=(contract.size[0], contract.size[1]), mean=tuple(contract.mean),
                     std=tuple(contract.std), patch_size=patch)  # fmt: skip


def _source_digest(module: Any) -> str:
    """sha256 of the factory module's source (empty when it has none, e.g. a compiled extension)."""
    try:
        return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()
    except (OSError, TypeError):
        return ""
