"""Tiny random models of every wrapped family, saved the way the real checkpoints are.

A recipe names real model ids (``facebook/vjepa2-vitl-fpc16-256-ssv2``, ``Salesforce/blip2-opt-2.7b``, …); here
there are no weights to download, so its stand-in run uses these instead. They go through the same loaders as
the real models (``save_pretrained`` folders, full two-tower CLIP / BLIP-2 checkpoints, native V-JEPA 2 ``.pt``
files), so a recipe that runs on them exercises everything but the weights' values.
"""

from __future__ import annotations

import re
from pathlib import Path

import tokenizers
import torch
import transformers

from fmprobe.atomic import atomic_path, write_json
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
        # a random Q-Former at the default initializer_range (0.02) barely looks at the image: its query outputs vary
        # ~1e-4 between images, so a head on them would read noise, and its dropout (0.1) would swamp that
        # variation in any training pass; larger weights and no dropout make the projector's tokens carry the image
        qformer_config=dict(TEXT, encoder_hidden_size=32, initializer_range=0.3, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                         vocab_size=100, word_embed_proj_dim=32),  # fmt: skip
        num_query_tokens=4,
    )
    model = _built(transformers.Blip2Model, config, seed)
    with seeded(seed + 1), torch.no_grad():  # transformers starts the query tokens at zero: all queries alike
        model.query_tokens.normal_(std=config.qformer_config.initializer_range)
    return _save(model, folder)


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



_QWEN_TEXT = dict(vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "mrope_section": [4, 4, 4], "rope_theta": 10000.0})  # fmt: skip
_QWEN_TOKENS = dict(image_token_id=900, video_token_id=901, vision_start_token_id=902, vision_end_token_id=903)


def qwen2_vl(folder: str | Path, *, seed: int = 0) -> Path:
    """A Qwen2-VL: a 3-block vision tower without windows (patch 14, 2x2 merger) and a 2-layer language model."""
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=3, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),  # fmt: skip
        text_config=_QWEN_TEXT, **_QWEN_TOKENS,
    )
    return _save(_built(transformers.Qwen2VLForConditionalGeneration, config, seed), folder)


def qwen3_vl(folder: str | Path, *, seed: int = 0) -> Path:
    """A Qwen3-VL: a 3-block vision tower (patch 16, learned positions on an 8 x 8 table, a deepstack merger after
    block 1, the 2x2 merger) and a 2-layer language model that adds the deepstack features to its first layer."""
    config = transformers.Qwen3VLConfig(
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[1]),  # fmt: skip
        text_config=dict(_QWEN_TEXT, head_dim=24, rope_parameters={"rope_type": "default", "mrope_section": [4, 4, 4],
                                                                   "mrope_interleaved": True, "rope_theta": 10000.0}),
        **_QWEN_TOKENS,
    )  # fmt: skip
    return _save(_built(transformers.Qwen3VLForConditionalGeneration, config, seed), folder)

# ------------------------------------------------------------------------------------------------ VLMs
# Every VLM stand-in has a 2-layer language model of width 48 and a word-level tokenizer whose vocabulary holds the
# family's image tokens, so prompts and image placeholders tokenize as the real processors expect.
VOCAB = 200
SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 190, "<img>": 191, "</img>": 192,
           "<IMG_CONTEXT>": 193, "<video>": 194}  # fmt: skip
WORDS = ("USER:", "ASSISTANT:", "where", "is", "the", "circle", "square", "triangle", "?", "Question:", "Answer:")
IMAGE_TOKEN_ID = SPECIAL["<image>"]
IMG_CONTEXT_ID = SPECIAL["<IMG_CONTEXT>"]


def tokenizer(folder: str | Path) -> Path:
    """A word-level tokenizer (``tokenizers``) with the special tokens of LLaVA (``<image>``) and InternVL (``<img>``,
    ``</img>``, ``<IMG_CONTEXT>``, ``<video>``) and a few prompt words; anything else reads as ``<unk>``."""
    vocab = {**SPECIAL, **{w: 10 + i for i, w in enumerate(WORDS)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )  # fmt: skip
    fast.save_pretrained(folder)
    return Path(folder)


def _text(**extra: object) -> dict:
    return dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=3, **extra)  # fmt: skip


def _clip_tower(image_size: int, patch: int, layers: int) -> dict:
    return dict(model_type="clip_vision_model", **_vision(image_size, patch, layers))


def _vlm(model: transformers.PreTrainedModel, folder: str | Path, processor_config: dict) -> Path:
    folder = _save(model, folder)
    tokenizer(folder)
    write_json(folder / "preprocessor_config.json", processor_config)
    return folder


