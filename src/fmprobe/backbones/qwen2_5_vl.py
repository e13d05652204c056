"""The Qwen-VL vision towers — Qwen2.5-VL, and Qwen2-VL / Qwen3-VL the same way — (and, on request, their language
model) as an fmprobe Encoder.

Qwen's vision tower does not take images: it takes flattened patches in merge-block order plus a
``grid_thw``, and Qwen2.5-VL's blocks run on tokens permuted into attention windows. This module builds that
input from an image batch ``[B, C, H, W]`` exactly as Qwen's image processor does (the frame repeated
``temporal_patch_size`` times), and puts every extracted tensor back in raster order (t, h, w). Qwen2-VL and
Qwen3-VL (patch 16, learned positions, deepstack mergers) have no windows; everything else is shared.

Extraction points (``model.layers``):
- an int ``i``: output of vision block ``i`` (negative allowed), per patch: grid ``(1, H/14, W/14)``;
- a vision module path, ``"visual.<path>"`` (``"model.visual.<path>"`` also accepted), e.g.
  ``"visual.merger"`` (the merged tokens the LM sees, grid ``(1, H/28, W/28)``), ``"visual.blocks.3.mlp"``;
- a language-model path, ``"model.language_model.layers.<i>"`` (or ``"language_model.…"``): the image is
  fed to the LM alone, as ``<|vision_start|> <|image_pad|>*n <|vision_end|>`` with Qwen's own M-RoPE
  positions (no text prompt), and the hidden states at the ``n`` image positions are returned (grid of
  the merger). The LM is loaded only when ``model.layers`` names such a path; otherwise only the
  vision-tower weights are read from the checkpoint.

Attentions (``attentions=True``, Qwen2.5-VL): for every requested block index, the softmax(QK^T/sqrt(d))
probabilities recomputed from that block's qkv and rotary embedding, as a dense ``[B, heads, N, N]``
tensor over the block's ``N = H/14 * W/14`` patches in raster order. Window-attention blocks attend only
inside their window, so entries across windows are exactly zero.

Input size: ``model.image_size`` (default 448), which must be a multiple of patch * merge (28; Qwen3-VL: 32).
Normalisation: ``image_mean``/``image_std`` of the checkpoint's ``preprocessor_config.json``, else the
OpenAI-CLIP values Qwen's image processor defaults to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    PretrainedConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
from transformers.utils import cached_file
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.vision_utils import get_vision_window_index

from fmprobe.backbones.base import Encoder, EncoderOutput, InputSpec, LayerRef
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

DEFAULT_IMAGE_SIZE = 448
_VISION_PREFIXES = ("visual.", "model.visual.")  # hub checkpoints use the first, some re-saves the second
# model_type -> (the full model, its vision tower); Qwen2.5-VL alone has attention windows
VERSIONS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VisionTransformerPretrainedModel),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VisionTransformerPretrainedModel),
    "qwen3_vl": (Qwen3VLForConditionalGeneration, Qwen3VLVisionModel),
}


@dataclass(frozen=True)
class _Point:
    """A resolved extraction point."""

    kind: Literal["block", "vision", "lm"]
    module: nn.Module
    block: int | None = None  # for kind == "block"
    windowed: bool = True  # vision modules after the window permutation (all but patch_embed)


class QwenVisionEncoder(Encoder):
    """Qwen2-VL / 2.5-VL / 3-VL image encoder with raster-ordered tokens from blocks, vision modules and LM layers."""

    def __init__(self, model_path: str, model: ModelConfig):
        super().__init__()
        self.name = model.name
        self._model_path = model_path
        try:
            config = AutoConfig.from_pretrained(model_path)
        except (OSError, ValueError, TypeError) as err:
            raise EncoderError(f"'{model_path}' is not a readable Qwen2.5-VL checkpoint: {err}") from None
        if config.model_type not in VERSIONS:
            raise EncoderError(f"'{model_path}' is a '{config.model_type}' model, not Qwen2.5-VL ('qwen2_5_vl'), "
                               "Qwen2-VL or Qwen3-VL")  # fmt: skip
        full_class, tower_class = VERSIONS[config.model_type]
        vision = config.vision_config
        self.patch_size = int(vision.patch_size)
        self.merge = int(vision.spatial_merge_size)
        self.temporal_patch = int(vision.temporal_patch_size)
        self.window_size = getattr(vision, "window_size", None)  # Qwen2.5-VL's attention windows (px)
        self.in_channels = int(vision.in_channels)
        self._token_ids = (config.vision_start_token_id, config.image_token_id, config.vision_end_token_id)

        size = model.image_size or DEFAULT_IMAGE_SIZE
        unit = self.patch_size * self.merge
        if size % unit:
            lower, upper = max(unit, size // unit * unit), (size // unit + 1) * unit
            raise EncoderError(
                f"{self.name}: image size {size} is not a multiple of patch x merge = {unit}; "
                f"set model.image_size to {lower} or {upper}"
            )
        mean, std = _normalisation(model_path)
        self.input_spec = InputSpec(
            kind="image", image_size=(size, size), mean=mean, std=std, patch_size=self.patch_size, tubelet_size=1
        )

        dtype = getattr(torch, model.dtype)
        wants_lm = any(isinstance(ref, str) and _lm_path(ref) is not None for ref in model.layers)
        if wants_lm:
            try:
                full = full_class.from_pretrained(model_path, dtype=dtype)
            except OSError as err:
                raise EncoderError(f"cannot load the {config.model_type} model '{model_path}': {err}") from None
            self.vlm: nn.Module | None = full.model.eval()
            self.visual = self.vlm.visual
        else:
            self.vlm = None
            self.visual = _load_vision_tower(model_path, tower_class, config, dtype).eval()
        self.num_blocks = len(self.visual.blocks)
        self._fingerprint: str | None = None
        for ref in model.layers:  # refuse a bad extraction point now, not after a long extraction
            self._resolve(ref)

    # -- public API ---------------------------------------------------------------------------------

    def encode(self, pixels: torch.Tensor, layers: list[LayerRef], attentions: bool = False) -> EncoderOutput:
        self.check_input(pixels)
        if attentions and self.window_size is None:
            raise EncoderError(f"{self.name}: attention maps are recomputed for Qwen2.5-VL's tower only")
        if pixels.shape[1] != self.in_channels:
            raise EncoderError(f"{self.name} takes {self.in_channels}-channel images, got {pixels.shape[1]}")
        points = {str(ref): self._resolve(ref) for ref in layers}
        batch = pixels.shape[0]
        grid_h, grid_w = (s // self.patch_size for s in pixels.shape[-2:])
        grid_thw = torch.tensor([[1, grid_h, grid_w]] * batch, device=pixels.device)
        flat = self.patchify(pixels.to(next(self.visual.parameters()).dtype))
        if self.window_size is None:  # no windows: merge-block order is the tower's order
            window_index = torch.arange(batch * grid_h * grid_w // self.merge**2)
        else:
            window_index, _ = get_vision_window_index(
                grid_thw, spatial_merge_size=self.merge, window_size=int(self.window_size), patch_size=self.patch_size
            )
        unwindow = torch.argsort(window_index).to(pixels.device)
        shape = (batch, grid_h, grid_w)

        captured: dict[str, torch.Tensor] = {}
        probs: dict[str, torch.Tensor] = {}
        handles = []
        for key, point in points.items():
            handles.append(point.module.register_forward_hook(_capture(captured, key)))
        if attentions:
            raster = self._to_raster(torch.arange(batch * grid_h * grid_w, device=pixels.device)[:, None],
                                     unwindow, shape, windowed=True)[..., 0]  # fmt: skip
            for key, point in points.items():
                if point.kind == "block":
                    attn = self.visual.blocks[point.block].attn
                    probe = _attention_probe(probs, key, raster)
                    handles.append(attn.register_forward_pre_hook(probe, with_kwargs=True))
        try:
            if any(p.kind == "lm" for p in points.values()):
                input_ids = self._image_prompt(batch, grid_h * grid_w // self.merge**2, pixels.device)
                self.vlm(
                    input_ids=input_ids,
                    mm_token_type_ids=(input_ids == self._token_ids[1]).int(),
                    pixel_values=flat,
                    image_grid_thw=grid_thw,
                    use_cache=False,
                )
            else:
                self.visual(flat, grid_thw=grid_thw)
        finally:
            for handle in handles:
                handle.remove()

        tokens, grids = {}, {}
        for key, point in points.items():
            out = captured[key]
            if point.kind == "lm":
                tokens[key] = out[:, 1:-1]  # the image positions: between vision_start and vision_end
                grids[key] = (1, grid_h // self.merge, grid_w // self.merge)
            else:
                tokens[key], grids[key] = self._vision_tokens(key, out, unwindow, shape, point.windowed)
        prefix = {key: value[:, :0] for key, value in tokens.items()}
        return EncoderOutput(tokens=tokens, prefix=prefix, grid=grids, attentions=probs)

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B * h * w, C * temporal_patch * p * p]`` as Qwen's image processor lays it out."""
        b, c, height, width = pixels.shape
        p, m, tp = self.patch_size, self.merge, self.temporal_patch
        gh, gw = height // p, width // p
        x = pixels.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, tp, -1, -1)  # the frame repeated in time
        return x.reshape(b * gh * gw, c * tp * p * p)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(type(self).__name__.encode())
            digest.update(json.dumps([self.input_spec.image_size, self.input_spec.mean, self.input_spec.std]).encode())
            module = self.vlm if self.vlm is not None else self.visual
            digest.update(module.config.to_json_string(use_diff=False).encode())
            for name, tensor in module.state_dict().items():
                digest.update(name.encode())
                digest.update(str(tensor.dtype).encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # -- internals ----------------------------------------------------------------------------------

    def _resolve(self, ref: LayerRef) -> _Point:
        depth = len(self.visual.blocks)
        if isinstance(ref, int) or (isinstance(ref, str) and ref.lstrip("-").isdigit()):
            index = int(ref)
            if not -depth <= index < depth:
                raise EncoderError(
                    f"{self.name}: block index {index} is out of range; the vision tower has {depth} blocks"
                )
            index %= depth
            return _Point("block", self.visual.blocks[index], block=index)
        lm = _lm_path(ref)
        if lm is not None:
            if self.vlm is None:
                raise EncoderError(
                    f"{self.name}: '{ref}' is a language-model layer but only the vision tower was loaded; "
                    f"list it in model.layers so the language model is loaded"
                )
            return _Point("lm", _submodule(self.vlm.language_model, lm, ref, self.name))
        path = ref.removeprefix("model.")
        if path == "visual" or not path.startswith("visual."):
            raise EncoderError(
                f"{self.name}: extraction point '{ref}' is not a block index, a vision-tower module "
                f"('visual.<path>', e.g. 'visual.merger') or a language-model module "
                f"('model.language_model.layers.<i>')"
            )
        inner = path.removeprefix("visual.")
        return _Point("vision", _submodule(self.visual, inner, ref, self.name),
                      windowed=not (inner == "patch_embed" or inner.startswith("patch_embed.")))  # fmt: skip

    def _vision_tokens(
        self, key: str, out: torch.Tensor, unwindow: torch.Tensor, shape: tuple[int, int, int], windowed: bool
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        batch, gh, gw = shape
        patches = batch * gh * gw
        if out.dim() != 2 or out.shape[0] not in (patches, patches // self.merge**2):
            raise EncoderError(
                f"{self.name}: the output of '{key}' is shaped {tuple(out.shape)}; expected one row per patch "
                f"({patches}) or per merged patch ({patches // self.merge**2})"
            )
        if out.shape[0] == patches:
            return self._to_raster(out, unwindow, shape, windowed), (1, gh, gw)
        if windowed:
            out = out[unwindow]
        return out.reshape(batch, -1, out.shape[-1]), (1, gh // self.merge, gw // self.merge)

    def _to_raster(self, x: torch.Tensor, unwindow: torch.Tensor, shape: tuple[int, int, int], windowed: bool):
        """Per-patch rows in (window order of) merge-block order -> ``[B, h*w, D]`` in raster order."""
        batch, gh, gw = shape
        m = self.merge
        x = x.reshape(-1, m * m, x.shape[-1])
        if windowed:
            x = x[unwindow]  # window order -> merge-block order
        x = x.reshape(batch, gh // m, gw // m, m, m, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(batch, gh * gw, -1)

    def _image_prompt(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        start, image, end = self._token_ids
        ids = [start] + [image] * num_tokens + [end]
        return torch.tensor([ids] * batch, device=device)


def _capture(store: dict[str, torch.Tensor], key: str):
    def hook(module: nn.Module, args, output) -> None:
        store[key] = output[0] if isinstance(output, tuple) else output

    return hook


def _attention_probe(store: dict[str, torch.Tensor], key: str, raster: torch.Tensor):
    """A pre-hook on a vision attention module: recompute its softmax probabilities per window."""

    def hook(attn: nn.Module, args, kwargs) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        seq = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # [heads, seq, head_dim]
        batch, per_image = raster.shape
        window_order = torch.zeros(batch, attn.num_heads, per_image, per_image, device=x.device)
        bounds = kwargs["cu_seqlens"].tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            image, offset = divmod(start, per_image)
            local = slice(offset, offset + end - start)
            scores = q[:, start:end] @ k[:, start:end].transpose(-1, -2) * attn.scaling
            window_order[image, :, local, local] = scores.softmax(dim=-1)
        local_raster = raster - torch.arange(batch, device=x.device)[:, None] * per_image
        index = local_raster[:, None, :, None].expand(-1, attn.num_heads, -1, per_image)
        rows = window_order.gather(2, index)
        store[key] = rows.gather(3, local_raster[:, None, None, :].expand(-1, attn.num_heads, per_image, -1))

    return hook


def _lm_path(ref: str) -> str | None:
    """The path inside the language model, if ``ref`` names one."""
    for prefix in ("model.language_model", "language_model"):
        if ref == prefix:
            return ""
        if ref.startswith(prefix + "."):
            return ref[len(prefix) + 1 :]
    return None


def _submodule(root: nn.Module, path: str, ref: str, name: str) -> nn.Module:
    if path == "":
        raise EncoderError(f"{name}: '{ref}' is a whole model, not a layer; name a layer such as '{ref}.layers.0'")
    try:
        return root.get_submodule(path)
    except AttributeError:
        children = [n for n, _ in root.named_children()]
        raise EncoderError(f"{name}: no module '{ref}' (its parent has: {', '.join(children)})") from None


def _normalisation(model_path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = cached_file(model_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if path is not None:
        try:
            cfg = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise EncoderError(f"cannot read '{path}': {err}") from None
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _load_vision_tower(model_path: str, tower_class: type[nn.Module], config: PretrainedConfig,
                       dtype: torch.dtype) -> nn.Module:  # fmt: skip
    """Only the vision tower's weights: a 7B checkpoint's LM is never read into memory."""
    visual = tower_class._from_config(config.vision_config, dtype=dtype)
    index = cached_file(model_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        names = sorted({f for k, f in weight_map.items() if k.startswith(_VISION_PREFIXES)})
        files = [cached_file(model_path, name) for name in names]
    else:
        single = cached_file(model_path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        if single is None:
            raise EncoderError(f"'{model_path}' has no safetensors weights (model.safetensors or its index)")
        files = [single]
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                for prefix in _VISION_PREFIXES:
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = handle.get_tensor(key)
    expected = set(visual.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise EncoderError(
            f"'{model_path}': vision-tower weights do not match its config; "
            f"missing: {missing[:10] or 'none'}; unexpected: {unexpected[:10] or 'none'}"
        )
    visual.load_state_dict(state)
    return visual
