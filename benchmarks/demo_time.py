"""Wall time of `fmprobe demo` on this machine, from a fresh demo folder (the goal: within 90 s after setup).

The offline DINOv2-S conversion is part of the first demo on a new machine; this script reports the
run with the conversion as it finds it (converted or not) and says which. Last line: demo_seconds=<s>.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from fmprobe.backbones.offline import offline_dinov2_dir  # noqa: F401  (import cost is not demo time)

    cache_root = Path.home() / ".cache" / "fmprobe" / "models" / "dinov2-small-offline"
    converted = (cache_root / "conversion.json").exists()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fmprobe", "demo", "--out", str(out), "--quiet"], check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        for metrics_path in sorted(out.glob("runs/*/*/metrics.json")):
            m = json.loads(metrics_path.read_text())
            primary = m["task"]["primary_metric"]
            for head, h in m["heads"].items():
                lo, hi = h["test_ci"][primary]
                print(f"{m['experiment']} {head}: test {primary} {h['splits']['test']['mean'][primary]:.3f} "
                      f"[{lo:.3f}, {hi:.3f}] baseline {m['baseline']['test'][primary]:.3f}")
    print(f"offline model already converted before the run: {converted}")
    print(f"demo_seconds={seconds:.1f}")


if __name__ == "__main__":
    main()
