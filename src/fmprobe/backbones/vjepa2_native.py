"""Load a V-JEPA 2 encoder from a checkpoint written by facebookresearch/vjepa2 training.

Such a ``.pt`` file holds ``encoder`` and ``target_encoder`` state dicts (plus predictor, optimizer and
bookkeeping). We read the architecture from the weights, map the native key names onto
``transformers.VJEPA2Model`` (the same mapping as transformers' ``convert_vjepa2_to_hf.py``: fused
``attn.qkv`` split into ``query``/``key``/``value``) and load them strictly, so the rest of fmprobe
treats a custom-trained encoder (e.g. a small 3D ViT trained on OCT volumes) like a hub model.

Choices, and why:
- ``target_encoder`` (the EMA encoder) is preferred over ``encoder``: vjepa2's frozen evaluations load
  ``checkpoint_key: target_encoder`` (configs/eval/*). ``encoder`` is used only when no target encoder
  was saved (e.g. released checkpoints that keep just ``encoder``).
- Only the encoder is loaded. ``VJEPA2Model`` always builds a predictor; here it is a minimal one
  (1 layer) left at random init. Use ``model.encoder`` or ``skip_predictor=True``, never the predictor.
- The number of heads cannot be read from weights. Order: the ``model_name`` in the ``params-pretrain.yaml``
  vjepa2 writes next to its checkpoints, the ``num_heads`` argument, the released V-JEPA 2 widths
  (1024/1280/1408 -> 16/16/22), vjepa2's other factory widths (192/384/768 -> 3/6/12), else head_dim 64 (with a
  warning). A ``num_heads`` that contradicts the model name or the factories of the checkpoint's width is refused:
  it divides the width, loads, and computes another function.
- ``crop_size``/``frames_per_clip`` come from the arguments, else from ``params-pretrain.yaml``
  (``data.crop_size``, max of ``data.dataset_fpcs``), else an error. ``crop_size`` matters: the RoPE
  grid of ``VJEPA2Model`` is ``crop_size // patch_size``, so inputs must be ``crop_size`` square.
- transformers' VJEPA2Model is RoPE-only with a GELU MLP and LayerNorm eps 1e-6 (all vjepa2 factories).
  A checkpoint trained with absolute position embeddings (``use_rope: false``) or a SwiGLU MLP
  (``use_silu: true``, ``mlp.fc3`` weights) is refused rather than loaded wrongly.
"""

from __future__ import annotations

import pickle
import posixpath
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from transformers import VJEPA2Config, VJEPA2Model

from fmprobe.errors import EncoderError

CHECKPOINT_KEYS = ("target_encoder", "encoder")  # in order of preference
PARAMS_FILE = "params-pretrain.yaml"  # written by vjepa2's app/main.py next to the checkpoints
_PREFIXES = ("module.", "backbone.", "_orig_mod.")

# heads of every encoder factory in vjepa2's src/models/vision_transformer.py
_HEADS_BY_MODEL_NAME = {
    "vit_tiny": 3, "vit_small": 6, "vit_base": 12, "vit_large": 16, "vit_large_rope": 16,
    "vit_huge": 16, "vit_huge_rope": 16, "vit_giant": 16, "vit_giant_rope": 16,
    "vit_giant_xformers": 22, "vit_giant_xformers_rope": 22, "vit_gigantic": 16, "vit_gigantic_xformers": 26,
}  # fmt: skip
_WIDTH_BY_MODEL_NAME = {
    "vit_tiny": 192, "vit_small": 384, "vit_base": 768, "vit_large": 1024, "vit_large_rope": 1024,
    "vit_huge": 1280, "vit_huge_rope": 1280, "vit_giant": 1408, "vit_giant_rope": 1408,
    "vit_giant_xformers": 1408, "vit_giant_xformers_rope": 1408, "vit_gigantic": 1664, "vit_gigantic_xformers": 1664,
}  # fmt: skip
_HEADS_BY_RELEASED_WIDTH = {1024: 16, 1280: 16, 1408: 22}  # V-JEPA 2 ViT-L, ViT-H, ViT-g

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attention.proj.weight", "attn.proj.bias": "attention.proj.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}  # fmt: skip
_TOP_LEVEL = {
    "patch_embed.proj.weight": "encoder.embeddings.patch_embeddings.proj.weight",
    "patch_embed.proj.bias": "encoder.embeddings.patch_embeddings.proj.bias",
    "norm.weight": "encoder.layernorm.weight",
    "norm.bias": "encoder.layernorm.bias",
}


