"""Render an HTML page in headless Chromium (offline) at a given width and read back what the browser laid out:
the DOM after load, whether every image decoded, and whether anything is wider than the window."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--hide-scrollbars"]
# Appended to a copy of the page: once loaded, writes what the layout gave onto <body> for --dump-dom to show.
PROBE = """<script>window.addEventListener('load', () => {
  const b = document.body, width = window.innerWidth;
  b.setAttribute('data-inner-width', width);
  b.setAttribute('data-scroll-width', document.documentElement.scrollWidth);
  b.setAttribute('data-broken-images', [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length);
  const wide = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > width + 1
    && !e.closest('.scroll'));
  b.setAttribute('data-too-wide', wide.slice(0, 5).map(e => e.tagName + (e.id ? '#' + e.id : '')).join(','));
});</script>"""
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


@dataclass
class Rendered:
    dom: str
    log: str

    def body(self, attribute: str) -> str:
        return re.search(rf'<body[^>]*\s{attribute}="([^"]*)"', self.dom).group(1)

    @property
    def console_errors(self) -> list[str]:
        return [line for line in self.log.splitlines() if ":CONSOLE" in line]

    def check_layout(self, width: int) -> None:
        """Laid out at ``width`` px, every image decoded, nothing but a scroll box wider than the window."""
        assert int(self.body("data-inner-width")) == width
        assert int(self.body("data-scroll-width")) <= width, f"page overflows: {self.body('data-too-wide')}"
        assert self.body("data-too-wide") == ""
        assert self.body("data-broken-images") == "0", "an embedded figure did not decode"
        assert not self.console_errors, self.console_errors


def render(page: Path, tmp_path: Path, width: int = 1400) -> Rendered:
    copy = tmp_path / f"probe-{page.parent.name}-{page.name}"
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    out = subprocess.run([CHROMIUM, *FLAGS, f"--window-size={width},1000", f"--user-data-dir={tmp_path / 'profile'}",
                          "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return Rendered(out.stdout, out.stderr)
