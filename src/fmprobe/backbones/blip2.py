"""BLIP-2: its EVA-CLIP vision tower, and from a full checkpoint the projector that feeds the language model.

Extraction points (``model.layers``) beyond the tower's (see hf_vision: ``-1`` is after ``post_layernorm``, LAVIS'
``ln_vision``, which is exactly what the Q-Former reads):

- ``qformer``: the Q-Former's output for the learned query tokens, ``[B, num_query_tokens, qformer hidden]``
  (32 x 768 for the released checkpoints): ``Blip2Model.get_qformer_features``;
- ``language_projection``: those tokens through the language projection, ``[B, num_query_tokens, LM hidden]``
  (32 x 2560 for OPT-2.7B): the image tokens the language model reads (``Blip2Model.forward``'s step 3).

Query tokens are a set, not a patch grid: their grid is ``None`` (see ``base.spatial_grid``), so mean pooling and
attentive heads take them while spatial probes, ``features.token_grid`` and heatmaps refuse them. The projector
(query tokens, Q-Former, language projection) is loaded only when ``model.layers`` names one of these points, from
a full checkpoint's safetensors (sharded or not); the language model is never built. It hangs under the tower as
the module ``projector`` (``projector.query_tokens``, ``projector.qformer``, ``projector.language_projection``), so
``adapt.modules: {projector: {lr: ...}}`` trains it in its own parameter group and the tower's fingerprint covers
its weights.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel
from transformers.utils import cached_file

from fmprobe.backbones.base import EncoderOutput, LayerRef
from fmprobe.backbones.clip_siglip import InterpolatingImageEncoder
from fmprobe.backbones.hf_vision import (
    CLIP_MEAN,
    CLIP_STD,
    config_json,
    interpolating_image_spec,
    load_pretrained,
    torch_dtype,
)
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

PROJECTOR_POINTS = ("qformer", "language_projection")
_PROJECTOR_KEYS = ("query_tokens", "language_projection.weight", "language_projection.bias")


class Blip2Projector(nn.Module):
    """Query tokens cross-attending to the tower's tokens in the Q-Former, then the language projection.

    Kept in float32 like transformers keeps ``query_tokens`` and ``qformer`` (``_keep_in_fp32_modules``); the
    Q-Former's output is cast back to the tower's dtype before the projection, as ``Blip2Model.forward`` does."""

    def __init__(self, query_tokens: torch.Tensor, qformer: Blip2QFormerModel, language_projection: nn.Linear):
        super().__init__()
        self.query_tokens = nn.Parameter(query_tokens)
        self.qformer = qformer
        self.language_projection = language_projection

    def forward(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_embeds`` = the tower's ``last_hidden_state`` (CLS first) -> (Q-Former output, projected)."""
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        output = self.qformer(query_embeds=query, encoder_hidden_states=image_embeds, encoder_attention_mask=mask,
                              return_dict=True).last_hidden_state  # fmt: skip
        return output, self.language_projection(output.to(image_embeds.dtype))


