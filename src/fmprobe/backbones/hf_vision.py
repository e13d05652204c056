"""The shared machinery of the transformers ViT-style encoders; each family module only declares its specifics.

Layer references (``model.layers``), the same for every family:

- an int ``i`` >= 0 is the raw output of block ``i`` (0-based over the transformer blocks, before any final norm);
- ``-1`` is the model's ``last_hidden_state``: after the final norm where the model applies one to all tokens
  (DINOv2, SigLIP, BLIP-2, V-JEPA 2, VideoMAE with ``use_mean_pooling: false``), the raw last block output otherwise
  (CLIP applies its ``post_layernorm`` to the pooled CLS only; VideoMAE's default ``use_mean_pooling`` has no final
  norm). So ``-1`` and ``num_blocks - 1`` differ exactly when the model has a final norm;
- other negative ints count blocks from the end (``-2`` is the raw output of the second-to-last block);
- a string of digits is read as the int; any other string is a module path inside the wrapped transformers model
  (``encoder.model.named_modules()``), read by a forward hook as the first tensor of that module's output.

Tokens come back in raster order (t, h, w) with the prefix tokens (CLS, registers) split off. Attentions, when
asked, are ``[B, heads, Q, K]`` per block, keyed ``"0"``..``str(num_blocks - 1)``, over all tokens (prefix first).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from fmprobe.backbones.base import Encoder, EncoderOutput, InputSpec, LayerRef
from fmprobe.backbones.hooks import record_outputs
from fmprobe.backbones.weights_digest import WeightsDigest
from fmprobe.config import ModelConfig
from fmprobe.errors import EncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

PREPROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
# config keys that change with how a model was saved or run, not with what it computes
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "architectures", "output_attentions", "output_hidden_states", "return_dict",
}  # fmt: skip
_INT_RE = re.compile(r"^-?\d+$")
logger = logging.getLogger(__name__)


def torch_dtype(model: ModelConfig) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[model.dtype]


def read_preprocessor(source: str | None) -> tuple[dict[str, Any], str]:
    """The source's (video) preprocessor config and where it was found; ``({}, source)`` when it has none."""
    for filename in PREPROCESSOR_FILES if source is not None else ():
        path = cached_file(source, filename, _raise_exceptions_for_missing_entries=False)
        if path is not None:
            with open(path) as f:
                return json.load(f), path
    return {}, str(source)


