"""One encoder for vision-language models: tokens from the vision tower, the projector or the language model, in
raster order with their grid, whatever the family's tiling and token layout.

Extraction points (``model.layers``):

- an int ``i``: the output of vision-tower block ``i`` (negative counts from the end; LLaVA's projector reads
  ``-2``); per tile, the tower's patch grid;
- a module path inside the vision tower or the projector (``model.multi_modal_projector``, ``...:input`` for
  what a module receives, e.g. InternVL's pixel-shuffled projector input): mapped when its output has one row per
  patch of the tower's grid or of the projector's grid (optionally after one CLS), as ``[tiles, N, D]``,
  ``[tiles, D, h, w]`` (a conv map) or ``[tiles * N, D]``;
- a language-model layer (or the language model itself, or a module inside a layer): the image is fed with the
  family's image tokens (alone, or inside ``model.prompt`` at ``<image>``) and the hidden states at the image
  positions are returned on the projector's grid (AnyRes newline tokens and CogVLM's boi/eoi dropped);
- a vision-expert module of a CogVLM2 layer (``model.layers.<i>.mlp.vision_mlp``): it runs on the image rows only.

Models with high-resolution tiles (LLaVA-NeXT / OneVision AnyRes, InternVL dynamic tiles) have two views per
point, named by a suffix: ``<point>@base`` (the whole image at the tower's size) and ``<point>@tiles`` (the tiles
reassembled into one grid over the image). Any other point is refused with the list of valid ones.

The language model is kept only when ``model.layers`` names a language-model point; otherwise it is dropped after
loading (native classes) so extraction holds the vision tower and projector alone.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch import nn

from fmprobe.backbones.base import Encoder, EncoderOutput, InputSpec, LayerRef
from fmprobe.backbones.hf_vision import config_json, load_pretrained, read_preprocessor, torch_dtype
from fmprobe.backbones.hooks import record_outputs, split_input_suffix
from fmprobe.backbones.weights_digest import WeightsDigest
from fmprobe.backbones.vlm.families import NATIVE, REMOTE_LAYOUTS, Family, native_family, remote_family
from fmprobe.backbones.vlm.tiling import BASE, Grid
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

_INT = re.compile(r"^-?\d+$")
_REMOTE_AUTO = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel")


@dataclass(frozen=True)
class Point:
    """A resolved extraction point."""

    key: str  # str(ref) as requested
    path: str  # module path to record (":input" for a module's input)
    stage: Literal["vision", "lm", "expert"]
    view: str


class VLMEncoder(Encoder):
    """A VLM's image path as an fmprobe Encoder (see the module docstring for the extraction points)."""

    def __init__(self, model: nn.Module, family: Family, cfg: ModelConfig, *, tokenizer: Any):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.family = family
        self.name = cfg.name
        self.prompt = cfg.prompt
        self.tokenizer = tokenizer  # None when the language model was not kept
        size = family.tiling.size
        self.input_spec = InputSpec(kind="image", image_size=(size, size), mean=family.mean, std=family.std,
                                    patch_size=family.patch)  # fmt: skip
        self._digest = WeightsDigest()
        self.eval()

    # -- Encoder ------------------------------------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor, layers: list[LayerRef], attentions: bool = False) -> EncoderOutput:
        self.check_input(pixels)
        if attentions:
            raise EncoderError(f"{self.name}: attention maps are not read from VLM encoders; use a vision-tower config "
                               "(e.g. the CLIP tower alone) with fmprobe attention")  # fmt: skip
        if not layers:
            raise EncoderError(f"{self.name}: no layers requested; set model.layers")
        points = [self.resolve(ref) for ref in layers]
        param = next(self.model.parameters())
        black = torch.tensor([-m / s for m, s in zip(self.family.mean, self.family.std)])
        tiles = self.family.tiling.cut(pixels.to(device=param.device, dtype=param.dtype), black)
        pixel_inputs = self.family.pixel_inputs(tiles)
        batch = pixels.shape[0]
        paths = {p.path: p.path for p in points}
        positions = None
        with record_outputs(self.model, paths, owner=self.name) as recorded:
            if any(p.stage != "vision" for p in points):
                text, positions = self.family.text_inputs(self.tokenizer, self.prompt, batch)
                self.family.run_language(self.model, pixel_inputs, {k: v.to(param.device) for k, v in text.items()})
            else:
                self.family.run_vision(self.model, pixel_inputs)
        out = EncoderOutput(tokens={}, prefix={}, grid={})
        for p in points:
            x = recorded[p.path]
            if p.stage == "vision":
                prefix, tokens, grid = self._vision_tokens(p, x, batch)
            elif p.stage == "lm":
                prefix, (tokens, grid) = x[:, :0], self._lm_tokens(p, x, batch, positions)
            else:
                prefix, (tokens, grid) = x[:0].reshape(batch, 0, x.shape[-1]), self.family.expert_views(x, batch, p.view)
            out.tokens[p.key], out.prefix[p.key], out.grid[p.key] = tokens, prefix, (1, *grid)
        return out

    def fingerprint(self) -> str:
        family = self.family
        header = [type(self).__name__, family.kind, repr(self.input_spec), repr(family.tiling), repr(family.describe),
                  repr(self.prompt), config_json(self.model.config)]  # fmt: skip
        return self._digest(self.model, "".join(header))

    # -- extraction points --------------------------------------------------------------------------------------
    def resolve(self, ref: LayerRef) -> Point:
        """The point ``ref`` names, or an EncoderError listing the valid ones."""
        return resolve_point(self.model, self.family, ref, name=self.name, lm_kept=self.tokenizer is not None)

    def block_index(self, ref: LayerRef) -> int | None:
        """The vision-tower block a point reads (for partial unfreezing), None for other points."""
        point = self.resolve(ref)
        prefix = self.family.tower_blocks + "."
        if point.stage != "vision" or not point.path.startswith(prefix):
            return None
        return int(point.path[len(prefix) :].split(".")[0])

    @property
    def tower(self) -> nn.Module:
        return self.model.get_submodule(self.family.tower)

    # -- internals ----------------------------------------------------------------------------------------------
    def _vision_tokens(self, p: Point, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        """A tower/projector module's per-tile output -> (prefix, tokens, grid) of the point's view."""
        tiling = self.family.tiling
        n_tiles = batch * tiling.per_image
        shape = tuple(x.shape)
        if x.dim() == 4 and x.shape[0] == n_tiles:  # a conv map [tiles, D, h, w]
            x = x.flatten(2).transpose(1, 2)
        elif x.dim() == 2 and x.shape[0] % n_tiles == 0:  # rows of all tiles [tiles * N, D]
            x = x.reshape(n_tiles, -1, x.shape[-1])
        grids = [self.family.tower_grid, self.family.projector_grid]
        if x.dim() == 3 and x.shape[0] == n_tiles:
            for grid in grids:
                extra = x.shape[1] - grid[0] * grid[1]
                if extra in (0, 1):
                    tokens, out_grid = tiling.view_tokens(x[:, extra:], grid, p.view)
                    prefix = x[:, :extra].reshape(batch, tiling.per_image, extra, x.shape[-1])
                    prefix = prefix[:, tiling.base_index] if p.view == BASE else prefix[:, 0, :0]
                    return prefix, tokens, out_grid
        raise EncoderError(
            f"{self.name}: '{p.path}' outputs {shape} for {n_tiles} tile(s), not one row per patch of the "
            f"tower's grid {grids[0]} or the projector's grid {grids[1]} (optionally after one CLS); its tokens "
            f"cannot be placed on the image; {catalogue(self.model, self.family, self.tokenizer is not None)}"
        )

    def _lm_tokens(self, p: Point, x: torch.Tensor, batch: int, positions: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        if x.dim() != 3 or x.shape[0] != batch or x.shape[1] <= int(positions.max()):
            valid = catalogue(self.model, self.family, self.tokenizer is not None)
            raise EncoderError(f"{self.name}: '{p.path}' outputs {tuple(x.shape)}, not hidden states [B, L, D] over "
                               f"the {batch} sequences; {valid}")  # fmt: skip
        return self.family.lm_views(x[:, positions.to(x.device)], p.view)


# ------------------------------------------------------------------------------------------------ points


def resolve_point(model: nn.Module, family: Family, ref: LayerRef, *, name: str, lm_kept: bool) -> Point:
    """The extraction point ``ref`` names in ``model`` (see the module docstring), or an EncoderError listing the
    valid ones. ``lm_kept``: whether the language model (and its tokenizer) are there to read."""
    key = str(ref)
    body, _, view = key.strip().partition("@")
    views = family.tiling.views
    valid = catalogue(model, family, lm_kept)
    if view and view not in views:
        raise EncoderError(f"{name}: '{key}' names the view '{view}', but this model has {' and '.join(views)}; {valid}")
    if not view and len(views) > 1:
        raise EncoderError(f"{name}: '{key}' needs a view: '{body}@base' (the whole image at the tower's size) or "
                           f"'{body}@tiles' (the high-resolution tiles); {valid}")  # fmt: skip
    view = view or views[0]
    if _INT.match(body):
        n = len(model.get_submodule(family.tower_blocks))
        if not -n <= int(body) < n:
            raise EncoderError(f"{name}: block {int(body)} is out of range; {valid}")
        return Point(key, f"{family.tower_blocks}.{int(body) % n}", "vision", view)
    module, _ = split_input_suffix(body)
    stage = _stage(family, module)
    if stage not in (None, "vision") and not lm_kept:
        raise EncoderError(f"{name}: '{key}' is a language-model point but the language model was not kept; list it "
                           "in model.layers so the language model and its tokenizer are loaded")  # fmt: skip
    if module not in dict(model.named_modules()):
        close = difflib.get_close_matches(module, [n for n, _ in model.named_modules()], n=3, cutoff=0.6)
        hint = f" (close matches: {', '.join(close)})" if close else ""
        raise EncoderError(f"{name}: no module '{module}'{hint}; {valid}")
    if stage is None:
        raise EncoderError(f"{name}: '{body}' is not inside the vision tower, the projector or the language model's "
                           f"layers, so its tokens have no image positions; {valid}")  # fmt: skip
    return Point(key, body, stage, view)


def catalogue(model: nn.Module, family: Family, lm_kept: bool) -> str:
    """The valid extraction points, for error messages."""
    f = family
    n_blocks = len(model.get_submodule(f.tower_blocks))
    text = (f"valid points: vision-tower blocks 0..{n_blocks - 1} (negative counts from the end; = "
            f"{f.tower_blocks}.<i>), the tower '{f.tower}', the projector '{f.projector}'")  # fmt: skip
    if lm_kept:
        n_lm = len(model.get_submodule(f.lm_layers))
        text += f", language-model layers {f.lm_layers}.<0..{n_lm - 1}>, '{f.language_model}' (its output)"
        text += "".join(f", vision expert {f.lm_layers}.<i>.{e}" for e in f.experts)
    else:
        text += " (language-model points only when listed in model.layers)"
    text += "; or a module inside these with one row per token ('<module>:input' reads its input)"
    if len(f.tiling.views) > 1:
        text += "; each with @base or @tiles"
    return text


def _stage(family: Family, module: str) -> Literal["vision", "lm", "expert"] | None:
    def inside(root: str) -> bool:
        return module == root or module.startswith(root + ".")

    if inside(family.tower) or inside(family.projector):
        return "vision"
    if inside(family.lm_layers):
        rest = module[len(family.lm_layers) + 1 :].split(".", 1)
        if len(rest) == 2 and any(rest[1] == e or rest[1].startswith(e + ".") for e in family.experts):
            return "expert"
        return "lm"
    if module in (family.language_model, f"{family.language_model}.norm"):
        return "lm"
    return None


# ------------------------------------------------------------------------------------------------ loading


def load_vlm(source: str, cfg: ModelConfig, config: dict[str, Any]) -> VLMEncoder:
    """Load a native or remote-code VLM (``config``: its config.json) as a VLMEncoder."""
    model_type = config.get("model_type")
    dtype = torch_dtype(cfg)
    if model_type in NATIVE:
        if cfg.trust_remote_code or cfg.layout is not None:
            raise EncoderError(f"'{cfg.name}' is a native transformers '{model_type}' model: it runs no remote code; "
                               "remove model.trust_remote_code / model.layout")  # fmt: skip
        model = load_pretrained(getattr(transformers, NATIVE[model_type]), source, cfg)
        family = native_family(model, model_type, read_preprocessor(source)[0], cfg)
    else:
        model, layout = _load_remote(source, cfg, config, dtype)
        family = remote_family(model, layout, None, cfg)
    tokenizer = None
    if any(resolve_point(model, family, ref, name=cfg.name, lm_kept=True).stage != "vision" for ref in cfg.layers):
        tokenizer = _tokenizer(source, cfg)
        if model_type not in NATIVE:
            family = remote_family(model, layout, tokenizer, cfg)
    else:
        for path in family.unneeded_without_lm:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, None)
    encoder = VLMEncoder(model.eval(), family, cfg, tokenizer=tokenizer)
    for ref in cfg.layers:  # refuse a bad extraction point now, not after a long extraction
        encoder.resolve(ref)
    return encoder


def _load_remote(source: str, cfg: ModelConfig, config: dict[str, Any], dtype: torch.dtype):
    auto_map = config.get("auto_map") or {}
    if not cfg.trust_remote_code:
        raise EncoderError(
            f"'{cfg.name}' ships its own modeling code (config.json auto_map: {auto_map}); loading it runs that code "
            "on this machine. If you trust the checkpoint, set model.trust_remote_code: true"
        )
    architecture = (config.get("architectures") or [""])[0]
    layout = cfg.layout or REMOTE_LAYOUTS.get(architecture)
    if layout is None:
        raise EncoderError(
            f"'{cfg.name}' is a remote-code '{architecture}' model without a built-in layout (fmprobe knows "
            f"{', '.join(REMOTE_LAYOUTS)}); declare one in model.layout (protocol, tower, projector, language_model, "
            "lm_layers, merge, ...)"
        )
    auto = next((name for name in _REMOTE_AUTO if name in auto_map), None)
    if auto is None:
        raise EncoderError(f"'{cfg.name}': config.json auto_map {auto_map} names none of {', '.join(_REMOTE_AUTO)}")
    try:
        model = getattr(transformers, auto).from_pretrained(source, trust_remote_code=True, dtype=dtype)
    except (OSError, ValueError, ImportError) as err:
        raise EncoderError(f"cannot load the remote-code model '{cfg.name}': {err}") from None
    missing = [p for p in (layout.tower, layout.projector, layout.language_model, layout.lm_layers)
               if p not in {n for n, _ in model.named_modules()}]  # fmt: skip
    if missing:
        raise EncoderError(f"'{cfg.name}': the layout names modules the model does not have: {missing}")
    return model, layout


def _tokenizer(source: str, cfg: ModelConfig) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise EncoderError(f"'{cfg.name}': language-model points need the checkpoint's tokenizer, which cannot be "
                           f"loaded from '{Path(source)}': {err}") from None  # fmt: skip