def load_native_vjepa2(
    checkpoint_path: str,
    *,
    crop_size: int | None = None,
    frames_per_clip: int | None = None,
    num_heads: int | None = None,
) -> VJEPA2Model:
    """Build a ``VJEPA2Model`` (eval mode) whose encoder holds the checkpoint's weights."""
    path = checkpoint_path if "://" in checkpoint_path else str(Path(checkpoint_path).expanduser())
    fs, inside = url_to_fs(path)
    checkpoint = _read_checkpoint(fs, inside, path)
    state = _encoder_state(checkpoint, path)
    params = _read_params(fs, posixpath.join(posixpath.dirname(inside), PARAMS_FILE))
    _refuse_unsupported(state, params, path)

    patch = state["patch_embed.proj.weight"]
    if patch.dim() == 5:  # video: [D, C, tubelet, p, p]
        hidden, in_chans, tubelet, patch_size = patch.shape[0], patch.shape[1], patch.shape[2], patch.shape[3]
    elif patch.dim() == 4:  # image model (num_frames=1): [D, C, p, p] -> a tubelet of 1
        hidden, in_chans, tubelet, patch_size = patch.shape[0], patch.shape[1], 1, patch.shape[2]
        state["patch_embed.proj.weight"] = patch.unsqueeze(2)
    else:
        raise EncoderError(f"{path}: patch_embed.proj.weight has shape {tuple(patch.shape)}; expected a 3D or 2D conv")
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))), default=-1)
    if depth == 0:
        raise EncoderError(f"{path}: the encoder state dict has no 'blocks.N.*' weights")
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 4 * hidden

    data = params.get("data") or {}
    model = params.get("model") or {}
    if crop_size is None:
        crop_size = data.get("crop_size")
    if frames_per_clip is None and data.get("dataset_fpcs"):
        frames_per_clip = max(data["dataset_fpcs"])
    if frames_per_clip is None and tubelet == 1:
        frames_per_clip = 1
    missing = [n for n, v in (("crop_size", crop_size), ("frames_per_clip", frames_per_clip)) if v is None]
    if missing:
        raise EncoderError(
            f"{path}: the checkpoint does not record {' and '.join(missing)} (no {PARAMS_FILE} next to it); "
            f"pass them (the crop size and frames per clip the encoder was trained with)"
        )
    if crop_size % patch_size:
        raise EncoderError(f"{path}: crop_size {crop_size} is not a multiple of the patch size {patch_size}")
    heads = _num_heads(hidden, num_heads, model.get("model_name"), path)

    config = VJEPA2Config(
        crop_size=int(crop_size),
        frames_per_clip=int(frames_per_clip),
        tubelet_size=int(tubelet),
        patch_size=int(patch_size),
        in_chans=int(in_chans),
        hidden_size=int(hidden),
        num_attention_heads=heads,
        num_hidden_layers=depth,
        mlp_ratio=_mlp_ratio(hidden, mlp_hidden),
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        layer_norm_eps=1e-6,
        # the predictor is not loaded: keep it as small as VJEPA2Model allows
        pred_hidden_size=heads * 8,
        pred_num_attention_heads=heads,
        pred_num_hidden_layers=1,
        pred_num_mask_tokens=1,
    )
    hf_model = VJEPA2Model(config)
    encoder_state = _to_hf_keys(state, hidden, path)
    expected = {k for k in hf_model.state_dict() if k.startswith("encoder.")}
    missing_keys = sorted(expected - encoder_state.keys())
    unexpected = sorted(encoder_state.keys() - expected)
    if missing_keys or unexpected:
        raise EncoderError(
            f"{path}: encoder weights do not match a {depth}-block V-JEPA 2 encoder of width {hidden}; "
            f"missing: {_short(missing_keys)}; unexpected: {_short(unexpected)}"
        )
    wanted = hf_model.state_dict()
    bad_shapes = [f"{k} {tuple(v.shape)} vs {tuple(wanted[k].shape)}" for k, v in encoder_state.items()
                  if v.shape != wanted[k].shape]  # fmt: skip
    if bad_shapes:
        raise EncoderError(f"{path}: weight shapes do not match the inferred architecture: {_short(bad_shapes)}")
    hf_model.load_state_dict(encoder_state, strict=False)
    return hf_model.eval()