def normalisation(
    preprocessor: tuple[dict[str, Any], str], default: tuple[tuple[float, ...], tuple[float, ...]]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean/std from the preprocessor config when it has them, else the family's published values."""
    proc, where = preprocessor
    if "image_mean" in proc and "image_std" in proc:
        return _three(proc["image_mean"], "image_mean", where), _three(proc["image_std"], "image_std", where)
    return _three(default[0], "mean", where), _three(default[1], "std", where)


def processor_size(preprocessor: tuple[dict[str, Any], str]) -> int | None:
    """The square size the preprocessor feeds the model (its center crop, or a fixed height x width), if it says.

    DINOv2 checkpoints are the case in point: config.json says image_size 518 (the position table), while the
    published preprocessing (and most evaluations) crop to 224.
    """
    proc, where = preprocessor
    size = proc.get("crop_size") if proc.get("do_center_crop", True) else None
    if size is None and isinstance(proc.get("size"), dict) and "height" in proc["size"]:
        size = proc["size"]
    if isinstance(size, dict):
        if "height" not in size or "width" not in size:
            return None
        size = (size["height"], size["width"])
    return None if size is None else as_int(size, "crop_size", where)


def _three(value: Any, key: str, where: str) -> tuple[float, float, float]:
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise EncoderError(f"{where}: {key} must have 1 or 3 values (one per RGB channel), got {value!r}")
    return values[0], values[1], values[2]


def load_pretrained(cls: type[PreTrainedModel], source: str, model: ModelConfig, **kwargs: Any) -> PreTrainedModel:
    """``cls.from_pretrained`` that refuses a checkpoint leaving any weight at its random initialisation.

    Loading a tower from a full checkpoint (BLIP-2's vision model beside its Q-Former and language model, CLIP's
    beside its text tower) leaves the other parts' weights unused by design: instead of transformers' load report
    (a line per weight, hundreds of them) one line says how many and what they belong to. Asked for with
    ``TRANSFORMERS_VERBOSITY=info`` (or ``debug``), transformers' full report is shown as well."""
    try:
        with _load_report_summarised():
            hf_model, info = cls.from_pretrained(source, dtype=torch_dtype(model), output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise EncoderError(f"cannot load {cls.__name__} from '{source}': {err}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise EncoderError(
            f"'{source}' does not hold the weights of a {cls.__name__}: missing {len(missing)} ({shown}), "
            f"shape-mismatched {len(mismatched)}; check model.name / model.kind point at the right checkpoint"
        )
    unused = sorted(info.get("unexpected_keys") or [])
    if unused:
        logger.warning(unused_weights_summary(cls.__name__, source, unused))
    return hf_model


def unused_weights_summary(loaded: str, source: str, keys: list[str]) -> str:
    """One line for the checkpoint weights a model did not load: how many, grouped by the module they belong to."""
    parts: dict[str, int] = {}
    for key in keys:
        top = key.split(".", 1)[0]
        parts[top] = parts.get(top, 0) + 1
    listed = ", ".join(f"{name} ({n})" for name, n in sorted(parts.items(), key=lambda item: (-item[1], item[0])))
    return (f"{loaded} loaded from '{source}'; {len(keys)} weights of the checkpoint belong to other parts and were "
            f"not loaded: {listed} (TRANSFORMERS_VERBOSITY=info lists them)")


@contextmanager
def _load_report_summarised() -> Iterator[None]:
    """Silence transformers' per-weight load report unless its verbosity asks for info."""
    if hf_logging.get_verbosity() <= logging.INFO:
        yield
        return
    # a filter, not a higher level: transformers checks tensor-parallel plans (and warns, once per tower, about
    # layers "not sharded") whenever this logger's level is WARNING or above
    report = hf_logging.get_logger("transformers.modeling_utils")
    below_error = logging.Filter()
    below_error.filter = lambda record: record.levelno >= logging.ERROR  # type: ignore[method-assign]
    report.addFilter(below_error)
    try:
        yield
    finally:
        report.removeFilter(below_error)


class HFVisionEncoder(Encoder):
    """One transformers vision model behind :class:`Encoder`; subclasses set the class attributes below."""

    blocks_path: ClassVar[str]  # the nn.ModuleList of transformer blocks, e.g. "encoder.layer"
    input_name: ClassVar[str] = "pixel_values"  # the forward() argument taking the pixels
    fingerprint_prefix: ClassVar[str] = ""  # only state-dict entries under this prefix shape the output

    def __init__(self, hf_model: PreTrainedModel, *, name: str, input_spec: InputSpec, num_prefix: int):
        super().__init__()
        self.model = hf_model.requires_grad_(False)
        self.name = name
        self.input_spec = input_spec
        self.num_prefix = num_prefix
        self.num_blocks = len(self.model.get_submodule(self.blocks_path))
        self._digest = WeightsDigest()
        self.eval()  # frozen until an adaptation strategy turns gradients on

    # -- family hooks -------------------------------------------------------------------------------------------
    def forward_kwargs(self) -> dict[str, Any]:
        """Extra forward() arguments (e.g. interpolate_pos_encoding, skip_predictor)."""
        return {}

    # -- Encoder ------------------------------------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor, layers: list[LayerRef], attentions: bool = False) -> EncoderOutput:
        self.check_input(pixels)
        if not layers:
            raise EncoderError(f"{self.name}: no layers requested; set model.layers (e.g. [-1])")
        hooked: dict[str, str] = {}
        last: list[str] = []
        for ref in layers:
            key, path = str(ref), self._path_of(ref)
            if path is None:
                last.append(key)
            else:
                hooked[key] = path
        param = next(self.model.parameters())
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        with self._attention_implementation("eager" if attentions else None):
            with record_outputs(self.model, hooked, owner=self.name) as recorded:
                out = self.model(**{self.input_name: pixels}, output_attentions=attentions, **self.forward_kwargs())
        hidden = {**recorded, **{key: out.last_hidden_state for key in last}}
        grid = self.grid(pixels)
        result = EncoderOutput(tokens={}, prefix={}, grid={})
        for ref in layers:
            key = str(ref)
            result.prefix[key], result.tokens[key] = self._split(hidden[key], grid, key, hooked.get(key))
            result.grid[key] = grid
        if attentions:
            result.attentions = self._attentions(out)
        return result

    def grid(self, pixels: torch.Tensor) -> tuple[int, int, int]:
        """Token grid (t, h, w) of a checked input batch."""
        spec = self.input_spec
        t = pixels.shape[1] // spec.tubelet_size if spec.kind == "video" else 1
        return t, pixels.shape[-2] // spec.patch_size, pixels.shape[-1] // spec.patch_size

    def fingerprint(self) -> str:
        """sha256 of the config and every weight; recomputed only when a tensor changed (see weights_digest)."""
        header = type(self).__name__ + repr(self.input_spec) + config_json(self.model.config)
        return self._digest(self.model, header, self.fingerprint_prefix)

    # -- internals ----------------------------------------------------------------------------------------------
    def _path_of(self, ref: LayerRef) -> str | None:
        """Module path to hook for ``ref``; None for -1 (the model's last_hidden_state)."""
        if isinstance(ref, str) and _INT_RE.match(ref.strip()):
            ref = int(ref)
        if isinstance(ref, str):
            return ref
        if ref == -1:
            return None
        n = self.num_blocks
        if not -n <= ref < n:
            raise EncoderError(
                f"{self.name}: layer {ref} is out of range; the model has {n} blocks (0..{n - 1}, negative counts "
                f"from the end, -1 is the final output after the last norm)"
            )
        return f"{self.blocks_path}.{ref % n}"

    def _split(
        self, hidden: torch.Tensor, grid: tuple[int, int, int], key: str, path: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix [B,P,D], patch tokens [B,N,D]); a module output with no prefix (e.g. patch embeddings) has P=0."""
        n_patch = grid[0] * grid[1] * grid[2]
        if hidden.dim() == 3 and hidden.shape[1] == self.num_prefix + n_patch:
            return hidden[:, : self.num_prefix], hidden[:, self.num_prefix :]
        if hidden.dim() == 3 and hidden.shape[1] == n_patch:
            return hidden[:, :0], hidden
        where = f"module '{path}'" if path else f"layer {key}"
        raise EncoderError(
            f"{self.name}: {where} outputs shape {tuple(hidden.shape)}, not tokens [B, N, D] with N = "
            f"{self.num_prefix} prefix + {n_patch} patch tokens (grid {grid}); pick a module that outputs tokens"
        )

    def _attentions(self, out: Any) -> dict[str, torch.Tensor]:
        maps = getattr(out, "attentions", None)
        if not maps or len(maps) != self.num_blocks or any(a is None for a in maps):
            got = 0 if not maps else len([a for a in maps if a is not None])
            raise EncoderError(
                f"{self.name}: the model returned attention maps for {got} of {self.num_blocks} blocks; its attention "
                f"implementation ({self.model.config._attn_implementation}) cannot return them"
            )
        return {str(i): a for i, a in enumerate(maps)}

    @contextmanager
    def _attention_implementation(self, wanted: str | None) -> Iterator[None]:
        """Switch to ``wanted`` (eager, the only one returning attention maps) for one call, then switch back."""
        current = self.model.config._attn_implementation
        if wanted is None or wanted == current:
            yield
            return
        self.model.set_attn_implementation(wanted)
        try:
            yield
        finally:
            self.model.set_attn_implementation(current)


def config_json(config: PretrainedConfig) -> str:
    """A model config as canonical JSON without the keys that change with how it was saved or run."""
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(data, sort_keys=True, default=str)


def interpolating_image_spec(
    config: PretrainedConfig, source: str, model: ModelConfig, default_norm: tuple[tuple[float, ...], ...]
) -> InputSpec:
    """Spec of an image tower that interpolates its position embeddings, so any multiple of the patch size works.

    Size: ``model.image_size`` if set, else the preprocessor's crop, else config.json's ``image_size``.
    """
    preprocessor = read_preprocessor(source)
    patch = as_int(config.patch_size, "patch_size", source)
    size, origin = model.image_size, "model.image_size"
    if size is None:
        size, origin = processor_size(preprocessor), f"the crop size in {preprocessor[1]}"
    if size is None:
        size, origin = as_int(config.image_size, "image_size", source), f"image_size in {source}/config.json"
    if size % patch:
        raise EncoderError(f"{origin} ({size}) must be a multiple of the patch size {patch}")
    mean, std = normalisation(preprocessor, default_norm)
    return InputSpec(kind="image", image_size=(size, size), mean=mean, std=std, patch_size=patch)


def refuse_resize(family: str, native: int, model: ModelConfig, why: str) -> None:
    """Families whose positions are tied to one input size cannot honour another ``model.image_size``."""
    if model.image_size is not None and model.image_size != native:
        raise EncoderError(
            f"{family} cannot take model.image_size {model.image_size}: {why} {native}x{native}; "
            f"leave model.image_size unset (or {native}) or use a checkpoint made for that size"
        )


def as_int(value: Any, key: str, where: str) -> int:
    """A square size/patch from a config value that may be an int or an (h, w) pair."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise EncoderError(f"{where}: non-square {key} {value} is not supported")
        value = value[0]
    return int(value)

