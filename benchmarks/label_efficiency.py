"""The whole label-efficiency protocol on 5,000 cached 384-d features, against a plain scikit-learn loop doing the
same fits.

Data: 1,000 patients x 5 samples of DINOv2-S-sized features (a 4-class task, imbalanced 40/30/20/10 %, a patient
effect shared by the patient's samples), split by patient 70 / 15 / 15 % (3,500 train, 750 val, 750 test).
Protocol: knn, prototype and logreg x K in 1, 2, 4, 8, 16, 32 x 100 episodes, plus label fractions 1, 5, 10, 25,
50, 100 % x 3 seeds; k in 10, 20, 50, 100, 200 and C on a 7-value log grid chosen on validation for every
episode; then the metrics.json block (per-repeat metrics, the two-level interval, flags, labels needed).

fmprobe side: ``experiments.efficiency.head_points`` (every episode of a budget fitted at once) + the summary.
scikit-learn side: for every episode and every k / C, ``KNeighborsClassifier(metric="cosine", weights=DINOv2's
exp(s/T))``, ``NearestCentroid`` on the normalised features (scores: softmax of minus the squared distances) and ``LogisticRegression(solver="lbfgs")`` fitted,
then validation and test predicted; the same choice on validation. Both sides time the fits only (same draws);
the summary is timed on the fmprobe side. The machine is shared: the sides run interleaved, repeat by repeat.
Lines: each side's min / median / max, the fmprobe side's CPU seconds (on a shared machine its wall time is
inflated by the load; the CPU time is what it needs of an idle core), ``vs_sklearn_loop=`` (scikit-learn seconds /
fmprobe seconds, wall medians) and last ``label_efficiency_seconds=`` (fmprobe: fits + summary, wall median).
Goals: >= 5x and <= 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch
from scipy.special import softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from threadpoolctl import threadpool_limits
from timing import interleaved, median, spread

from fmprobe.config import parse_config
from fmprobe.evaluate.baselines import baseline_metrics
from fmprobe.evaluate.bootstrap import scalar_metrics
from fmprobe.evaluate.efficiency import summarise_efficiency
from fmprobe.evaluate.results import ProbeResults, SplitData
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.experiments.efficiency import draw_budgets, head_points
from fmprobe.probes.inputs import standardise

PATIENTS, PER_PATIENT, DIM, CLASSES = 1000, 5, 384, ("CNV", "DME", "DRUSEN", "NORMAL")
SHARES = (0.4, 0.3, 0.2, 0.1)
T = 0.07


def synthetic(seed: int = 0) -> tuple[dict[str, torch.Tensor], SplitData]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(CLASSES), DIM)) * 0.25
    label = rng.choice(len(CLASSES), size=PATIENTS, p=SHARES)
    effect = rng.normal(size=(PATIENTS, DIM)) * 0.6
    split = np.array(["train"] * 700 + ["val"] * 150 + ["test"] * 150)[rng.permutation(PATIENTS)]
    ids, groups, targets, x = {}, {}, {}, {}
    for part in ("train", "val", "test"):
        patients = np.flatnonzero(split == part)
        rows = np.repeat(patients, PER_PATIENT)
        ids[part] = [f"p{p}-{i}" for p in patients for i in range(PER_PATIENT)]
        groups[part] = [f"p{p}" for p in rows]
        targets[part] = label[rows]
        x[part] = centres[label[rows]] + effect[rows] + rng.normal(size=(len(rows), DIM))
    z = standardise({k: v.astype(np.float32) for k, v in x.items()})
    return {k: torch.from_numpy(v) for k, v in z.items()}, SplitData(ids, groups, targets)


def dinov2_weights(distances: np.ndarray) -> np.ndarray:
    """DINOv2's vote weights exp(similarity / T) from scikit-learn's cosine distances (1 - similarity)."""
    return np.exp((1 - distances) / T)


def sklearn_loop(exp, task: ResolvedTask, x: dict[str, np.ndarray], split: SplitData, budgets) -> int:
    """The same fits one by one: every draw x every k / C, validation and test predicted, the best on validation."""
    y, fits = split.targets, 0
    unit = {s: v / np.linalg.norm(v, axis=1, keepdims=True) for s, v in x.items()}
    head = {h.type: h for h in exp.heads}

    def choose(candidates: list) -> int:  # probabilities per hyperparameter -> the best validation balanced accuracy
        return int(np.argmax([balanced_accuracy_score(y["val"], val.argmax(1)) for val, _ in candidates]))

    for _, _, draws in budgets:
        for _, rows in draws:
            xs, ys = unit["train"][rows], y["train"][rows]
            candidates = []
            for k in head["knn"].k:
                model = KNeighborsClassifier(n_neighbors=min(k, len(rows)), metric="cosine", weights=dinov2_weights,
                                             algorithm="brute").fit(xs, ys)  # fmt: skip
                candidates.append((model.predict_proba(unit["val"]), model.predict_proba(unit["test"])))
            choose(candidates)
            centroid = NearestCentroid().fit(xs, ys)  # its probabilities need within-class variance: distances
            for part in ("val", "test"):
                softmax(-euclidean_distances(unit[part], centroid.centroids_, squared=True), axis=1)
            candidates = []
            for c in head["logreg"].C:
                model = LogisticRegression(C=c, solver="lbfgs", max_iter=1000, tol=1e-6).fit(x["train"][rows], ys)
                candidates.append((model.predict_proba(x["val"]), model.predict_proba(x["test"])))
            choose(candidates)
            fits += len(head["knn"].k) + 1 + len(head["logreg"].C)
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and BLAS threads of both sides (1: see benchmarks/headbank.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="sklearn")  # NearestCentroid's 1-shot variance
    exp = parse_config({
        "name": "bench", "data": {"manifest": "unused.csv"},
        "task": {"type": "multiclass", "targets": ["diagnosis"], "class_names": list(CLASSES)},
        "heads": [{"type": "knn"}, {"type": "prototype"}, {"type": "logreg"}],
        "train": {"shots": [1, 2, 4, 8, 16, 32], "episodes": args.episodes,
                  "label_fractions": [0.01, 0.05, 0.1, 0.25, 0.5, 1.0], "seeds": [0, 1, 2]},
        "eval": {"bootstrap": 1000, "target": 0.7},
    })  # fmt: skip
    task = ResolvedTask.from_config(exp.task, list(CLASSES))
    inputs, split = synthetic()
    budgets = draw_budgets(exp, task, split)
    drawn = [b for b in budgets if not hasattr(b[2], "reason")]
    fits = sum(len(d) for _, _, d in drawn) * (len(exp.heads[0].k) + 1 + len(exp.heads[2].C))
    baseline = scalar_metrics(baseline_metrics(task.type, split.targets["train"], split.targets["test"],
                                               class_names=list(CLASSES)))  # fmt: skip
    full = ProbeResults()
    summary_seconds: list[float] = []
    cpu_seconds: list[float] = []

    def fmprobe_side() -> dict:
        cpu = time.process_time()
        points = [p for head in exp.heads for p in head_points(exp, task, head, inputs, split, budgets, full)]
        start = time.perf_counter()
        block = summarise_efficiency(exp, task, points, split.targets["test"], split.groups["test"], baseline)
        summary_seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu)
        return block

    numpy_inputs = {k: v.numpy().astype(np.float64) for k, v in inputs.items()}
    with threadpool_limits(args.threads):  # numpy's BLAS (scikit-learn's side) with the same threads as torch
        times, results = interleaved({"fmprobe_fits+summary": fmprobe_side,
                                      "sklearn_loop_fits": lambda: sklearn_loop(exp, task, numpy_inputs, split, drawn)},
                                     args.repeats)  # fmt: skip
    ours = [t - s for t, s in zip(times["fmprobe_fits+summary"], summary_seconds)]
    block = results["fmprobe_fits+summary"]
    print(f"data: {sum(len(v) for v in split.ids.values())} samples x {DIM} (train {len(split.ids['train'])}, "
          f"val {len(split.ids['val'])}, test {len(split.ids['test'])}), {PATIENTS} patients, 4 classes; "
          f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"budgets drawn: {len(drawn)} of {len(budgets)} ({[(p, v) for p, v, d in budgets if hasattr(d, 'reason')]} "
          f"not drawn); fits per side: {fits} (every draw x (5 k + prototype + 7 C))")  # fmt: skip
    print(f"fmprobe fits       {spread(ours)}")
    print(f"fmprobe summary    {spread(summary_seconds)}")
    print(f"sklearn loop fits  {spread(times['sklearn_loop_fits'])}")
    print(f"fmprobe fits+summary CPU time (what it needs of an idle machine) {spread(cpu_seconds)}")
    for p in block["points"]:
        if p["status"] == "ok":
            print(f"  {p['head']:9s} {p['protocol']:8s} {p['value']:<5g} {block['metric']} "
                  f"{p['test']['mean'][block['metric']]:.3f} [{p['interval'][0]:.3f}, {p['interval'][1]:.3f}]")
    print(f"labels needed for {block['metric']} {block['target']}: {block['labels_needed']}")
    print(f"vs_sklearn_loop={median(times['sklearn_loop_fits']) / median(ours):.2f}")
    print(f"label_efficiency_seconds={median(times['fmprobe_fits+summary']):.1f}")


if __name__ == "__main__":
    main()