def llava_next(folder: str | Path, *, tile: int = 64, patch: int = 8, layers: int = 3, seed: int = 0,
               onevision: bool = False, pinpoints: list[list[int]] | None = None) -> Path:  # fmt: skip
    """A LLaVA-NeXT (``onevision``: LLaVA-OneVision) with a CLIP tower taking ``tile``-px tiles (LLaVA reads block
    ``-2``), the 2-layer MLP projector, ``image_newline`` and a 2-layer LM. AnyRes grid pinpoints default to 1x2,
    2x1 and 2x2 tiles, so a ``2 * tile`` square image becomes the base view plus 2x2 high-resolution tiles."""
    pinpoints = pinpoints or [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    kwargs = dict(vision_config=_clip_tower(tile, patch, layers), text_config=_text(), image_grid_pinpoints=pinpoints,
                  image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2)  # fmt: skip
    if onevision:
        config = transformers.LlavaOnevisionConfig(**kwargs, vision_feature_select_strategy="default")
        model = _built(transformers.LlavaOnevisionForConditionalGeneration, config, seed)
    else:
        config = transformers.LlavaNextConfig(**kwargs)
        model = _built(transformers.LlavaNextForConditionalGeneration, config, seed)
    processor = {"image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": pinpoints,
                 "size": {"shortest_edge": tile}, "crop_size": {"height": tile, "width": tile},
                 "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    return _vlm(model, folder, processor)


def llava(folder: str | Path, *, tile: int = 64, patch: int = 8, layers: int = 3, seed: int = 0) -> Path:
    """A LLaVA-1.5 (one ``tile``-px view through a CLIP tower, MLP projector, 2-layer LM)."""
    config = transformers.LlavaConfig(vision_config=_clip_tower(tile, patch, layers), text_config=_text(),
                                      image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2)  # fmt: skip
    processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": tile},
                 "crop_size": {"height": tile, "width": tile}}  # fmt: skip
    return _vlm(_built(transformers.LlavaForConditionalGeneration, config, seed), folder, processor)


def internvl(folder: str | Path, *, tile: int = 64, patch: int = 8, layers: int = 3, max_tiles: int = 4,
             seed: int = 0) -> Path:  # fmt: skip
    """A native InternVL (``InternVLForConditionalGeneration``): InternViT-style tower with CLS and separate q/k/v,
    pixel shuffle 0.5 (each LM token covers 2x2 patches), projector and a 2-layer LM; dynamic tiling up to
    ``max_tiles`` tiles plus a thumbnail."""
    vision = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                  image_size=tile, patch_size=patch)  # fmt: skip
    config = transformers.InternVLConfig(vision_config=vision, text_config=_text(), image_token_id=IMG_CONTEXT_ID,
                                         image_seq_length=(tile // patch // 2) ** 2)  # fmt: skip
    processor = {"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": tile, "width": tile},
                 "crop_to_patches": True, "min_patches": 1, "max_patches": max_tiles,
                 "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}  # fmt: skip
    return _vlm(_built(transformers.InternVLForConditionalGeneration, config, seed), folder, processor)


# ------------------------------------------------------------------------------------------------ VAEs


def ltx_video_vae(folder: str | Path, *, latent_channels: int = 8, channels: tuple[int, int] = (16, 32),
                  patch: int = 4, timestep_conditioning: bool = False, seed: int = 0) -> Path:  # fmt: skip
    """A diffusers ``AutoencoderKLLTXVideo`` (the LTX-Video VAE's architecture) with two small blocks: spatial
    compression ``patch * 2`` (8 by default), one latent frame per image."""
    import diffusers

    with seeded(seed):
        model = diffusers.AutoencoderKLLTXVideo(
            latent_channels=latent_channels, block_out_channels=channels, decoder_block_out_channels=channels,
            down_block_types=("LTXVideoDownBlock3D",) * 2, layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False),
            decoder_spatio_temporal_scaling=(True, False), decoder_inject_noise=(False,) * 3,
            downsample_type=("conv", "conv"), upsample_residual=(False, False), upsample_factor=(1, 1),
            patch_size=patch, timestep_conditioning=timestep_conditioning,
        )  # fmt: skip
    model.save_pretrained(folder)
    return Path(folder)


def autoencoder_kl(folder: str | Path, *, latent_channels: int = 4, seed: int = 0) -> Path:
    """A diffusers ``AutoencoderKL`` (Stable Diffusion's image VAE) with two small blocks: spatial compression 2."""
    import diffusers

    with seeded(seed):
        model = diffusers.AutoencoderKL(
            block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=4,
        )  # fmt: skip
    model.save_pretrained(folder)
    return Path(folder)
