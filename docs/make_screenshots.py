"""Screenshots of the demo's two reports for the README, taken with headless Chromium.

    python docs/make_screenshots.py [DEMO_DIR]     (default: fmprobe-demo; runs `fmprobe demo` there first when it
                                                    holds no finished run)

Writes docs/report-multilabel.png (demo-tissues) and docs/report-regression.png (demo-gm-fraction): the top of each
report (verdict, results table) and the figures of every head, at 1400 px wide, the other sections hidden.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DOCS = Path(__file__).resolve().parent
SHOTS = {"demo-tissues": "report-multilabel.png", "demo-gm-fraction": "report-regression.png"}
HIDDEN = ("part-splits", "part-flags", "part-subgroups", "part-metrics", "part-skipped", "part-config")
WIDTH, HEIGHT = 1400, 6000  # tall enough for every head's figures; the image is cropped to the content


def latest_report(demo_dir: Path, experiment: str) -> Path | None:
    reports = sorted((demo_dir / "runs" / experiment).glob("*/report.html"))
    return reports[-1] if reports else None


def screenshot(report: Path, dest: Path, chromium: str) -> None:
    """The report with the long sections hidden, captured at WIDTH x HEIGHT and cropped to its content."""
    style = "<style>" + ",".join(f"#{h}" for h in HIDDEN) + "{display:none}</style>"
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(report.read_text().replace("</head>", style + "</head>"))
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={Path(tmp) / 'profile'}",
                        f"--window-size={WIDTH},{HEIGHT}", f"--screenshot={dest}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
    image = Image.open(dest).convert("RGB")
    drawn = np.flatnonzero((np.asarray(image) < 255).any(axis=(1, 2)))  # rows with anything but white
    image = image.crop((0, 0, image.width, min(image.height, int(drawn[-1]) + 24)))
    image.quantize(colors=128).save(dest, optimize=True)  # a README image, not a figure to measure from


def main(demo_dir: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("headless Chromium is needed: apt-get install chromium")
    if any(latest_report(demo_dir, e) is None for e in SHOTS):
        from fmprobe.demo.run import run_demo

        run_demo(demo_dir)
    for experiment, name in SHOTS.items():
        report = latest_report(demo_dir, experiment)
        assert report is not None
        screenshot(report, DOCS / name, chromium)
        print(f"{DOCS / name}  <-  {report}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "fmprobe-demo").expanduser().resolve())
