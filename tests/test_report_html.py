"""The HTML report opens in headless Chromium and renders (a screenshot is produced).

The screenshot is kept as a test artefact in ``$TMPDIR/llem-report-artefacts/`` (not
committed). Without a ``chromium`` executable the test is skipped, except under CI (env
``CI`` set), where a missing browser is a failure.
"""

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from llem.cluster import report_queries as q
from llem.report import build_report, frames, plots, render
from tests.helpers.report_data import NOVEMBER, build_ledger, report_config

ARTEFACTS = Path(tempfile.gettempdir()) / "llem-report-artefacts"
WIDTH, HEIGHT = 1200, 2000


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed but CI is set: install the Debian package "
                    "'chromium' in the CI image")
    pytest.skip("chromium is not installed (Debian package 'chromium'); the HTML report "
                "was not rendered")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def screenshot(exe: str, page: Path, png: Path, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={profile}", f"--screenshot={png}",
         f"--window-size={WIDTH},{HEIGHT}", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False)


def test_html_report_renders_in_headless_chromium(tmp_path):
    exe = chromium()
    ledger_path = build_ledger(tmp_path, NOVEMBER)
    with q.open_readonly(ledger_path) as ledger:
        rep = build_report(ledger, report_config(ledger_path), frames.month_period("2023-11"))
    page = tmp_path / "report.html"
    page.write_text(render.to_html(rep, plots.make_plots(rep)), encoding="utf-8")
    ARTEFACTS.mkdir(exist_ok=True)
    png = ARTEFACTS / "report-2023-11.png"
    png.unlink(missing_ok=True)
    res = screenshot(exe, page, png, tmp_path / "profile")
    assert res.returncode == 0, res.stderr[-2000:]
    assert png.exists(), res.stderr[-2000:]
    data = png.read_bytes()
    assert png_size(data) == (WIDTH, HEIGHT)
    assert len(data) > 50_000  # tables and plots drawn, not a blank page
    shutil.copy(page, ARTEFACTS / "report-2023-11.html")
    print(f"screenshot: {png}")
