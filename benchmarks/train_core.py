"""The training core's overhead: ``train.core.fit`` against a bare PyTorch loop doing the same work.

Same model (a linear probe on 768-d cached features, 3 labels), same in-memory batches in the same order, same
optimizer (torch AdamW, warmup + cosine), same epochs. Two comparisons, interleaved in this one process:

- ``train only``: the core without a validation scorer vs a loop of forward / loss / backward / step;
- ``with validation``: the core as fmprobe uses it (validation loss and task metrics every epoch, the training
  split's metric from the epoch's own outputs, best-state tracking, curves) vs the bare loop plus the same
  per-epoch work written by hand: the training outputs' metric, a validation forward, loss and metric call.

Both sides share the machine, so each repeat runs them in turn; the figures are medians of the repeats.
Last line: ``train_core_efficiency=<bare seconds / core seconds, with validation>`` (goal >= 0.90).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from timing import interleaved, median, spread

from fmprobe.config import HeadConfig, LossConfig, TaskConfig, TrainConfig
from fmprobe.evaluate.task import TaskMetric
from fmprobe.heads import build_head
from fmprobe.heads.bank import BankMember
from fmprobe.train.core import FitPlan, fit
from fmprobe.train.heads import fit_heads
from fmprobe.train.losses import as_target_tensor, build_loss
from fmprobe.train.members import HeadMembers
from fmprobe.heads.bank import HeadBank
from fmprobe.train.schedule import lr_factor
from fmprobe.train.scoring import TaskScorer, to_scores
from fmprobe.train.seeding import data_generator, seeded
from fmprobe.train.sources import CachedBatches, HeadData

N_TRAIN, N_VAL, DIM, LABELS, EPOCHS, BATCH, LR = 4096, 1024, 768, 3, 10, 64, 1e-3


def data(rng: np.random.Generator, w: np.ndarray, n: int) -> HeadData:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return HeadData(torch.from_numpy(x), ((x @ w + 5 * rng.normal(size=(n, LABELS))) > 0).astype(np.float32))


def bare(train: HeadData, val: HeadData, loss: torch.nn.Module, metric: TaskMetric | None) -> torch.nn.Module:
    """The loop a researcher would write by hand for the same fit."""
    y_train = as_target_tensor(train.y, "multilabel")
    y_val = as_target_tensor(val.y, "multilabel")
    steps = -(-N_TRAIN // BATCH)
    with seeded(0):
        head = build_head(HeadConfig(), DIM, LABELS)
    with seeded(0):  # initialised as the core initialises a member: from the seed's first draws
        head.reset_parameters()
    with seeded(0):
        decay = [p for p in head.parameters() if p.ndim > 1]
        rest = [p for p in head.parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}],
                                lr=LR, fused=True)  # fmt: skip
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, warmup_steps=steps, total_steps=EPOCHS * steps))
        order = data_generator(0)
        for _ in range(EPOCHS):
            head.train()
            seen, kept = [], []
            for idx in torch.randperm(N_TRAIN, generator=order).split(BATCH):
                opt.zero_grad(set_to_none=True)
                logits = head(train.x[idx])
                loss(logits, y_train[idx]).backward()
                opt.step()
                schedule.step()
                if metric is not None:  # the training curve's metric, from the epoch's own outputs
                    seen.append(idx)
                    kept.append(logits.detach())
            if metric is not None:
                metric.stacked(train.y[torch.cat(seen).numpy()], to_scores(torch.cat(kept), "multilabel")[None].numpy())
                head.eval()
                with torch.no_grad():
                    logits = head(val.x)
                    loss(logits, y_val).item()
                metric.stacked(val.y, to_scores(logits, "multilabel")[None].numpy())
    return head


def core(train: HeadData, val: HeadData, loss: torch.nn.Module, metric: TaskMetric | None) -> torch.nn.Module:
    """The same fit through fmprobe's training core."""
    cfg = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR, warmup_epochs=1)
    member = BankMember("linear", HeadConfig(), LR, 1e-4)
    if metric is not None:
        scorer = TaskScorer("multilabel", loss, metric.stacked, primary="map", lower_is_better=False)
        return fit_heads([member], train, val, in_dim=DIM, out_dim=LABELS, task_type="multilabel", loss=loss,
                         cfg=cfg, seed=0, scorer=scorer)[1].heads[0]  # fmt: skip
    source = CachedBatches({"train": train, "val": val}, to_tensor=lambda y: as_target_tensor(y, "multilabel"),
                           batch_size=BATCH, grad_accum=1, seed=0)  # fmt: skip
    with seeded(0):
        bank = HeadBank([member], DIM, LABELS, fuse=False)
        fit(HeadMembers(bank, loss, warmup_steps=source.steps_per_epoch, seed=0), source, None, FitPlan(EPOCHS))
    return bank.heads[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the shared machine's "
                        "thread-pool wake-ups would otherwise dominate these small kernels)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(DIM, LABELS))
    train, val = data(rng, w, N_TRAIN), data(rng, w, N_VAL)
    loss, _ = build_loss(LossConfig(), TaskConfig(type="multilabel", targets=["a", "b", "c"]), train.y)
    metric = TaskMetric("multilabel", target_names=["a", "b", "c"])
    times, heads = interleaved({
        "bare, train only": lambda: bare(train, val, loss, None),
        "core, train only": lambda: core(train, val, loss, None),
        "bare, with validation": lambda: bare(train, val, loss, metric),
        "core, with validation": lambda: core(train, val, loss, metric),
    }, args.repeats)  # fmt: skip
    same = max(float((heads["bare, train only"].state_dict()[k] - heads["core, train only"].state_dict()[k])
                     .abs().max()) for k in heads["bare, train only"].state_dict())  # fmt: skip
    print(f"linear probe: train {N_TRAIN} x {DIM}, val {N_VAL}, {LABELS} labels; {EPOCHS} epochs of "
          f"{-(-N_TRAIN // BATCH)} batches of {BATCH}; threads {torch.get_num_threads()}")
    for name, values in times.items():
        print(f"{name:24s} {spread(values)}  ->  {EPOCHS / median(values):.1f} epochs/s")
    print(f"max |weight difference| core vs bare (train only, same seed): {same:.2e}")
    print(f"train-only efficiency (bare / core): {median(times['bare, train only']) / median(times['core, train only']):.3f}")
    print(f"train_core_efficiency={median(times['bare, with validation']) / median(times['core, with validation']):.3f}")


if __name__ == "__main__":
    main()
