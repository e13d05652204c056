"""LoRA on the offline demo: DINOv2-S (dinov2-small-offline) end to end on the MNI152 tissue patches.

The demo's tissues.yaml (multilabel: grey matter, white matter, outside brain) with ``adapt.strategy: lora``, on a
subset of the patches if asked (every ``--every``-th slab group, so groups stay whole) for a few epochs and one seed, so it
finishes in minutes on a CPU. Prints the test metrics with CIs next to the frozen linear probe on the same subset,
and the LoRA run's trainable / total parameters. Last line: ``lora_demo_map=<test mAP> frozen_map=<test mAP>``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from fmprobe.config import load_config
from fmprobe.demo.dataset import build_demo_dataset
from fmprobe.demo.run import write_demo_configs
from fmprobe.experiments.run import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fmprobe-lora-demo"))
    parser.add_argument("--every", type=int, default=1,
                        help="keep every n-th slab group (above 1 the test split falls under 10 slabs: few_groups)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = pd.read_csv(build_demo_dataset(out))
    groups = sorted(manifest["group"].unique())
    subset = manifest[manifest["group"].isin(groups[:: args.every])]
    subset.to_csv(out / "manifest_subset.csv", index=False)
    tissues = [p for p in write_demo_configs(out) if p.name == "tissues.yaml"][0]
    common = {
        "data.manifest": str(out / "manifest_subset.csv"),
        "heads": [{"type": "linear", "pooling": "cls+mean"}],
        "train.epochs": args.epochs, "train.seeds": [0], "train.batch_size": 32, "train.early_stopping": None,
        "train.warmup_epochs": 0, "eval.bootstrap": 500,
    }  # fmt: skip
    lora = {"adapt": {"strategy": "lora", "lora": {"rank": args.rank, "alpha": 2 * args.rank, "targets": "qv"},
                      "adapters": {"lr": 5e-4}}}  # fmt: skip
    print(f"subset: {len(subset)} patches in {subset['group'].nunique()} slab groups (of {len(manifest)})")
    results = {}
    for name, extra in (("frozen", {}), ("lora", lora)):
        start = time.perf_counter()
        result = run_experiment(load_config(tissues, {**common, **extra}), progress=False)
        head = result.metrics["heads"]["linear"]
        test, ci = head["splits"]["test"]["mean"], head["test_ci"]
        print(f"{name}: {time.perf_counter() - start:.0f} s, run dir {result.run_dir}")
        for metric in ("map", "macro_auroc", "macro_f1"):
            print(f"  test {metric} = {test[metric]:.3f} [{ci[metric][0]:.3f}, {ci[metric][1]:.3f}]  "
                  f"(val {head['splits']['val']['mean'][metric]:.3f})")  # fmt: skip
        if name == "lora":
            info = json.loads((result.run_dir / "adaptation.json").read_text())["heads"]["linear"]["0"]
            print(f"  trainable params {info['trainable_params']:,} of {info['total_params']:,} "
                  f"({100 * info['trainable_params'] / info['total_params']:.2f} %); adapter: {info['adapter_dir']}")
            print(f"  LoRA targets: {len(info['lora_targets'])} modules, e.g. {info['lora_targets'][:2]}")
        else:
            print(f"  trainable params {head['trainable_params']:,} (the head)")
        results[name] = test["map"]
    print(f"lora_demo_map={results['lora']:.4f} frozen_map={results['frozen']:.4f}")


if __name__ == "__main__":
    main()
