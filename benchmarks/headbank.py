"""HeadBank: 8 heads trained together in one pass vs the same 8 heads trained one by one.

Both sides go through the training core (``train.heads.fit_heads``): one call with the 8 members (fused stacked
tensors, one optimizer step and one metric call for all of them) against 8 calls of one member each. Same data
(synthetic DINOv2-S-sized cls+mean features, a 3-label multilabel task), same epochs, batches, schedule and seed;
the grid is linear heads x 4 learning rates x 2 weight decays. Both sides run in this one process, interleaved
repeat by repeat (the machine is shared); figures are medians. The bank reproduces each separate run's weights
(checked here, max |difference| printed). ``--threads`` sets torch's intra-op threads for both sides (default 1:
on a loaded shared machine torch's thread-pool wake-ups dominate such small kernels and make both timings noise).
Last line: ``headbank_speedup=<separate seconds / bank seconds>`` (goal >= 4).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from timing import interleaved, median, spread

from fmprobe.config import HeadConfig, LossConfig, TaskConfig, TrainConfig
from fmprobe.evaluate.task import TaskMetric
from fmprobe.heads.bank import head_grid
from fmprobe.train.heads import fit_heads
from fmprobe.train.losses import build_loss
from fmprobe.train.scoring import TaskScorer
from fmprobe.train.sources import HeadData

N_TRAIN, N_VAL, DIM, LABELS, EPOCHS = 2000, 500, 768, 3, 10
LRS, WDS = [1e-4, 3e-4, 1e-3, 3e-3], [0.0, 1e-2]


def data(rng: np.random.Generator, w: np.ndarray, n: int) -> HeadData:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = ((x @ w + 10 * rng.normal(size=(n, LABELS))) > 0).astype(np.float32)
    return HeadData(torch.from_numpy(x), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(DIM, LABELS))
    train, val = data(rng, w, N_TRAIN), data(rng, w, N_VAL)
    task = TaskConfig(type="multilabel", targets=["a", "b", "c"])
    metric = TaskMetric("multilabel", target_names=task.targets)
    cfg = TrainConfig(epochs=EPOCHS, batch_size=64, warmup_epochs=1)
    members = head_grid([HeadConfig(type="linear")], LRS, WDS)
    loss, _ = build_loss(LossConfig(), task, train.y)
    scorer = TaskScorer("multilabel", loss, metric.stacked, primary="map", lower_is_better=False)

    def run(group: list) -> object:
        return fit_heads(group, train, val, in_dim=DIM, out_dim=LABELS, task_type="multilabel", loss=loss, cfg=cfg,
                         seed=0, scorer=scorer)[0]  # fmt: skip

    times, results = interleaved({"separate": lambda: {m.name: run([m]).fits[0] for m in members},
                                  "bank": lambda: run(members)}, args.repeats)  # fmt: skip
    reference, bank = results["separate"], results["bank"]
    diff = max(float((reference[m.name].last_state[k] - bank[m.name].last_state[k]).abs().max())
               for m in members for k in reference[m.name].last_state)  # fmt: skip
    print(f"heads: {len(members)} ({', '.join(m.name for m in members)})")
    print(f"data: train {N_TRAIN} x {DIM}, val {N_VAL}, {LABELS} labels; epochs {EPOCHS}, batch 64; "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    for name, values in times.items():
        print(f"{name:9s} {spread(values)}")
    print(f"max |weight difference| bank vs separate: {diff:.2e}; best head on validation: {bank.names[bank.best]}")
    print(f"headbank_speedup={median(times['separate']) / median(times['bank']):.2f}")


if __name__ == "__main__":
    main()
