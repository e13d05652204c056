"""HeadBank: 8 heads trained together in one pass vs the same 8 heads trained one by one with ``train_head``.

Same data (synthetic DINOv2-S-sized cls+mean features, a 3-label multilabel task), same epochs, batches,
schedule and seed; the grid is linear heads x 4 learning rates x 2 weight decays. Both sides run in this one
process, interleaved, best of ``REPEATS`` (the machine is shared). The separate runs score each head per epoch
with ``TaskMetric.weighted``, the bank all heads at once with ``TaskMetric.stacked`` (same values, tested). The
bank reproduces each separate run's weights (checked here, max |difference| printed). ``--threads`` sets torch's intra-op threads for both sides
(default 1: on a loaded shared machine torch's thread-pool wake-ups dominate such small kernels and make both
timings noise). Last line: ``headbank_speedup=<separate seconds / bank seconds>`` (goal >= 4).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fmprobe.config import HeadConfig, LossConfig, TaskConfig, TrainConfig
from fmprobe.evaluate.bootstrap import TaskMetric
from fmprobe.heads import build_head
from fmprobe.heads.bank import head_grid, train_bank
from fmprobe.train.losses import build_loss
from fmprobe.train.trainer import HeadData, train_head

N_TRAIN, N_VAL, DIM, LABELS, EPOCHS, REPEATS = 2000, 500, 768, 3, 10, 3
LRS, WDS = [1e-4, 3e-4, 1e-3, 3e-3], [0.0, 1e-2]


def data(rng: np.random.Generator, w: np.ndarray, n: int) -> HeadData:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = ((x @ w + 10 * rng.normal(size=(n, LABELS))) > 0).astype(np.float32)
    return HeadData(torch.from_numpy(x), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(DIM, LABELS))
    train, val = data(rng, w, N_TRAIN), data(rng, w, N_VAL)
    task = TaskConfig(type="multilabel", targets=["a", "b", "c"])
    metric = TaskMetric("multilabel", target_names=task.targets)

    def score_fn(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
        return {k: float(v[0]) for k, v in metric.weighted(y, s, np.ones((1, len(y)))).items()}

    cfg = TrainConfig(epochs=EPOCHS, batch_size=64, warmup_epochs=1)
    members = head_grid([HeadConfig(type="linear")], LRS, WDS)
    loss, _ = build_loss(LossConfig(), task, train.y)
    common = dict(task_type="multilabel", loss=loss, seed=0, score_fn=score_fn, primary="map")

    def separate() -> dict:
        out = {}
        for m in members:
            head = build_head(m.head, DIM, LABELS)
            out[m.name] = train_head(head, train, val, cfg=cfg.model_copy(update={"lr": m.lr,
                                     "weight_decay": m.weight_decay}), **common)  # fmt: skip
        return out

    def bank():
        return train_bank(members, train, val, in_dim=DIM, out_dim=LABELS, cfg=cfg, **{**common, "score_fn": metric.stacked})

    times = {"separate": [], "bank": []}
    for _ in range(REPEATS):
        for name, fn in (("separate", separate), ("bank", bank)):
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            if name == "separate":
                reference = result
            else:
                bank_result = result
    diff = max(
        float((reference[m.name].last_state[k] - bank_result.results[m.name].last_state[k]).abs().max())
        for m in members for k in reference[m.name].last_state
    )  # fmt: skip
    t_sep, t_bank = min(times["separate"]), min(times["bank"])
    print(f"heads: {len(members)} ({', '.join(m.name for m in members)})")
    print(f"data: train {N_TRAIN} x {DIM}, val {N_VAL}, {LABELS} labels; epochs {EPOCHS}, batch 64; "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    print(f"separate runs: {t_sep:.2f} s   bank: {t_bank:.2f} s   (best of {REPEATS})")
    print(f"max |weight difference| bank vs separate: {diff:.2e}; best head on validation: {bank_result.best}")
    print(f"headbank_speedup={t_sep / t_bank:.2f}")


if __name__ == "__main__":
    main()
