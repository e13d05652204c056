"""Probe heads on cached features through the training core: one head, or a grid of them in one HeadBank pass.

Every member sees the same batches in the same order as a separate run with the same seed, starts from the same
initialisation and follows the same warmup + cosine schedule at its own learning rate. A fused bank differs from
separate runs only by float rounding of the fused kernels and by dropout masks drawn from one shared stream; an
unfused bank of heads without dropout gives every member exactly its separate run's numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fmprobe.config import EarlyStoppingConfig, TrainConfig
from fmprobe.errors import ConfigError
from fmprobe.heads.bank import BankMember, HeadBank
from fmprobe.train.core import EpochReport, FitPlan, FitResult, Scorer, StopRule, fit
from fmprobe.train.losses import as_target_tensor
from fmprobe.train.members import HeadMembers
from fmprobe.train.scoring import member_scores
from fmprobe.train.seeding import seeded
from fmprobe.train.sources import CachedBatches, HeadData, predict_inputs


def stop_rule(cfg: EarlyStoppingConfig | None, primary: str) -> StopRule | None:
    """``train.early_stopping`` as the core's rule (its metric defaults to the primary)."""
    return None if cfg is None else StopRule(cfg.metric or primary, cfg.patience, cfg.min_delta)


def check_schedule(cfg: TrainConfig) -> None:
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"train.warmup_epochs ({cfg.warmup_epochs}) exceeds train.epochs ({cfg.epochs})")


def fit_heads(
    members: list[BankMember],
    train: HeadData,
    val: HeadData,
    *,
    in_dim: int,
    out_dim: int,
    task_type: str,
    loss: nn.Module,
    cfg: TrainConfig,
    seed: int,
    scorer: Scorer,
    sample_weights: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[EpochReport], None] | None = None,
    fuse: bool | None = None,
) -> tuple[FitResult, HeadBank]:
    """Train ``members`` (each with its own lr and weight decay; ``cfg``'s are not used) on ``train``, each
    member's checkpoint at its best validation epoch; the returned bank's heads hold those weights.
    ``on_epoch`` hears every epoch (progress, time estimates).

    ``fuse`` (default: with several members) runs them as stacked tensors with the fused optimizer; unfused,
    every member computes exactly as it would alone (its own module, loss call and AdamW groups)."""
    check_schedule(cfg)
    source = CachedBatches({"train": train, "val": val}, to_tensor=lambda y: as_target_tensor(y, task_type),
                           batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=seed, device=device,
                           sample_weights=sample_weights)  # fmt: skip
    with seeded(seed, device):
        bank = HeadBank(members, in_dim, out_dim, fuse=len(members) > 1 if fuse is None else fuse)
        heads = HeadMembers(bank, loss, warmup_steps=cfg.warmup_epochs * source.steps_per_epoch, seed=seed,
                            device=device)  # fmt: skip
        result = fit(heads, source, scorer, FitPlan(cfg.epochs, stop_rule(cfg.early_stopping, scorer.primary),
                                                    on_epoch=on_epoch))
    bank.load_member_states([f.best_state for f in result.fits])
    return result, bank


@torch.no_grad()
def predict_scores(bank: HeadBank, x: torch.Tensor | np.ndarray, task_type: str,
                   device: str | torch.device = "cpu") -> np.ndarray:  # fmt: skip
    """Every member's scores ``[H, N, ...]`` on ``x`` in the task's convention."""
    bank.eval()
    return member_scores(predict_inputs(bank, x, device).float().cpu(), task_type).numpy()
