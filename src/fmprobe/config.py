"""Experiment configuration: YAML -> validated pydantic models.

Unknown keys are errors (``extra="forbid"``) and every error names the key path, the bad value and,
where there is a fixed set, the valid choices. Every field here is honoured by the code; an option
that cannot be honoured raises instead of falling back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fmprobe.errors import ConfigError

TaskType = Literal["binary", "multiclass", "multilabel", "regression"]

METRICS_BY_TASK: dict[str, tuple[str, ...]] = {
    "binary": ("auroc", "ap", "f1", "accuracy", "balanced_accuracy"),
    "multiclass": ("balanced_accuracy", "accuracy", "macro_f1", "auroc_ovr"),
    "multilabel": ("map", "macro_auroc", "macro_f1"),
    "regression": ("r2", "mae", "rmse", "pearson_r"),
}
PRIMARY_METRIC: dict[str, str] = {
    "binary": "auroc",
    "multiclass": "balanced_accuracy",
    "multilabel": "map",
    "regression": "r2",
}
# metrics reported per target (regression: ``r2/age``) or per label (multilabel: ``ap/c1``), any of which can rank
PER_TARGET_METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("r2", "mae", "rmse", "pearson_r"),
    "multilabel": ("ap", "auroc", "f1"),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WindowConfig(Strict):
    """CT/MR intensity window: values outside [center - width/2, center + width/2] are clipped."""

    center: float
    width: float = Field(gt=0)


# CT windows as (center, width) in HU: the usual radiology presets
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}


class IntensityConfig(Strict):
    """How a volume's intensities become model input, computed on the whole (resampled) volume with MONAI.

    CT: a HU window (``window: brain`` ... or ``range: [lo, hi]``) mapped to [0, 1], clipped. MR: clipped to the
    ``percentiles`` of the foreground (voxels > 0), then ``scale: zscore`` (mean 0, sd 1 within the foreground,
    background 0: MONAI's NormalizeIntensity(nonzero=True), what 3D MR networks expect) or ``scale: unit`` (the
    clipped range mapped to [0, 1], what image and video encoders take before their own mean/std).
    """

    modality: Literal["ct", "mr"]
    window: Literal["brain", "subdural", "lung", "mediastinum", "abdomen", "bone"] | None = None
    range: list[float] | None = None  # CT: [lo, hi] in HU
    percentiles: list[float] | None = None  # MR: [lo, hi] percentiles of the foreground (default [0.5, 99.5])
    scale: Literal["zscore", "unit"] | None = None  # MR only (default zscore)

    @model_validator(mode="after")
    def _check(self) -> "IntensityConfig":
        if self.modality == "ct":
            if self.percentiles is not None or self.scale is not None:
                raise ValueError("percentiles and scale are MR settings; a CT volume takes window or range")
            if (self.window is None) == (self.range is None):
                raise ValueError(f"CT intensity needs exactly one of window ({', '.join(CT_WINDOWS)}) or "
                                 "range: [lo, hi] in HU")
            if self.range is not None and (len(self.range) != 2 or self.range[0] >= self.range[1]):
                raise ValueError(f"range must be [lo, hi] with lo < hi (HU), got {self.range}")
            return self
        if self.window is not None or self.range is not None:
            raise ValueError("window and range are CT settings; an MR volume takes percentiles and scale")
        if self.percentiles is None:
            self.percentiles = [0.5, 99.5]
        if self.scale is None:
            self.scale = "zscore"
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must be [lo, hi] with 0 <= lo < hi <= 100, got {self.percentiles}")
        return self

    def hu_range(self) -> tuple[float, float]:
        """CT: the HU interval mapped to [0, 1]."""
        if self.range is not None:
            return self.range[0], self.range[1]
        center, width = CT_WINDOWS[str(self.window)]
        return center - width / 2, center + width / 2


class AugmentConfig(Strict):
    """Training-time augmentation of end-to-end strategies (frozen features are extracted without any).

    Unset values are resolved from the data (and written to config.resolved.yaml): image and video ``crop_scale``
    1.14 (resize to 1.14x the input size, then a random crop) and ``hflip`` true; volumes ``crop_scale`` 1 and
    ``hflip`` false, so voxel size and left/right stay as scanned; ``data.laterality: true`` forbids hflip.
    """

    crop_scale: float | None = Field(default=None, ge=1)
    hflip: bool | None = None


class DataConfig(Strict):
    manifest: str
    root: str | None = None  # base for relative paths in the manifest (default: the manifest's folder)
    kind: Literal["image", "video", "volume"] = "image"
    id_column: str = "sample_id"
    path_column: str = "path"
    group_column: str | None = "group"
    split_column: str | None = "split"
    # video / slice-stack sampling
    frames_per_clip: int = Field(default=16, ge=1)
    frame_step: int = Field(default=1, ge=1)
    clip_position: Literal["center", "uniform", "random"] = "center"
    num_clips: int = Field(default=1, ge=1)
    # per-row window in a long video (or slice stack): the column's integer is the clip's first frame (slice)
    clip_start_column: str | None = None
    # volumes: a slice stack fed like a video, or single 2D slices (axis, index or "middle")
    volume_mode: Literal["stack", "slices"] = "stack"
    slice_axis: int = Field(default=2, ge=0, le=2)
    window: WindowConfig | None = None
    # volumes, through MONAI on the whole volume before slices or slabs are taken: resampling to a voxel size in mm
    # (RAS+ axes x, y, z), an intensity preset, a crop to the foreground's bounding box
    spacing: list[float] | None = None
    intensity: IntensityConfig | None = None
    crop_foreground: bool = False
    laterality: bool = False  # left/right carries meaning (a label, a side): no flips, in training or test time
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    on_error: Literal["raise", "skip"] = "raise"
    num_workers: int = Field(default=0, ge=0)
    mask_column: str | None = None  # label-mask path per row (PNG/.npy, 0 = background; empty = none): segmentation

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        volume_only = {"spacing": self.spacing, "intensity": self.intensity, "crop_foreground": self.crop_foreground}
        given = [k for k, v in volume_only.items() if v not in (None, False)]
        if given and self.kind != "volume":
            raise ValueError(f"{', '.join(given)} apply to volumes (data.kind: volume), data.kind is {self.kind}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be three positive voxel sizes in mm (x, y, z), got {self.spacing}")
        if self.intensity is not None and self.window is not None:
            raise ValueError("window and intensity both map intensities; keep one (for volumes, intensity: "
                             "{modality: ct, range: [lo, hi]} is the window as a range)")
        if self.laterality and self.augment.hflip:
            raise ValueError("augment.hflip: true mirrors left and right, but laterality: true says they carry "
                             "meaning; remove one of them")
        if self.augment.hflip is None:
            self.augment.hflip = self.kind != "volume" and not self.laterality
        if self.augment.crop_scale is None:
            self.augment.crop_scale = 1.0 if self.kind == "volume" else 1.14
        if self.num_clips > 1 and self.clip_position != "uniform":
            raise ValueError(
                f"num_clips: {self.num_clips} needs clip_position: uniform (got '{self.clip_position}')"
            )
        if self.clip_start_column is not None:
            if self.kind == "image":
                raise ValueError("clip_start_column picks a window in a video or slice stack; data.kind is image")
            if self.clip_position != "center" or self.num_clips != 1:
                raise ValueError(
                    f"clip_start_column '{self.clip_start_column}' fixes each row's one clip (frames_per_clip frames "
                    f"from the row's start, every frame_step-th), so clip_position: {self.clip_position} / "
                    f"num_clips: {self.num_clips} cannot apply; remove them (or give one row per clip)"
                )
        return self


class TaskConfig(Strict):
    type: TaskType
    targets: list[str] = Field(min_length=1)
    class_names: list[str] | None = None  # multiclass: labels in the target column, in order
    # the metric that picks epochs, heads and leaderboard ranks; regression / multilabel also ``<metric>/<target>``
    primary_metric: str | None = None
    # regression: ``mask`` lets a target cell be empty; each target then trains and is evaluated on its own rows
    missing_targets: Literal["refuse", "mask"] = "refuse"

    @model_validator(mode="after")
    def _check(self) -> "TaskConfig":
        if self.type in ("binary", "multiclass") and len(self.targets) != 1:
            raise ValueError(f"a {self.type} task takes exactly one target column, got {self.targets}")
        per_target = [f"{m}/{t}" for m in PER_TARGET_METRICS.get(self.type, ()) for t in self.targets]
        several = self.type == "regression" and len(self.targets) > 1
        if several and self.primary_metric in (None, *METRICS_BY_TASK["regression"]):
            raise ValueError(  # R² of age and R² of MMSE are numbers of different things: rank by one of them
                f"a regression task with several targets ({', '.join(self.targets)}) ranks and selects by one of them, "
                f"never by a mean over targets; set primary_metric to one of: {', '.join(per_target)}"
            )
        valid = [*METRICS_BY_TASK[self.type], *per_target]
        if self.primary_metric is None:
            self.primary_metric = PRIMARY_METRIC[self.type]
        elif self.primary_metric not in valid:
            raise ValueError(
                f"primary_metric '{self.primary_metric}' is not valid for a {self.type} task; "
                f"valid choices: {', '.join(valid)}"
            )
        if self.missing_targets == "mask" and self.type != "regression":
            raise ValueError(f"missing_targets: mask applies to regression targets; a {self.type} task needs every "
                             "target cell (set missing_targets: refuse, or drop the rows without one)")
        return self


class VLMLayoutConfig(Strict):
    """Where the parts of a remote-code VLM sit (module paths in the loaded model) and how its tokens lie.

    Built in for InternVL2 (``InternVLChatModel``) and CogVLM2 (``CogVLMForCausalLM``) checkpoints; declare one for
    another remote-code model that feeds images one of these two ways."""

    protocol: Literal["internvl_chat", "cogvlm"]  # how images and text go in: InternVL2's or CogVLM2's code
    tower: str  # the vision tower
    tower_blocks: str | None = None  # its nn.ModuleList of blocks (default: the longest one inside the tower)
    tower_qkv: str | None = None  # the fused q/k/v projection inside a block (LoRA presets); None: q_proj/k_proj/v_proj
    projector: str  # the module whose output the language model receives
    merge: int = Field(default=1, ge=1)  # projector tokens per side = tower tokens per side / merge
    language_model: str  # the language model (its output is a point)
    lm_layers: str  # its nn.ModuleList of layers
    experts: list[str] = Field(default_factory=list)  # vision-expert sub-modules in an LM layer (image rows only)


class ContractConfig(Strict):
    """What a ``kind: python`` model takes and returns, declared because fmprobe cannot read it from the code.

    Input: ``image`` batches ``[B, 3, H, W]`` normalised with ``mean`` / ``std``, or ``volume`` batches
    ``[B, 1, D, H, W]`` (RAS+ axes x, y, z; intensities as ``data.intensity`` makes them). Output of ``forward``
    (and of any module path read as a layer): ``tokens`` ``[B, N, D]`` = ``prefix_tokens`` (CLS, registers) then
    the patch tokens in raster order, N - prefix = prod(size / patch_size); ``pooled`` ``[B, D]``; or
    ``feature_map`` ``[B, D, h, w]`` (``[B, D, d, h, w]`` for volumes). Anything else is an error.
    """

    input: Literal["image", "volume"] = "image"
    size: list[int] = Field(min_length=2, max_length=3)  # [H, W] or, for volumes, [D, H, W]
    mean: list[float] | None = None  # image: one value per RGB channel
    std: list[float] | None = None
    output: Literal["tokens", "pooled", "feature_map"]
    patch_size: list[int] | None = None  # tokens: one value per spatial dim of size
    prefix_tokens: int = Field(default=0, ge=0)
    blocks: str | None = None  # module path of the block list, so integer model.layers read block outputs

    @model_validator(mode="after")
    def _check(self) -> "ContractConfig":
        dims = 2 if self.input == "image" else 3
        if len(self.size) != dims or min(self.size) < 1:
            raise ValueError(f"an {self.input} input takes size with {dims} positive values, got {self.size}")
        if self.input == "image" and (self.mean is None or self.std is None):
            raise ValueError("an image input needs mean and std (one value per RGB channel), as the model was trained")
        if self.input == "volume" and (self.mean is not None or self.std is not None):
            raise ValueError("a volume input takes intensities as data.intensity maps them; remove mean and std")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                raise ValueError(f"{key} needs 3 values (one per RGB channel), got {value}")
        if self.output == "tokens":
            if self.patch_size is None or len(self.patch_size) != dims or min(self.patch_size) < 1:
                raise ValueError(f"output: tokens needs patch_size with {dims} positive values, to know the token grid")
            if any(s % p for s, p in zip(self.size, self.patch_size)):
                raise ValueError(f"size {self.size} is not a multiple of patch_size {self.patch_size}")
        elif self.patch_size is not None or self.prefix_tokens:
            raise ValueError(f"patch_size and prefix_tokens describe output: tokens, not output: {self.output}")
        return self


MODULE_KINDS = ("timm", "open_clip", "python", "monai")  # models built from code + a state dict, not a HF folder
_MODULE_KEYS = ("weights", "weights_key", "rename", "drop_keys", "strict", "args")


class ModelConfig(Strict):
    """Which backbone, and where to read tokens from.

    transformers families: ``name`` is a local directory, a hub id or ``dinov2-small-offline``. Models built from
    code (``kind``: timm, open_clip, python, monai): ``name`` is the architecture (timm / open_clip name, MONAI
    network class, or a label for python), ``args`` its keyword arguments, ``weights`` a state-dict file loaded with
    a report of missing and unexpected keys (``strict``: both are errors), after ``weights_key`` (the dict entry
    holding the state dict, e.g. ``model``), ``drop_keys`` (regexes of the keys as stored to discard, e.g. an MAE
    decoder) and ``rename`` (key prefixes replaced, e.g. ``{"module.": ""}``). timm also takes ``weights:
    hf-hub:org/repo`` or ``local-dir:/path`` (config and weights read by timm); open_clip takes ``name:
    hf-hub:org/repo``.
    """

    name: str = "dinov2-small-offline"  # registry name, local directory, hub id, or architecture (see above)
    kind: Literal["auto", "dinov2", "vjepa2", "vjepa2-native", "videomae", "clip", "siglip", "blip2", "qwen2_vl",
                  "qwen2_5_vl", "qwen3_vl", "vlm", "vae", "timm", "open_clip", "python", "monai"] = "auto"  # fmt: skip
    checkpoint: str | None = None  # native V-JEPA 2 .pt file (kind: vjepa2-native)
    # Native V-JEPA 2 checkpoints store no config: when no params-pretrain.yaml lies beside the .pt,
    # give the clip length and head count here (crop size: image_size).
    native_frames: int | None = Field(default=None, ge=1)
    native_num_heads: int | None = Field(default=None, ge=1)
    weights: str | None = None
    weights_key: str | None = None
    rename: dict[str, str] = Field(default_factory=dict)
    drop_keys: list[str] = Field(default_factory=list)
    strict: bool = True
    args: dict[str, Any] = Field(default_factory=dict)
    factory: str | None = None  # kind: python: "package.module:function" returning the nn.Module
    contract: ContractConfig | None = None  # kind: python: what the module takes and returns
    layers: list[int | str] = Field(default_factory=lambda: [-1])  # index (negative ok) or module path
    image_size: int | None = None  # override the processor's size
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # VLMs (kind vlm): text around the image for language-model points, '<image>' marking where the image goes
    # (CogVLM2: the text after the image); unset: the image tokens alone
    prompt: str | None = None
    trust_remote_code: bool = False  # run the checkpoint's own modeling code (InternVL2, CogVLM2): only if you trust it
    layout: VLMLayoutConfig | None = None  # a remote-code VLM fmprobe has no built-in layout for
    subfolder: str | None = None  # a diffusers VAE inside a pipeline repository (Lightricks/LTX-Video: vae)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.layout is not None and not self.trust_remote_code:
            raise ValueError("model.layout describes a remote-code model, which needs model.trust_remote_code: true")
        native = {"checkpoint": self.checkpoint, "native_frames": self.native_frames,
                  "native_num_heads": self.native_num_heads}
        if self.kind != "vjepa2-native":
            given = [k for k, v in native.items() if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to kind: vjepa2-native (kind is '{self.kind}')")
        elif self.checkpoint is None:
            raise ValueError("kind: vjepa2-native needs checkpoint: the path of the native V-JEPA 2 .pt file")
        self._check_built_from_code()
        return self

    def _check_built_from_code(self) -> None:
        """The keys of models built from code (timm, open_clip, python, monai) go with those kinds only."""
        fields = type(self).model_fields
        given = [k for k in _MODULE_KEYS if getattr(self, k) != fields[k].get_default(call_default_factory=True)]
        if self.kind not in MODULE_KINDS and given:
            raise ValueError(f"{', '.join(given)} apply to kind {', '.join(MODULE_KINDS)} (kind is '{self.kind}')")
        python = self.kind == "python"
        if python != (self.factory is not None) or python != (self.contract is not None):
            raise ValueError("kind: python takes factory ('package.module:function') and contract, and only it does")
        if python and "name" not in self.model_fields_set:
            self.name = str(self.factory)
        if self.kind in ("python", "monai") and self.image_size is not None:
            raise ValueError(f"kind: {self.kind} takes its input size from the network (contract.size / args), "
                             "not image_size")
        hub = self.weights is not None and self.weights.startswith(("hf-hub:", "local-dir:"))
        if hub and self.kind != "timm":
            raise ValueError(f"weights '{self.weights}': hub ids are read by timm (kind: timm); for open_clip "
                             "give the hub id as name")
        file_keys = [k for k in ("weights_key", "rename", "drop_keys") if k in given] + (
            ["strict: false"] if not self.strict else [])
        if file_keys and self.weights is None:
            raise ValueError(f"{', '.join(file_keys)} adjust loading model.weights, which is not set")
        if self.kind == "open_clip" and file_keys:
            raise ValueError(f"{', '.join(file_keys)}: open_clip loads its checkpoints itself, strictly (every key "
                             "accounted for); convert the file to open_clip's keys, or use kind: python")
        if self.kind in ("timm", "monai") and self.weights is None:
            where = "a checkpoint file" + (", hf-hub:org/repo or local-dir:/path" if self.kind == "timm" else "")
            raise ValueError(f"kind: {self.kind} needs weights ({where}); fmprobe never probes a randomly initialised "
                             "network by accident")
        if self.kind == "open_clip" and self.weights is None and not self.name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"open_clip '{self.name}' needs weights (a checkpoint file), or name: hf-hub:org/repo; "
                             "fmprobe never probes a randomly initialised network by accident")
        if self.kind == "open_clip" and self.weights is not None and self.name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"'{self.name}' holds its weights; remove model.weights")


class FeatureConfig(Strict):
    cache_dir: str = "~/.cache/fmprobe/features"
    store_tokens: bool = True
    token_grid: list[int] | None = None  # pool tokens spatially to (h, w) before storing, bounds size
    temporal_pool: bool = False  # average tokens over time before storing
    batch_size: int = Field(default=16, ge=1)
    shard_size: int = Field(default=256, ge=1)
    device: str = "cpu"  # where the frozen backbone runs during extraction (cpu, cuda, cuda:1); not in the cache key


TRAINED_HEADS = ("linear", "mlp", "attentive")  # trained by SGD through the training core
FITTED_HEADS = ("knn", "prototype", "logreg")  # fitted in closed form / to convergence on cached pooled features
DEFAULT_K = (10, 20, 50, 100, 200)  # DINOv2's k-NN evaluation
DEFAULT_C = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


class HeadConfig(Strict):
    type: Literal["linear", "mlp", "attentive", "knn", "prototype", "logreg"] = "linear"
    name: str | None = None  # defaults to the type
    layer: int | str = -1  # which extracted layer feeds the head
    pooling: Literal["mean", "cls", "cls+mean", "attentive"] = "mean"
    hidden: int = Field(default=512, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    num_heads: int = Field(default=8, ge=1)
    num_queries: int = Field(default=1, ge=1)
    query_per_class: bool = False
    # knn: neighbour counts tried (capped by the labelled training size), the best on validation; vote weights
    # exp(cosine / temperature), DINOv2's
    k: list[int] = Field(default_factory=lambda: list(DEFAULT_K), min_length=1)
    temperature: float = Field(default=0.07, gt=0)
    # logreg: inverse L2 strengths tried (scikit-learn's C; regression: ridge alpha = 1 / C), the best on validation
    C: list[float] = Field(default_factory=lambda: list(DEFAULT_C), min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "HeadConfig":
        if self.type in FITTED_HEADS:
            if self.pooling == "attentive":
                raise ValueError(f"head type '{self.type}' is fitted on pooled vectors: pooling must be mean, cls or "
                                 "cls+mean, not attentive")  # fmt: skip
        elif (self.type == "attentive") != (self.pooling == "attentive"):
            raise ValueError("head type 'attentive' goes with pooling 'attentive' and only with it")
        for key, values in (("k", self.k), ("C", self.C)):
            if len(set(values)) != len(values) or min(values) <= 0:
                raise ValueError(f"{key} needs distinct positive values, got {values}")
        if self.name is None:
            self.name = self.type
        return self


class LossConfig(Strict):
    type: Literal["auto", "ce", "bce", "mse", "huber", "focal"] = "auto"
    class_weights: Literal["none", "balanced"] | list[float] = "none"
    pos_weight: Literal["none", "auto"] | list[float] = "none"
    focal_alpha: float | None = Field(default=0.25, ge=0, le=1)
    focal_gamma: float = Field(default=2.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    huber_delta: float = Field(default=1.0, gt=0)


class EarlyStoppingConfig(Strict):
    metric: str | None = None  # default: the task's primary metric on validation
    patience: int = Field(default=10, ge=1)
    min_delta: float = Field(default=0.0, ge=0)


class GridConfig(Strict):
    """Learning rates x weight decays every head trains with at once (a HeadBank per seed); per head the member
    with the best mean validation primary metric over seeds is reported. An axis left out: train.lr / weight_decay."""

    lr: list[float] | None = Field(default=None, min_length=1)
    weight_decay: list[float] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "GridConfig":
        for name, values, positive in (("lr", self.lr, True), ("weight_decay", self.weight_decay, False)):
            if values and (len(set(values)) != len(values) or min(values) < 0 or (positive and min(values) == 0)):
                kind = "positive" if positive else "non-negative"
                raise ValueError(f"train.grid.{name} needs distinct {kind} values, got {values}")
        return self


class TrainConfig(Strict):
    epochs: int = Field(default=50, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: int = Field(default=0, ge=0)
    grad_accum: int = Field(default=1, ge=1)
    early_stopping: EarlyStoppingConfig | None = None
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    grid: GridConfig | None = None  # frozen probes: lr x weight_decay members per head, best on validation
    # draw training batches class-balanced (with replacement) instead of a permutation: frozen probes on cached
    # features and end-to-end training alike (multilabel: a sample counts toward its rarest positive label)
    balanced_sampler: bool = False
    # label efficiency (frozen probes, given or generated splits): K labelled examples per class, each from its own
    # group (patient), drawn from the training split in `episodes` episodes (`trained_episodes` for heads trained by
    # SGD); and nested shares of the training groups, one draw per seed
    shots: list[int] | None = Field(default=None, min_length=1)
    episodes: int = Field(default=100, ge=1)
    trained_episodes: int = Field(default=10, ge=1)
    label_fractions: list[float] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.shots is not None and (len(set(self.shots)) != len(self.shots) or min(self.shots) < 1):
            raise ValueError(f"train.shots needs distinct positive counts of examples per class, got {self.shots}")
        fractions = self.label_fractions
        if fractions is not None and (len(set(fractions)) != len(fractions) or not all(0 < f <= 1 for f in fractions)):
            raise ValueError(f"train.label_fractions needs distinct shares in (0, 1], got {fractions}")
        return self


class SplitConfig(Strict):
    """Given splits (manifest column) or generated stratified, grouped ones."""

    mode: Literal["given", "generate", "kfold"] = "given"
    fractions: list[float] = Field(default_factory=lambda: [0.7, 0.15, 0.15])  # train, val, test
    folds: int = Field(default=5, ge=2)
    seed: int = 0
    allow_group_overlap: bool = False

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if len(v) != 3 or any(f < 0 for f in v) or abs(sum(v) - 1) > 1e-6:
            raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {v}")
        return v


class EvalConfig(Strict):
    bootstrap: int = Field(default=1000, ge=0)
    ci: float = Field(default=0.95, gt=0, lt=1)
    thresholds: Literal["f1", "fixed"] = "f1"
    tiny_class: int = Field(default=5, ge=0)  # flag a class with fewer positives than this in a split
    min_groups: int = Field(default=10, ge=0)  # flag a test split with fewer groups (patients, videos) than this
    overfit_gap: float = Field(default=0.2, ge=0)
    target: float | None = None  # label efficiency: the fewest labels whose interval clears this primary-metric value


class ParamGroupConfig(Strict):
    """Learning rate, warmup and weight decay of one parameter group; unset values come from ``train:``."""

    lr: float | None = Field(default=None, gt=0)
    warmup_epochs: int | None = Field(default=None, ge=0)
    weight_decay: float | None = Field(default=None, ge=0)


class LoraAdaptConfig(Strict):
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: str = "qv"  # preset qv | qkv | all-linear, or a regex fully matching module paths of the HF model
    merge: bool = False  # merge the trained adapter into the backbone weights before predicting


class StageTwoConfig(Strict):
    """Stage 2 of ``strategy: staged``: end-to-end from stage 1's best head, with its own LRs, epochs, patience."""

    epochs: int = Field(default=10, ge=1)
    patience: int | None = Field(default=None, ge=1)  # early stopping on the validation primary metric
    head: ParamGroupConfig = Field(default_factory=lambda: ParamGroupConfig(lr=1e-4))
    adapters: ParamGroupConfig = Field(default_factory=lambda: ParamGroupConfig(lr=1e-4))
    backbone: ParamGroupConfig = Field(default_factory=lambda: ParamGroupConfig(lr=1e-5))


