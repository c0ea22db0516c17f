"""``report --screenshot``: Chromium's own ``--headless --screenshot`` renders the HTML file to a PNG.

No browser driver in the product: one Chromium process, a fresh profile, no network (the report is
self-contained). The browser test that hovers and zooms keeps its own small DevTools client in tests/.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import GGUFExpertsError

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium", "chromium-browser", "google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
         "--hide-scrollbars", "--virtual-time-budget=10000"]


class BrowserError(GGUFExpertsError):
    """Chromium is missing, failed, or wrote no screenshot."""


def find_chromium() -> str | None:
    """Path of a Chromium binary, $GGUF_EXPERTS_CHROMIUM first."""
    env = os.environ.get("GGUF_EXPERTS_CHROMIUM")
    for c in ([env] if env else []) + list(CANDIDATES):
        p = shutil.which(c) if not os.path.isabs(c) else (c if os.access(c, os.X_OK) else None)
        if p:
            return p
    return None


def screenshot_html(html_path: str | os.PathLike[str], png_path: str | os.PathLike[str], width: int = 1280,
                    height: int = 1800, timeout: float = 60.0) -> None:
    """Render ``html_path`` in a WIDTHxHEIGHT headless window and write its PNG to ``png_path``."""
    exe = find_chromium()
    if not exe:
        raise BrowserError("--screenshot needs chromium, which was not found; install it (Debian: apt-get install "
                           "chromium) or set GGUF_EXPERTS_CHROMIUM to its path")
    with tempfile.TemporaryDirectory(prefix="gguf-experts-chromium-") as profile:
        # chromium decides what a file:// page is by its name: the HTML may still be a .tmp file here
        page = Path(profile) / "report.html"
        shutil.copyfile(html_path, page)
        url = page.as_uri()
        shot = Path(profile) / "shot.png"  # and the image format by the screenshot's name
        try:
            proc = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                                   f"--screenshot={shot}", url], stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"{html_path}: chromium did not finish the screenshot in {timeout:.0f} s") from None
        if proc.returncode != 0 or not shot.is_file() or shot.stat().st_size == 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BrowserError(f"{html_path}: chromium wrote no screenshot (exit {proc.returncode}: {last})")
        shutil.copyfile(shot, png_path)
