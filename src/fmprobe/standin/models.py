"""Tiny random models of every wrapped family, saved the way the real checkpoints are.

A recipe names real model ids (``facebook/vjepa2-vitl-fpc16-256-ssv2``, ``Salesforce/blip2-opt-2.7b``, …); here
there are no weights to download, so its stand-in run uses these instead. They go through the same loaders as
the real models (``save_pretrained`` folders, full two-tower CLIP / BLIP-2 checkpoints, native V-JEPA 2 ``.pt``
files), so a recipe that runs on them exercises everything but the weights' values.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers

from fmprobe.atomic import atomic_path
from fmprobe.train.seeding import seeded

TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)


def _built(cls: type[transformers.PreTrainedModel], config: transformers.PretrainedConfig, seed: int
           ) -> transformers.PreTrainedModel:  # fmt: skip
    """The model with its random initialisation drawn from ``seed`` (the caller's random state untouched)."""
    with seeded(seed):
        return cls(config)


def _save(model: transformers.PreTrainedModel, folder: str | Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder


def dinov2(folder: str | Path, *, hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8,
           seed: int = 0) -> Path:  # fmt: skip
    """A Dinov2Model (CLS token, ``q_proj``/``k_proj``/``v_proj`` attention)."""
    config = transformers.Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                       mlp_ratio=2, image_size=image_size, patch_size=patch)  # fmt: skip
    return _save(_built(transformers.Dinov2Model, config, seed), folder)


def vjepa2_model(*, hidden: int = 32, layers: int = 2, crop: int = 32, patch: int = 16, frames: int = 4,
                 tubelet: int = 2, seed: int = 0) -> transformers.VJEPA2Model:  # fmt: skip
    """A VJEPA2Model whose RoPE grid is ``crop``/``patch`` x ``frames``/``tubelet`` (inputs must match it)."""
    config = transformers.VJEPA2Config(
        hidden_size=hidden, num_attention_heads=2, num_hidden_layers=layers, mlp_ratio=2, crop_size=crop,
        patch_size=patch, frames_per_clip=frames, tubelet_size=tubelet, pred_hidden_size=32,
        pred_num_attention_heads=2, pred_num_hidden_layers=1, num_pooler_layers=1,
    )  # fmt: skip
    return _built(transformers.VJEPA2Model, config, seed)


def vjepa2(folder: str | Path, **sizes: int) -> Path:
    """A VJEPA2 ``save_pretrained`` folder (see :func:`vjepa2_model` for the sizes)."""
    return _save(vjepa2_model(**sizes), folder)


def native_vjepa2_state(model: transformers.VJEPA2Model, prefix: str = "module.backbone.") -> dict[str, torch.Tensor]:
    """The encoder of an HF VJEPA2Model under the native vjepa2 repository's names (fused ``attn.qkv``).

    Written independently of the loader (backbones/vjepa2_native.py maps the other way), so the loader's tests can
    check one against the other."""
    native: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for key, value in state.items():
        if not key.startswith("encoder."):
            continue
        key = key.removeprefix("encoder.")
        key = key.replace("embeddings.patch_embeddings.", "patch_embed.").replace("layernorm.", "norm.")
        key = re.sub(r"^layer\.(\d+)\.", r"blocks.\1.", key)
        key = key.replace("attention.proj.", "attn.proj.")
        qkv = re.match(r"^blocks\.(\d+)\.attention\.(query|key|value)\.(weight|bias)$", key)
        if qkv:
            if qkv.group(2) == "query":
                block, kind = qkv.group(1), qkv.group(3)
                parts = [state[f"encoder.layer.{block}.attention.{n}.{kind}"] for n in ("query", "key", "value")]
                native[f"{prefix}blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts, dim=0).clone()
            continue
        native[prefix + key] = value.clone()
    return native


def native_vjepa2(path: str | Path, **sizes: int) -> Path:
    """A native V-JEPA 2 pretraining checkpoint (``target_encoder`` as the repository saves it) at ``path``."""
    with atomic_path(path) as tmp:
        torch.save({"target_encoder": native_vjepa2_state(vjepa2_model(**sizes)), "epoch": 1}, tmp)
    return Path(path)


def videomae(folder: str | Path, *, image_size: int = 32, frames: int = 4, seed: int = 0) -> Path:
    config = transformers.VideoMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=image_size, patch_size=16,
                                         num_frames=frames, tubelet_size=2, use_mean_pooling=False)  # fmt: skip
    return _save(_built(transformers.VideoMAEModel, config, seed), folder)


def _vision(image_size: int, patch: int, layers: int) -> dict:
    return dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                image_size=image_size, patch_size=patch)  # fmt: skip


def clip(folder: str | Path, *, image_size: int = 32, patch: int = 8, layers: int = 2, seed: int = 0) -> Path:
    """A full two-tower CLIPModel checkpoint (as ``openai/clip-vit-large-patch14-336``, LLaVA's tower, is saved)."""
    config = transformers.CLIPConfig(vision_config=_vision(image_size, patch, layers), text_config=TEXT,
                                     projection_dim=16)  # fmt: skip
    return _save(_built(transformers.CLIPModel, config, seed), folder)


def blip2(folder: str | Path, *, image_size: int = 32, patch: int = 8, layers: int = 2, seed: int = 0) -> Path:
    """A full BLIP-2 checkpoint: EVA ViT vision tower (``post_layernorm`` is LAVIS' ``ln_vision``), Q-Former,
    language projection and a tiny OPT."""
    config = transformers.Blip2Config(
        # Blip2VisionConfig's default initializer_range (1e-10) leaves every vision weight ~0: the tower would
        # output the same tokens for every image, and no probe could learn anything from it
        vision_config=dict(_vision(image_size, patch, layers), initializer_range=0.02),
        qformer_config=dict(TEXT, encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                         vocab_size=100, word_embed_proj_dim=32),  # fmt: skip
        num_query_tokens=4,
    )
    return _save(_built(transformers.Blip2Model, config, seed), folder)


def qwen2_5_vl(folder: str | Path, *, seed: int = 0) -> Path:
    """A Qwen2.5-VL with a 3-block vision tower (windowed attention in blocks 0-1, full in block 2), a merger and
    a 2-layer language model, so vision blocks, merger and LM layers are all extraction points."""
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
                           window_size=56, fullatt_block_indexes=[2], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),  # fmt: skip
        text_config=dict(vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 4, 4],
                                          "rope_theta": 10000.0}),  # fmt: skip
        image_token_id=900, video_token_id=901, vision_start_token_id=902, vision_end_token_id=903,
    )  # fmt: skip
    return _save(_built(transformers.Qwen2_5_VLForConditionalGeneration, config, seed), folder)
