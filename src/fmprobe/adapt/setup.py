"""Turn ``adapt:`` into what trains: LoRA or partial unfreezing (or staged's stage 2), named modules, drop-path,
gradient checkpointing, and the optimizer's parameter groups with their schedules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft import PeftModel
from torch import nn

from fmprobe.adapt.anatomy import anatomy, block_index, hf_model, num_blocks
from fmprobe.adapt.lora import apply_lora, is_adapter_param
from fmprobe.adapt.param_groups import GroupSpec, build_groups, count
from fmprobe.adapt.partial import partial_modules, set_drop_path, unfreeze
from fmprobe.backbones.base import Encoder
from fmprobe.config import Experiment, HeadConfig, ParamGroupConfig
from fmprobe.errors import ConfigError


@dataclass
class Prepared:
    groups: list[dict[str, Any]]
    steps_per_epoch: int
    trainable: int  # parameters that train (head included)
    peft_model: PeftModel | None = None
    lora_targets: list[str] | None = None
    partial_modules: list[str] | None = None
    _params: list[tuple[int, nn.Parameter]] = field(default_factory=list)  # (start step, parameter)

    def gate(self, epoch: int) -> None:
        """Gradients on only for groups whose start epoch has come (unfreeze_at_epoch): no compute before."""
        step = (epoch - 1) * self.steps_per_epoch
        for start, p in self._params:
            p.requires_grad_(start <= step)


def trained_part(exp: Experiment) -> str:
    """What moves in the backbone: lora or partial (for staged, what stage 2 unfreezes)."""
    return exp.adapt.unfreeze if exp.adapt.strategy == "staged" else exp.adapt.strategy


def prepare(exp: Experiment, encoder: Encoder, head: nn.Module, head_cfg: HeadConfig, *,
            steps_per_epoch: int) -> Prepared:  # fmt: skip
    cfg = exp.adapt
    model = hf_model(encoder)
    parts = anatomy(encoder)
    model.requires_grad_(False)
    if cfg.drop_path > 0:
        set_drop_path(encoder, cfg.drop_path)
    prepared = Prepared(groups=[], steps_per_epoch=steps_per_epoch, trainable=0)
    if trained_part(exp) == "lora":
        prepared.peft_model, prepared.lora_targets = apply_lora(encoder, cfg.lora)
    else:
        prepared.partial_modules = partial_modules(encoder, cfg.partial_blocks, head_cfg.layer)
        unfreeze(encoder, prepared.partial_modules)
    module_of = {id(p): path for path in cfg.modules for p in unfreeze(encoder, [path])}
    if cfg.gradient_checkpointing:
        _checkpoint_activations(encoder.name, model)

    named: dict[str, list[tuple[str, nn.Parameter]]] = {"head": list(head.named_parameters())}
    n = num_blocks(encoder)
    layer_of: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = f"module:{module_of[id(p)]}" if id(p) in module_of else "adapters" if is_adapter_param(name) else "backbone"
        named.setdefault(kind, []).append((name, p))
        block = block_index(name, parts.blocks)
        after = (parts.final_norm is not None and name.startswith(parts.final_norm + ".")) or name.startswith(
            "projector.")  # BLIP-2's projector (Q-Former, language projection) runs after the tower
        layer_of[name] = block + 1 if block is not None else n + 1 if after else 0
    specs = _specs(exp, [k for k in named if k.startswith("module:")])
    prepared.groups = build_groups(named, specs, layer_of=layer_of, num_layers=n, layer_decay=cfg.layer_decay,
                                   steps_per_epoch=steps_per_epoch)  # fmt: skip
    prepared._params = [(g["start_step"], p) for g in prepared.groups for p in g["params"]]
    prepared.trainable = count(p for _, p in prepared._params)
    return prepared


def _checkpoint_activations(name: str, model: nn.Module) -> None:
    """Gradient checkpointing through the model's own switch (transformers' or timm's)."""
    if getattr(model, "supports_gradient_checkpointing", False):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "set_grad_checkpointing"):  # timm
        model.set_grad_checkpointing(True)
    else:
        raise ConfigError(f"{name} does not support gradient checkpointing; remove it")


def _specs(exp: Experiment, module_kinds: list[str]) -> dict[str, GroupSpec]:
    cfg, train = exp.adapt, exp.train
    staged = cfg.strategy == "staged"
    groups = {"head": cfg.stage2.head if staged else cfg.head,
              "adapters": cfg.stage2.adapters if staged else cfg.adapters,
              "backbone": cfg.stage2.backbone if staged else cfg.backbone}  # fmt: skip
    start = cfg.unfreeze_at_epoch or 1
    if cfg.unfreeze_at_epoch is not None and cfg.unfreeze_at_epoch > train.epochs:
        raise ConfigError(f"adapt.unfreeze_at_epoch ({cfg.unfreeze_at_epoch}) is after the last epoch ({train.epochs})")

    def resolve(g: ParamGroupConfig, default_lr: float, start_epoch: int) -> GroupSpec:
        return GroupSpec(
            lr=g.lr if g.lr is not None else default_lr,
            weight_decay=g.weight_decay if g.weight_decay is not None else train.weight_decay,
            warmup_epochs=g.warmup_epochs if g.warmup_epochs is not None else train.warmup_epochs,
            start_epoch=start_epoch,
        )

    specs = {"head": resolve(groups["head"], train.lr, 1)}
    for kind in ("adapters", "backbone"):
        specs[kind] = resolve(groups[kind], train.lr, start)
    backbone_lr = specs["backbone"].lr
    for kind in module_kinds:
        specs[kind] = resolve(cfg.modules[kind.split(":", 1)[1]], backbone_lr, start)
    return specs