class Blip2ImageEncoder(InterpolatingImageEncoder):
    """One CLS prefix token; layer -1 is after the tower's ``post_layernorm``; ``qformer`` and
    ``language_projection`` are the projector's points (full checkpoints, loaded when asked for)."""

    @classmethod
    def from_pretrained(cls, source: str, model: ModelConfig, *, name: str, full_model: bool) -> Blip2ImageEncoder:
        wants_projector = any(str(ref) in PROJECTOR_POINTS for ref in model.layers)
        if full_model:
            # a full BLIP-2 checkpoint stores the tower under "vision_model."; without the mapping transformers
            # would leave every vision weight random (load_pretrained refuses that anyway)
            config = Blip2Config.from_pretrained(source)
            hf_model = load_pretrained(Blip2VisionModel, source, model, config=config.vision_config,
                                       key_mapping={r"^vision_model\.": ""})  # fmt: skip
            if wants_projector:
                hf_model.projector = load_projector(source, model, config)
        elif wants_projector:
            raise EncoderError(
                f"model.layers names {', '.join(PROJECTOR_POINTS)} points, but '{source}' holds BLIP-2's vision "
                "tower alone (model_type blip_2_vision_model); give the full BLIP-2 checkpoint (e.g. "
                "Salesforce/blip2-opt-2.7b) or read a tower layer (e.g. -1)"
            )
        else:
            hf_model = load_pretrained(Blip2VisionModel, source, model)
        spec = interpolating_image_spec(hf_model.config, source, model, (CLIP_MEAN, CLIP_STD))
        return cls(hf_model, name=name, input_spec=spec, num_prefix=1)

    @property
    def projector(self) -> Blip2Projector | None:
        return getattr(self.model, "projector", None)

    def encode(self, pixels: torch.Tensor, layers: list[LayerRef], attentions: bool = False) -> EncoderOutput:
        wanted = [str(ref) for ref in layers if str(ref) in PROJECTOR_POINTS]
        if not wanted:
            return super().encode(pixels, layers, attentions)
        if self.projector is None:
            raise EncoderError(f"{self.name}: {', '.join(wanted)} points need the projector, which was not loaded "
                               f"(model.layers must name them when the encoder is built)")  # fmt: skip
        tower = [ref for ref in layers if str(ref) not in PROJECTOR_POINTS]
        out = super().encode(pixels, tower + ([] if "-1" in map(str, tower) else [-1]), attentions)
        image_embeds = torch.cat([out.prefix["-1"], out.tokens["-1"]], dim=1)
        if "-1" not in map(str, tower):
            for part in (out.tokens, out.prefix, out.grid):
                del part["-1"]
        queries, projected = self.projector(image_embeds)
        for key, tokens in zip(PROJECTOR_POINTS, (queries, projected)):
            if key in wanted:
                out.tokens[key], out.prefix[key], out.grid[key] = tokens, tokens[:, :0], None
        return out

    def fingerprint(self) -> str:
        """The tower's fingerprint, with the projector's config and weights when it is loaded."""
        projector = self.projector
        if projector is None:
            return super().fingerprint()
        header = type(self).__name__ + repr(self.input_spec) + config_json(self.model.config)
        return self._digest(self.model, header + config_json(projector.qformer.config), self.fingerprint_prefix)


def load_projector(source: str, model: ModelConfig, config: Blip2Config) -> Blip2Projector:
    """Query tokens, Q-Former and language projection of a full checkpoint (never its language model), or an
    EncoderError saying what to read instead when the checkpoint lacks them."""
    tensors = _checkpoint_tensors(source, _PROJECTOR_KEYS)
    missing = [key for key in _PROJECTOR_KEYS if key not in tensors]
    if missing:
        raise EncoderError(
            f"'{source}' holds no {', '.join(missing)}: it is not a full BLIP-2 checkpoint with a projector "
            f"(Blip2Model / Blip2ForConditionalGeneration saved with save_pretrained); remove the "
            f"{', '.join(PROJECTOR_POINTS)} points from model.layers (read a tower layer, e.g. -1) or give such a "
            "checkpoint"
        )
    # the Q-Former stays in float32 whatever model.dtype says, as transformers keeps it (_keep_in_fp32_modules)
    qformer = load_pretrained(Blip2QFormerModel, source, model.model_copy(update={"dtype": "float32"}),
                              config=config.qformer_config, key_mapping={r"^qformer\.": ""})  # fmt: skip
    weight = tensors["language_projection.weight"]
    projection = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch_dtype(model))
    with torch.no_grad():
        projection.weight.copy_(weight)
        projection.bias.copy_(tensors["language_projection.bias"])
    projector = Blip2Projector(tensors["query_tokens"].float(), qformer, projection)
    return projector.requires_grad_(False)


def _checkpoint_tensors(source: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The named tensors a checkpoint holds (model.safetensors, or the shards model.safetensors.index.json maps)."""
    index = _cached(source, "model.safetensors.index.json")
    if index is not None:
        with open(index) as f:
            weight_map: dict[str, Any] = json.load(f)["weight_map"]
        shards = {weight_map[key] for key in keys if key in weight_map}
    else:
        if _cached(source, "model.safetensors") is None:
            raise EncoderError(f"'{source}' has no model.safetensors (nor model.safetensors.index.json): the projector "
                               "is read from safetensors; re-save the checkpoint with save_pretrained")  # fmt: skip
        shards = {"model.safetensors"}
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(shards):
        path = _cached(source, shard)
        if path is None:
            raise EncoderError(f"'{source}': the shard {shard} listed in model.safetensors.index.json is missing")
        with safe_open(path, framework="pt") as f:
            stored = set(f.keys())
            found.update({key: f.get_tensor(key) for key in keys if key in stored})
    return found


def _cached(source: str, filename: str) -> str | None:
    return cached_file(source, filename, _raise_exceptions_for_missing_entries=False)
