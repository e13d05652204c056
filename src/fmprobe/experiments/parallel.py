"""Frozen probes on several processes: the (fold, seed) members dealt round-robin, results put back in order.

A member is one fold and one seed with all its heads: the heads of a seed stay together because a HeadBank
trains them in one pass (and shares one dropout stream), so splitting them would change the numbers. Each
process trains its members exactly as one process would (same seed, same data), then every process receives
all members in single-process order (fold, head, seed), so the summary cannot tell the difference.
"""

from __future__ import annotations

from dataclasses import replace

from fmprobe import distributed
from fmprobe.config import Experiment
from fmprobe.evaluate.results import ProbeResults


def fold_share(exp: Experiment, fold: int) -> Experiment:
    """``exp`` restricted to the seeds this process trains for ``fold`` (member ``fold * n_seeds + j`` goes
    to rank ``(fold * n_seeds + j) % world``); ``exp`` itself for a single process."""
    if distributed.world_size() == 1:
        return exp
    seeds = exp.train.seeds
    mine = [s for j, s in enumerate(seeds) if (fold * len(seeds) + j) % distributed.world_size() == distributed.rank()]
    return exp.model_copy(update={"train": exp.train.model_copy(update={"seeds": mine})})


def gather_members(exp: Experiment, results: ProbeResults) -> ProbeResults:
    """Every process's head runs, on every process, in the order one process produces them."""
    if distributed.world_size() == 1:
        return results
    parts = distributed.all_gather_object(results)
    runs = [run for part in parts for run in part.runs]
    heads: dict[tuple[int, str], int] = {}
    for run in runs:  # heads in the order train_heads produced them (the same in every process's part)
        heads.setdefault((_fold(run.fold), run.head), len(heads))
    seed_rank = {seed: j for j, seed in enumerate(exp.train.seeds)}
    runs.sort(key=lambda r: (_fold(r.fold), heads[_fold(r.fold), r.head], seed_rank[r.seed]))
    merged = replace(parts[0], runs=runs, standardisation=dict(parts[0].standardisation))
    for part in parts[1:]:
        merged.standardisation.update(part.standardisation)
    return merged


def _fold(fold: int | None) -> int:
    return -1 if fold is None else fold