class MixConfig(Strict):
    """Mixup / CutMix on training batches (labels mixed by the same weight); both > 0: one of them per batch."""

    mixup_alpha: float = Field(default=0.0, ge=0)
    cutmix_alpha: float = Field(default=0.0, ge=0)
    prob: float = Field(default=1.0, ge=0, le=1)  # chance that a batch is mixed


class TTAConfig(Strict):
    """Test-time augmentation: predicted scores averaged over flips and clips (validation and test alike)."""

    hflip: bool = False
    clips: int = Field(default=1, ge=1)  # uniformly spaced clips per sample, each scored on its own


class AdaptConfig(Strict):
    """How far the backbone moves: frozen (cached features) | lora | partial (last N blocks) | staged."""

    strategy: Literal["frozen", "lora", "partial", "staged"] = "frozen"
    unfreeze: Literal["lora", "partial"] = "lora"  # what stage 2 of staged trains in the backbone
    lora: LoraAdaptConfig = Field(default_factory=LoraAdaptConfig)
    partial_blocks: int = Field(default=2, ge=0)  # partial: the last N blocks (up to the head's layer) + final norm;
    # 0: the final norm alone (e.g. BLIP-2's post_layernorm = LAVIS' ln_vision), with the head reading layer -1
    unfreeze_at_epoch: int | None = Field(default=None, ge=2)  # lora/partial: head only before this epoch
    head: ParamGroupConfig = Field(default_factory=ParamGroupConfig)
    adapters: ParamGroupConfig = Field(default_factory=lambda: ParamGroupConfig(lr=1e-4))
    backbone: ParamGroupConfig = Field(default_factory=lambda: ParamGroupConfig(lr=1e-5))
    modules: dict[str, ParamGroupConfig] = Field(default_factory=dict)  # module path -> trained, own group
    layer_decay: float = Field(default=1.0, gt=0, le=1)  # lr x decay^(depth from the top) per block
    stage2: StageTwoConfig = Field(default_factory=StageTwoConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    tta: TTAConfig = Field(default_factory=TTAConfig)
    gradient_checkpointing: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; bf16/fp16 need a GPU
    device: str = "cpu"
    drop_path: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "balanced_sampler" in data:
            raise ValueError("adapt.balanced_sampler moved to train.balanced_sampler (it applies to frozen probes "
                             "too); set it there")
        return data

    @model_validator(mode="after")
    def _check(self) -> "AdaptConfig":
        # keys set to something other than their default (a saved config.resolved.yaml lists every key)
        fields = type(self).model_fields
        given = {k for k in self.model_fields_set - {"strategy"}
                 if getattr(self, k) != fields[k].get_default(call_default_factory=True)}
        bad = sorted(given & unused_adapt_keys(self.strategy, self.unfreeze))
        if bad and self.strategy == "frozen":
            raise ValueError(f"adapt keys {', '.join(bad)} need an end-to-end strategy (lora, partial, staged); "
                             "strategy is frozen")
        if bad:
            trains = f" (stage 2 trains {self.unfreeze})" if self.strategy == "staged" else ""
            raise ValueError(f"adapt keys {', '.join(bad)} do not apply to strategy {self.strategy}{trains}; remove them")
        return self


def unused_adapt_keys(strategy: str, unfreeze: str) -> set[str]:
    """The ``adapt`` keys that have no effect under ``strategy`` (staged: with stage 2 training ``unfreeze``):
    refused when set, and shown as not applying in leaderboards."""
    if strategy == "frozen":
        return set(AdaptConfig.model_fields) - {"strategy"}
    trains = unfreeze if strategy == "staged" else strategy
    # staged: stage 1 trains the head as train: says, stage 2 with stage2's groups
    unused = {"unfreeze", "stage2"} if strategy != "staged" else {"unfreeze_at_epoch", "head", "adapters", "backbone"}
    return unused | ({"lora", "adapters"} if trains != "lora" else {"partial_blocks"})


def unused_loss_keys(loss_type: str, task_type: str) -> set[str]:
    """The ``loss`` keys that have no effect for this loss on this task (``type: auto`` resolved by the task)."""
    kind = {"multiclass": "ce", "binary": "bce", "multilabel": "bce", "regression": "mse"}[task_type] \
        if loss_type == "auto" else loss_type
    used = {"type"}
    used |= {"class_weights"} if task_type != "regression" else set()
    used |= {"pos_weight"} if kind in ("bce", "focal") and task_type != "multiclass" else set()
    used |= {"focal_gamma"} if kind == "focal" else set()
    used |= {"focal_alpha"} if kind == "focal" and task_type != "multiclass" else set()
    used |= {"label_smoothing"} if kind in ("ce", "bce") else set()
    used |= {"huber_delta"} if kind == "huber" else set()
    return set(LossConfig.model_fields) - used


def unused_keys(config: dict[str, Any]) -> set[str]:
    """Dotted sections of a resolved config (``config.resolved.yaml``) that did not apply to its run: adapt keys
    its strategy ignores, loss keys its loss ignores. A leaderboard shows what applied, not these defaults."""
    adapt, loss, task = config.get("adapt") or {}, config.get("loss") or {}, config.get("task") or {}
    keys = {f"adapt.{k}" for k in unused_adapt_keys(adapt.get("strategy", "frozen"), adapt.get("unfreeze", "lora"))}
    if task.get("type") in METRICS_BY_TASK:
        keys |= {f"loss.{k}" for k in unused_loss_keys(loss.get("type", "auto"), task["type"])}
    return keys


class SegmentationConfig(Strict):
    """Auxiliary segmentation head on patch tokens, trained on the rows with a mask (``data.mask_column``)."""

    class_names: list[str] = Field(min_length=2)  # index 0 = background; mask values are 0..K-1
    loss_weight: float = Field(default=0.5, gt=0)  # adapted path: loss = main + loss_weight x segmentation CE
    layer: int | str = -1  # must be among model.layers
    decoder: Literal["linear", "conv"] = "linear"
    lr: float | None = Field(default=None, gt=0)  # default: train.lr


class TrackingConfig(Strict):
    """Opt-in experiment trackers, fed after each run; each needs its own package (never required)."""

    mlflow: bool = False
    mlflow_uri: str | None = None  # default: sqlite:///<runs_dir>/mlflow.db
    wandb: bool = False  # always offline: files under <runs_dir>/wandb, `wandb sync` uploads them
    wandb_project: str | None = None  # default: the experiment name

    @model_validator(mode="after")
    def _check(self) -> "TrackingConfig":
        import importlib.util

        for package, enabled in (("mlflow", self.mlflow), ("wandb", self.wandb)):
            if enabled and importlib.util.find_spec(package) is None:
                raise ValueError(f"tracking.{package}: true needs the {package} package, which is not installed: "
                                 f"pip install {package} (or pip install 'fmprobe[tracking]'), or set it to false")
        return self


class Experiment(Strict):
    name: str
    data: DataConfig
    task: TaskConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    heads: list[HeadConfig] = Field(default_factory=lambda: [HeadConfig()], min_length=1)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    segmentation: SegmentationConfig | None = None
    runs_dir: str = "runs"

    @model_validator(mode="after")
    def _check(self) -> "Experiment":
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"heads need distinct names, got {names}; set 'name' on each head")
        layers = [str(x) for x in self.model.layers]
        for i, head in enumerate(self.heads):
            if str(head.layer) not in layers:
                raise ValueError(f"heads[{i}].layer {head.layer!r} is not among model.layers {self.model.layers}")
        if self.data.laterality and self.adapt.tta.hflip:
            raise ValueError("adapt.tta.hflip averages over mirrored inputs, but data.laterality: true says left and "
                             "right carry meaning; remove one of them")
        default_augment = DataConfig(manifest="-", kind=self.data.kind, laterality=self.data.laterality).augment
        if self.adapt.strategy == "frozen" and self.data.augment != default_augment:
            raise ValueError(f"data.augment {self.data.augment.model_dump()} applies to end-to-end training; frozen "
                             "features are extracted without augmentation: remove it or set adapt.strategy")
        if self.data.clip_start_column is not None and self.adapt.tta.clips > 1:
            raise ValueError(f"adapt.tta.clips: {self.adapt.tta.clips} reads several clips per sample, but "
                             "data.clip_start_column fixes each row's one clip; set adapt.tta.clips: 1")
        if (self.segmentation is None) != (self.data.mask_column is None):
            raise ValueError("segmentation: needs data.mask_column (the manifest column of mask paths), and "
                             "data.mask_column needs a segmentation: section (class_names, ...); set both or neither")
        if self.segmentation is not None and str(self.segmentation.layer) not in layers:
            raise ValueError(f"segmentation.layer {self.segmentation.layer!r} is not among model.layers "
                             f"{self.model.layers}")
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the documented keys of this section)"
        elif e["type"] == "literal_error":
            msg = f"invalid value; valid choices: {e['ctx']['expected']}"
        bad = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(bad, dict) else f" (got {bad!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> Experiment:
    """Validate a config dict; raise ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Experiment.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The YAML document at ``path`` (configs, sweeps, gates: one reader, one set of errors)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read {what} '{path}': {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text: {err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read a YAML config; relative paths resolve against the config file's folder."""
    path = Path(path)
    data = read_yaml(path) or {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    if isinstance(data, dict):
        resolve_paths(data, path.parent.resolve())
    return parse_config(data, source=f"'{path}'")


_PATH_KEYS = ("data.manifest", "data.root", "features.cache_dir", "runs_dir", "model.checkpoint", "model.weights")


def resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in a config file resolve against the file's folder, not the working directory."""
    for dotted in _PATH_KEYS:
        node: Any = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        value = node.get(leaf)
        scheme = "local-dir:" if isinstance(value, str) and value.startswith("local-dir:") else ""
        if isinstance(value, str) and value.startswith("hf-hub:"):
            continue
        path = value[len(scheme):] if isinstance(value, str) else None
        if path is not None and "://" not in path and not path.startswith("~") and not Path(path).is_absolute():
            node[leaf] = scheme + str(base / path)


def set_dotted(data: Any, dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in a nested config (overrides, sweeps): an integer part indexes an existing list."""
    set_path(data, dotted.split("."), value)


def set_path(data: Any, parts: list[str | int] | tuple[str | int, ...], value: Any) -> None:
    """Set the value at ``parts`` (keys, and indices of existing lists); missing sections are created."""
    dotted = ".".join(str(p) for p in parts)
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(str(p) for p in parts[: i + 1])
        if isinstance(node, list):
            if not str(part).lstrip("-").isdigit():
                raise ConfigError(f"cannot set '{dotted}': '{where.rsplit('.', 1)[0]}' is a list, so '{part}' must "
                                  "be an index")  # fmt: skip
            index = int(part)
            if not -len(node) <= index < len(node):
                raise ConfigError(f"cannot set '{dotted}': '{where}' is out of range (the list has {len(node)} items)")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node and str(parts[i + 1]).lstrip("-").isdigit():
                    raise ConfigError(f"cannot set '{dotted}': the config has no list '{where}' to index")
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"cannot set '{dotted}': '{where.rsplit('.', 1)[0]}' is a value, not a section")


def dump_config(exp: Experiment) -> str:
    """The resolved config, as saved next to every output."""
    return yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False)
