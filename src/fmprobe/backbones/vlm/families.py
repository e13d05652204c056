"""What fmprobe knows about each VLM family: where its parts sit, how an image (and a prompt) go in the way the
family's own processor feeds them, and where each part's tokens lie.

A :class:`Family` names three parts by module path — the vision tower (its blocks), the projector (the tokens the
language model receives) and the language model (its layers) — and answers three layout questions:

- ``pixel_inputs``: the forward() arguments carrying the image (tiles as the processor cuts them, see tiling.py);
- ``text_inputs``: the token ids with the image placeholders expanded as the processor expands them (optionally
  inside a prompt), and the positions of the image tokens;
- ``lm_views``: the hidden states at those positions -> a token grid per view (AnyRes newline tokens dropped).

Native transformers classes (LLaVA, LLaVA-NeXT, LLaVA-OneVision, InternVL) have fixed paths; remote-code models
(InternVL2's ``internvl_chat``, CogVLM2) take theirs from a declared :class:`~fmprobe.config.VLMLayoutConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fmprobe.backbones.vlm.tiling import (
    BASE,
    Grid,
    Tiling,
    anyres,
    dynamic,
    single,
)
from fmprobe.config import ModelConfig, VLMLayoutConfig
from fmprobe.errors import EncoderError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PLACEHOLDER = "<image>"  # where model.prompt puts the image
# CLS tokens of the towers the native families use (LM token counts depend on it under strategy "full")
TOWER_PREFIX = {"clip_vision_model": 1, "siglip_vision_model": 0, "internvl_vision": 1}


@dataclass
class Family:
    """Paths (in the loaded model), the tiling of the input, and the token geometry of one VLM."""

    kind: str
    tower: str  # the vision tower module
    tower_blocks: str  # its nn.ModuleList of blocks
    projector: str  # the module whose output the language model receives
    language_model: str  # the language model module (its output and final norm are points)
    lm_layers: str  # its nn.ModuleList of layers
    tiling: Tiling
    patch: int  # tower patch size (px)
    merge: int  # projector tokens per side = tower tokens per side / merge (pixel shuffle, 2x2 conv)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_token_id: int | None = None
    experts: tuple[str, ...] = ()  # vision-expert sub-modules of an LM layer (run on the image rows only)
    tower_qkv: str | None = None  # a fused q/k/v projection in the tower's blocks (declared for remote code)
    unneeded_without_lm: tuple[str, ...] = ()  # modules dropped after loading when no LM point is read
    lm_prefix: int = 0  # LM image tokens before the grid (CLS kept by strategy "full", CogVLM's boi)
    lm_suffix: int = 0  # ... and after it (CogVLM's eoi)
    describe: dict[str, Any] = field(default_factory=dict)  # settings that shape the tokens (part of the fingerprint)

    @property
    def tower_grid(self) -> Grid:
        side = self.tiling.tile // self.patch
        return side, side

    @property
    def projector_grid(self) -> Grid:
        side = self.tiling.tile // self.patch // self.merge
        return side, side

    def image_tokens(self) -> int:
        """Image-token positions per image in the language model's sequence (the grids, newlines, markers)."""
        return self.tiling.per_image * self.projector_grid[0] * self.projector_grid[1] + self.lm_prefix + self.lm_suffix

    # -- model calls ------------------------------------------------------------------------------------------
    def pixel_inputs(self, tiles: torch.Tensor) -> dict[str, Any]:
        """forward() arguments for the tower's batch ``[B, per_image, C, tile, tile]``."""
        return {"pixel_values": tiles.flatten(0, 1)}

    def run_vision(self, model: nn.Module, pixels: dict[str, Any]) -> None:
        """Run the tower and the projector (not the language model)."""
        model.model.get_image_features(**pixels)

    def run_language(self, model: nn.Module, pixels: dict[str, Any], text: dict[str, torch.Tensor]) -> None:
        model.model(**text, **pixels, use_cache=False)

    # -- text -------------------------------------------------------------------------------------------------
    def image_text(self, tokenizer: Any) -> str:
        """The processor's expansion of one image placeholder."""
        token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        return token * self.image_tokens()

    def text_inputs(self, tokenizer: Any, prompt: str | None, batch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(input_ids and attention_mask ``[batch, L]``, the positions of the image span ``[image_tokens]``)."""
        if prompt is not None and prompt.count(PLACEHOLDER) != 1:
            raise EncoderError(f"model.prompt must mark where the image goes with '{PLACEHOLDER}' exactly once, got "
                               f"{prompt.count(PLACEHOLDER)} in {prompt!r}")  # fmt: skip
        span = self.image_text(tokenizer)
        text = span if prompt is None else prompt.replace(PLACEHOLDER, span)
        ids = tokenizer(text, add_special_tokens=prompt is not None)["input_ids"]
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != self.image_tokens():
            raise EncoderError(
                f"the tokenizer turned the image placeholders into {len(positions)} image tokens instead of "
                f"{self.image_tokens()}: it does not read the image token (id {self.image_token_id}) as one token"
            )
        ids_t = torch.tensor([ids] * batch)
        return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}, torch.tensor(positions)

    def lm_views(self, hidden: torch.Tensor, view: str) -> tuple[torch.Tensor, Grid]:
        """Hidden states at the image positions ``[B, image_tokens, D]`` -> one view's tokens and grid."""
        grid = self.projector_grid
        core = hidden[:, self.lm_prefix : hidden.shape[1] - self.lm_suffix]
        if self.tiling.per_image == 1:
            return core, grid
        return self.tiling.view_tokens(core.reshape(-1, grid[0] * grid[1], core.shape[-1]), grid, view)

    def expert_views(self, rows: torch.Tensor, batch: int, view: str) -> tuple[torch.Tensor, Grid]:
        """A vision-expert module's output (image rows of all sequences) -> one view's tokens and grid."""
        raise EncoderError(f"{self.kind} models have no vision-expert modules")


class LlavaFamily(Family):
    """LLaVA-1.5: one view, the image resized to the tower's size; the projector sees block -2 (CLS dropped)."""

    def pixel_inputs(self, tiles: torch.Tensor) -> dict[str, Any]:
        return {"pixel_values": tiles[:, 0]}


class AnyResFamily(Family):
    """LLaVA-NeXT / OneVision AnyRes: base view then the tiles; the LM gets the base tokens, then the unpadded tile
    grid row by row with an ``image_newline`` token closing each row (OneVision: bilinearly shrunk first when it
    holds more than ``anyres_max`` tiles' worth of tokens)."""

    max_tiles: int | None = None  # OneVision's anyres_max_N

    def pixel_inputs(self, tiles: torch.Tensor) -> dict[str, Any]:
        sizes = torch.tensor([[self.tiling.size, self.tiling.size]] * tiles.shape[0], device=tiles.device)
        return {"pixel_values": tiles, "image_sizes": sizes}

    def _lm_tiles_grid(self) -> Grid:
        rows, cols = self.tiling.tiles_grid(self.projector_grid)
        if self.max_tiles is not None:
            side = self.projector_grid[0]
            ratio = math.sqrt(rows * cols / (self.max_tiles * side**2))
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    def image_tokens(self) -> int:
        rows, cols = self._lm_tiles_grid()
        side = self.projector_grid[0]
        return side * side + rows * (cols + 1)

    def lm_views(self, hidden: torch.Tensor, view: str) -> tuple[torch.Tensor, Grid]:
        side = self.projector_grid[0]
        if view == BASE:
            return hidden[:, : side * side], (side, side)
        rows, cols = self._lm_tiles_grid()
        grid = hidden[:, side * side :].reshape(hidden.shape[0], rows, cols + 1, hidden.shape[-1])
        return grid[:, :, :cols].reshape(hidden.shape[0], rows * cols, -1), (rows, cols)


class InternVLFamily(Family):
    """InternVL: dynamic tiles then the thumbnail, each tile's tokens pixel-shuffled 2x2 (one LM token per 2x2
    patches), the LM sequence ``<img>`` + context tokens of every tile in order + ``</img>``."""

    start_token: str = "<img>"
    end_token: str = "</img>"

    def image_text(self, tokenizer: Any) -> str:
        start = getattr(tokenizer, "start_image_token", None) or self.start_token
        end = getattr(tokenizer, "end_image_token", None) or self.end_token
        context = tokenizer.convert_ids_to_tokens(self.image_token_id)
        return start + context * self.image_tokens() + end


class InternVLChatFamily(InternVLFamily):
    """InternVL2's remote code (``InternVLChatModel``): ``extract_feature`` for the vision side, ``image_flags`` and
    ``img_context_token_id`` for the full forward."""

    def run_vision(self, model: nn.Module, pixels: dict[str, Any]) -> None:
        model.extract_feature(pixels["pixel_values"])

    def run_language(self, model: nn.Module, pixels: dict[str, Any], text: dict[str, torch.Tensor]) -> None:
        model.img_context_token_id = self.image_token_id
        flags = torch.ones(pixels["pixel_values"].shape[0], 1, dtype=torch.long, device=pixels["pixel_values"].device)
        model(**pixels, **text, image_flags=flags, use_cache=False)


class CogVLMFamily(Family):
    """CogVLM2's remote code: one view at the tower's size; the LM sequence is ``BOS``, then ``boi`` + the 2x2-conv
    grid + ``eoi`` placed at the positions whose ``token_type_ids`` are 1, then the prompt. The vision experts run
    on the image rows except the last (``eoi``), so their outputs hold ``boi`` + the grid per image."""

    def pixel_inputs(self, tiles: torch.Tensor) -> dict[str, Any]:
        return {"images": [[tile] for tile in tiles[:, 0]]}

    def run_vision(self, model: nn.Module, pixels: dict[str, Any]) -> None:
        tower = model.get_submodule(self.tower)
        tower(torch.stack([image for (image,) in pixels["images"]]))

    def run_language(self, model: nn.Module, pixels: dict[str, Any], text: dict[str, torch.Tensor]) -> None:
        model(**text, **pixels, use_cache=False)

    def text_inputs(self, tokenizer: Any, prompt: str | None, batch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if prompt is not None and PLACEHOLDER in prompt:
            raise EncoderError(f"CogVLM2 always puts the image right after BOS; give model.prompt without "
                               f"'{PLACEHOLDER}' (the text that follows the image)")  # fmt: skip
        after = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        n = self.image_tokens()
        ids = [tokenizer.bos_token_id] + [tokenizer.pad_token_id] * n + after
        types = [0] + [1] * n + [0] * len(after)
        ids_t = torch.tensor([ids] * batch)
        text = {"input_ids": ids_t, "token_type_ids": torch.tensor([types] * batch),
                "attention_mask": torch.ones_like(ids_t)}  # fmt: skip
        return text, torch.arange(1, 1 + n)

    def expert_views(self, rows: torch.Tensor, batch: int, view: str) -> tuple[torch.Tensor, Grid]:
        per_image = self.image_tokens() - self.lm_suffix  # the expert mask leaves the last image row (eoi) out
        if rows.dim() != 2 or rows.shape[0] != batch * per_image:
            raise EncoderError(f"a CogVLM vision expert should output {batch * per_image} rows (boi + grid per image), "
                               f"got {tuple(rows.shape)}")  # fmt: skip
        return rows.reshape(batch, per_image, -1)[:, self.lm_prefix :], self.projector_grid


# ------------------------------------------------------------------------------------------------ construction

NATIVE = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
          "llava_onevision": "LlavaOnevisionForConditionalGeneration", "internvl": "InternVLForConditionalGeneration"}
_NATIVE_PATHS = dict(tower="model.vision_tower", projector="model.multi_modal_projector",
                     language_model="model.language_model", lm_layers="model.language_model.layers",
                     unneeded_without_lm=("model.language_model", "lm_head"))  # fmt: skip


def _square(value: Any, key: str) -> int:
    values = value if isinstance(value, (list, tuple)) else [value]
    if len(set(values)) != 1:
        raise EncoderError(f"non-square {key} {value} is not supported")
    return int(values[0])


def _norm(processor: dict[str, Any], default: tuple[tuple[float, ...], tuple[float, ...]]) -> tuple[tuple, tuple]:
    mean, std = processor.get("image_mean", default[0]), processor.get("image_std", default[1])
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _tower_blocks(model: nn.Module, tower: str) -> str:
    """The tower's block list: the longest nn.ModuleList inside it (``encoder.layers`` / ``encoder.layer``)."""
    lists = [(len(m), name) for name, m in model.get_submodule(tower).named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise EncoderError(f"found no block list (nn.ModuleList) inside the vision tower '{tower}'")
    return f"{tower}.{max(lists)[1]}"


def native_family(model: nn.Module, model_type: str, processor: dict[str, Any], cfg: ModelConfig) -> Family:
    """The family of a loaded native transformers VLM (``model_type`` one of NATIVE)."""
    config = model.config
    vision = config.vision_config
    tile, patch = _square(vision.image_size, "image_size"), _square(vision.patch_size, "patch_size")
    paths = dict(_NATIVE_PATHS, tower_blocks=_tower_blocks(model, _NATIVE_PATHS["tower"]))
    image_token = int(config.image_token_id)
    if model_type == "internvl":
        max_tiles = int(processor.get("max_patches", 12))
        tiling = dynamic(cfg.image_size or (2 * tile if max_tiles >= 4 else tile), tile,
                         int(processor.get("min_patches", 1)), max_tiles, thumbnail=True)  # fmt: skip
        mean, std = _norm(processor, (CLIP_MEAN, CLIP_STD))  # GotOcr2ImageProcessor's defaults
        return InternVLFamily("internvl", **paths, tiling=tiling, patch=patch, merge=round(1 / config.downsample_ratio),
                              image_token_id=image_token, mean=mean, std=std,
                              describe={"tiles": (tiling.rows, tiling.cols), "feature_layer": config.vision_feature_layer})
    strategy = config.vision_feature_select_strategy
    prefix = TOWER_PREFIX.get(vision.model_type)
    mean, std = _norm(processor, (CLIP_MEAN, CLIP_STD))
    describe = {"feature_layer": config.vision_feature_layer, "strategy": strategy}
    if model_type == "llava":
        if strategy == "full" and prefix is None:
            raise EncoderError(f"LLaVA with a '{vision.model_type}' tower and strategy 'full': fmprobe does not know "
                               "whether that tower has a CLS token, so the LM image tokens cannot be placed")
        lm_prefix = prefix if strategy == "full" else 0
        return LlavaFamily("llava", **paths, tiling=single(cfg.image_size or tile, tile), patch=patch, merge=1,
                           image_token_id=image_token, mean=mean, std=std, lm_prefix=lm_prefix, describe=describe)
    if strategy == "full" and prefix != 0:
        raise EncoderError(f"AnyRes with strategy 'full' needs a tower without CLS ('{vision.model_type}' has "
                           f"{prefix if prefix is not None else 'an unknown number of'} prefix tokens)")
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    squares = sorted(h for h, w in pinpoints if h == w and h > tile)
    size = cfg.image_size or (squares[0] if squares else None)
    if size is None:
        raise EncoderError(f"no square grid pinpoint above the tower's {tile} px in {pinpoints}; set model.image_size")
    family = AnyResFamily(model_type, **paths, tiling=anyres(size, tile, pinpoints), patch=patch, merge=1,
                          image_token_id=image_token, mean=mean, std=std, describe=describe)  # fmt: skip
    if model_type == "llava_onevision":
        family.max_tiles = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
        family.describe["anyres_max"] = family.max_tiles
    family.describe["tiles"] = (family.tiling.rows, family.tiling.cols)
    return family


REMOTE_LAYOUTS: dict[str, VLMLayoutConfig] = {
    # OpenGVLab/InternVL2-* (InternVLChatModel): InternViT with fused attn.qkv, pixel shuffle 0.5, mlp1, an LLM
    "InternVLChatModel": VLMLayoutConfig(
        protocol="internvl_chat", tower="vision_model", projector="mlp1", language_model="language_model",
        lm_layers="language_model.model.layers", merge=2, tower_qkv="attn.qkv",
    ),
    # THUDM/cogvlm2-llama3-chat-19B (CogVLMForCausalLM): EVA2-CLIP with fused attention.query_key_value, a 2x2
    # stride-2 conv, the GLU linear_proj; visual experts (their own qkv, dense and MLP) in every LM layer
    "CogVLMForCausalLM": VLMLayoutConfig(
        protocol="cogvlm", tower="model.vision", projector="model.vision.linear_proj", language_model="model",
        lm_layers="model.layers", merge=2, tower_qkv="attention.query_key_value",
        experts=["mlp.vision_mlp", "self_attn.vision_expert_query_key_value", "self_attn.vision_expert_dense"],
    ),
}


def remote_family(model: nn.Module, layout: VLMLayoutConfig, tokenizer: Any, cfg: ModelConfig) -> Family:
    """The family of a loaded remote-code VLM from its declared layout."""
    config = model.config
    vision = config.vision_config if isinstance(config.vision_config, dict) else config.vision_config.to_dict()
    patch = _square(vision["patch_size"], "vision_config.patch_size")
    paths = dict(tower=layout.tower, tower_blocks=layout.tower_blocks or _tower_blocks(model, layout.tower),
                 projector=layout.projector, language_model=layout.language_model, lm_layers=layout.lm_layers,
                 experts=tuple(layout.experts), merge=layout.merge, tower_qkv=layout.tower_qkv)  # fmt: skip
    if layout.protocol == "cogvlm":
        tile = _square(vision["image_size"], "vision_config.image_size")
        return CogVLMFamily("cogvlm", **paths, tiling=single(cfg.image_size or tile, tile), patch=patch, mean=CLIP_MEAN,
                            std=CLIP_STD, lm_prefix=1, lm_suffix=1)  # fmt: skip
    tile = int(getattr(config, "force_image_size", None) or _square(vision["image_size"], "vision_config.image_size"))
    dynamic_size = getattr(config, "dynamic_image_size", True)
    max_tiles = int(getattr(config, "max_dynamic_patch", 12)) if dynamic_size else 1
    size = cfg.image_size or (2 * tile if max_tiles >= 4 else tile)
    tiling = dynamic(size, tile, int(getattr(config, "min_dynamic_patch", 1)), max_tiles,
                     thumbnail=bool(getattr(config, "use_thumbnail", True)))  # fmt: skip
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") if tokenizer is not None else None
    return InternVLChatFamily("internvl_chat", **paths, tiling=tiling, patch=patch, mean=IMAGENET_MEAN,
                              std=IMAGENET_STD, image_token_id=context,
                              describe={"tiles": (tiling.rows, tiling.cols), "select_layer": getattr(config, "select_layer", -1)})