def _read_checkpoint(fs: AbstractFileSystem, inside: str, path: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (a local file or any fsspec URL: ``gs://``, ``s3://`` with the filesystem's own
    credentials from the environment), read without running pickled code."""
    if not fs.isfile(inside):
        raise EncoderError(f"V-JEPA 2 checkpoint '{path}' does not exist")
    try:
        with fs.open(inside, "rb") as f:
            checkpoint = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # any other unpickling error: not a checkpoint
            raise EncoderError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
        raise EncoderError(
            f"{path}: the checkpoint holds pickled Python objects that are not loaded for safety. "
            f"If you trust the file, re-save just the weights: "
            f"torch.save({{'target_encoder': torch.load(p, weights_only=False)['target_encoder']}}, new_path)"
        ) from None
    except Exception as err:  # torch.load raises KeyError/RuntimeError/EOFError/... on a file that is not a checkpoint
        raise EncoderError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict):
        raise EncoderError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    return checkpoint


def _encoder_state(checkpoint: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    for key in CHECKPOINT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            state = {}
            for name, tensor in checkpoint[key].items():
                while name.startswith(_PREFIXES):
                    name = name[name.index(".") + 1 :]
                state[name] = tensor
            if "patch_embed.proj.weight" not in state:
                raise EncoderError(
                    f"{path}: checkpoint['{key}'] is not a ViT encoder state dict "
                    f"(no patch_embed.proj.weight; keys: {_short(sorted(state))})"
                )
            return state
    raise EncoderError(
        f"{path}: no encoder weights; expected one of {list(CHECKPOINT_KEYS)}, "
        f"the checkpoint has keys {_short(sorted(map(str, checkpoint)))}"
    )


def _read_params(fs: AbstractFileSystem, params_path: str) -> dict[str, Any]:
    if not fs.isfile(params_path):
        return {}
    try:
        params = yaml.safe_load(fs.cat_file(params_path).decode())
    except (OSError, yaml.YAMLError) as err:
        raise EncoderError(f"cannot read the training parameters '{params_path}': {err}") from None
    return params if isinstance(params, dict) else {}


def _refuse_unsupported(state: dict[str, torch.Tensor], params: dict[str, Any], path: str) -> None:
    model = params.get("model") or {}
    if any(k.endswith("mlp.fc3.weight") for k in state) or model.get("use_silu"):
        raise EncoderError(
            f"{path}: this encoder uses a SwiGLU MLP (use_silu); transformers' VJEPA2Model only has the GELU MLP"
        )
    if model.get("use_rope") is False and not str(model.get("model_name", "")).endswith("_rope"):
        raise EncoderError(
            f"{path}: this encoder was trained with absolute position embeddings (use_rope: false, V-JEPA 1 "
            f"style); transformers' VJEPA2Model uses RoPE, so it cannot reproduce it"
        )
    if "pos_embed" in state and "use_rope" not in model:
        warnings.warn(
            f"{path}: the encoder has a 'pos_embed' table and no {PARAMS_FILE} says whether it used RoPE; "
            f"loading it as a V-JEPA 2 RoPE encoder (pos_embed ignored, as vjepa2's hub loader does)",
            stacklevel=3,
        )
    state.pop("pos_embed", None)


def _factory_heads(hidden: int) -> dict[int, list[str]]:
    """The head counts vjepa2's encoder factories pair with this width, each with the factories that do."""
    heads: dict[int, list[str]] = {}
    for name, width in _WIDTH_BY_MODEL_NAME.items():
        if width == hidden:
            heads.setdefault(_HEADS_BY_MODEL_NAME[name], []).append(name)
    return heads


def _num_heads(hidden: int, num_heads: int | None, model_name: str | None, path: str) -> int:
    """The head count, checked against what records it: weights cannot (a fused qkv is ``[3 D, D]`` for any head
    count), but ``params-pretrain.yaml``'s model name fixes it, and vjepa2's factories fix it for their widths (768
    is ViT-B: 12 heads). A given ``num_heads`` that merely divides the width would load without error and compute
    another function, so a conflict is refused."""
    if model_name in _HEADS_BY_MODEL_NAME:
        recorded = _HEADS_BY_MODEL_NAME[model_name]
        if num_heads is not None and num_heads != recorded:
            raise EncoderError(f"{path}: native_num_heads {num_heads} contradicts the checkpoint's {PARAMS_FILE} "
                               f"(model_name {model_name}: {recorded} heads); remove native_num_heads")
        num_heads = recorded
    factories = _factory_heads(hidden)
    if num_heads is not None and factories and num_heads not in factories:
        known = "; ".join(f"{h} heads ({', '.join(names)})" for h, names in sorted(factories.items()))
        raise EncoderError(
            f"{path}: native_num_heads {num_heads} does not fit the checkpoint: width {hidden} is vjepa2's {known}, "
            f"so {num_heads} heads of {hidden // num_heads} would attend differently from how it was trained; "
            f"set native_num_heads to {' or '.join(map(str, sorted(factories)))} (or leave it out)")
    if num_heads is None and hidden in _HEADS_BY_RELEASED_WIDTH:
        num_heads = _HEADS_BY_RELEASED_WIDTH[hidden]
    if num_heads is None and len(factories) == 1:
        num_heads = next(iter(factories))
    if num_heads is None:
        if hidden % 64:
            raise EncoderError(f"{path}: cannot infer the number of heads for width {hidden}; pass num_heads")
        num_heads = hidden // 64
        warnings.warn(
            f"{path}: number of heads not recorded; assuming head_dim 64 ({num_heads} heads for width {hidden}). "
            f"Pass num_heads if the encoder was built otherwise",
            stacklevel=3,
        )
    if num_heads < 1 or hidden % num_heads:
        raise EncoderError(f"{path}: width {hidden} is not divisible by num_heads {num_heads}")
    return int(num_heads)


def _mlp_ratio(hidden: int, mlp_hidden: int) -> float:
    """A ratio with ``int(hidden * ratio) == mlp_hidden`` (VJEPA2MLP truncates)."""
    ratio = mlp_hidden / hidden
    return ratio if int(hidden * ratio) == mlp_hidden else (mlp_hidden + 0.5) / hidden


def _to_hf_keys(state: dict[str, torch.Tensor], hidden: int, path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = tensor
            continue
        match = _BLOCK_KEY.match(name)
        if match is None:
            unknown.append(name)
            continue
        block, part = match.groups()
        prefix = f"encoder.layer.{block}."
        if part in ("attn.qkv.weight", "attn.qkv.bias"):
            if tensor.shape[0] != 3 * hidden:
                raise EncoderError(f"{path}: {name} has {tensor.shape[0]} rows, expected 3 x {hidden}")
            kind = part.rsplit(".", 1)[1]
            for i, target in enumerate(("query", "key", "value")):
                out[f"{prefix}attention.{target}.{kind}"] = tensor[i * hidden : (i + 1) * hidden].clone()
        elif part in _BLOCK_PARTS:
            out[prefix + _BLOCK_PARTS[part]] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise EncoderError(f"{path}: encoder weights with no V-JEPA 2 counterpart: {_short(sorted(unknown))}")
    return out


def _short(items: list[str], limit: int = 12) -> str:
    if not items:
        return "none"
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
