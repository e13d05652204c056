"""Tiny remote-code VLMs shaped like CogVLM2 and InternVL2, written to disk as the real checkpoints are: the
package's own ``configuration_*.py`` / ``modeling_*.py`` (remote_code/), a config.json whose ``auto_map`` names
them, safetensors weights and a tokenizer. Loading one runs its code, so fmprobe loads them only with
``model.trust_remote_code: true`` — exactly the path the real InternVL2 and CogVLM2 checkpoints take.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import transformers
from safetensors.torch import save_model

from fmprobe.atomic import write_json
from fmprobe.standin.models import VOCAB, tokenizer
from fmprobe.train.seeding import seeded

CODE = Path(__file__).resolve().parent / "remote_code"


def _package(folder: str | Path, code: str, config: dict[str, Any], auto: str, seed: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for source in sorted((CODE / code).glob("*.py")):
        shutil.copyfile(source, folder / source.name)
    write_json(folder / "config.json", config)
    loaded = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    with seeded(seed):
        model = getattr(transformers, auto).from_config(loaded, trust_remote_code=True)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer(folder)
    return folder


def cogvlm2(folder: str | Path, *, image_size: int = 128, patch: int = 8, layers: int = 3, seed: int = 0) -> Path:
    """A CogVLM2-shaped model: EVA2-CLIP tower on ``image_size`` px (``patch`` px patches, CLS), 2x2 conv + GLU
    projector, a 2-layer LM with vision experts (their own qkv, dense and MLP)."""
    vision = dict(image_size=image_size, patch_size=patch, in_channels=3, hidden_size=32, num_heads=2,
                  num_hidden_layers=layers, intermediate_size=64, hidden_act="gelu", layer_norm_eps=1e-6,
                  num_positions=(image_size // patch) ** 2 + 1, scaling_factor=8.0)  # fmt: skip
    config = dict(model_type="cogvlm2", architectures=["CogVLMForCausalLM"], vocab_size=VOCAB, hidden_size=48,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, vision_config=vision,
                  auto_map={"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                            "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"})  # fmt: skip
    return _package(folder, "cogvlm2", config, "AutoModelForCausalLM", seed)


def internvl2(folder: str | Path, *, tile: int = 64, patch: int = 8, layers: int = 3, max_tiles: int = 4,
              seed: int = 0) -> Path:  # fmt: skip
    """An InternVL2-shaped ``InternVLChatModel``: InternViT (CLS, fused ``attn.qkv``, layer scales) on ``tile``-px
    tiles, pixel shuffle 0.5, ``mlp1``, a 2-layer Llama; dynamic tiling up to ``max_tiles`` plus a thumbnail."""
    vision = dict(image_size=tile, patch_size=patch, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                  num_hidden_layers=layers)  # fmt: skip
    llm = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, architectures=["LlamaForCausalLM"])  # fmt: skip
    config = dict(model_type="internvl_chat", architectures=["InternVLChatModel"], vision_config=vision, llm_config=llm,
                  force_image_size=tile, downsample_ratio=0.5, select_layer=-1, ps_version="v2",
                  dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=max_tiles,
                  auto_map={"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"})  # fmt: skip
    return _package(folder, "internvl2", config, "AutoModel", seed)
