"""The HTML report opens in headless Chromium and renders (a screenshot is produced).

The screenshot is kept as a test artefact in ``$TMPDIR/llem-report-artefacts/`` (not
committed). Without a ``chromium`` executable the test is skipped, except under CI (env
``CI`` set), where a missing browser is a failure.
"""

import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from llem.cluster import report_queries as q
from llem.report import build_report, frames, plots, render
from tests.helpers.report_data import NOVEMBER, Job, build_ledger, report_config

ARTEFACTS = Path(tempfile.gettempdir()) / "llem-report-artefacts"
WIDTH, HEIGHT = 1200, 2000


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI"):
        pytest.fail(
            "chromium is not installed but CI is set: install the Debian package "
            "'chromium' in the CI image"
        )
    pytest.skip(
        "chromium is not installed (Debian package 'chromium'); the HTML report was not rendered"
    )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def headless(exe: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def screenshot(exe: str, page: Path, png: Path, profile: Path) -> subprocess.CompletedProcess:
    return headless(exe, page, profile, f"--screenshot={png}", f"--window-size={WIDTH},{HEIGHT}")


# Names are users' own text: an account that tries to inject a script, a user and a tag with
# markup and ampersands.
HOSTILE_ACCOUNT = "<script>document.title='pwned'</script> & co"
HOSTILE = [
    Job(
        "301", "n1", "2023-11-02 08:00", 3600, "eve<i>&amp;", HOSTILE_ACCOUNT, "gpu", "<b>tag</b>&"
    ),
    *NOVEMBER[:2],
]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    ledger_path = build_ledger(tmp_path_factory.mktemp("hostile"), HOSTILE)
    with q.open_readonly(ledger_path) as ledger:
        return build_report(
            ledger, report_config(ledger_path), frames.month_period("2023-11"), with_previous=False
        )


def test_names_are_escaped_in_the_html(hostile):
    page = render.to_html(hostile, {})
    assert "<script" not in page and "<i>" not in page and "<b>tag" not in page
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt; &amp; co" in page
    assert "eve&lt;i&gt;&amp;amp;" in page  # escaped once more, shown as typed
    assert "&lt;b&gt;tag&lt;/b&gt;&amp;" in page
    statement = build_statement(hostile)
    assert "<script" not in statement and "&lt;script&gt;" in statement


def build_statement(rep) -> str:
    """The same report as a statement for the hostile account (its name in the title)."""
    from dataclasses import replace

    return render.to_html(replace(rep, account=HOSTILE_ACCOUNT), {})


def test_a_browser_shows_hostile_names_as_text(hostile, tmp_path):
    exe = chromium()
    page = tmp_path / "hostile.html"
    page.write_text(build_statement(hostile), encoding="utf-8")
    res = headless(exe, page, tmp_path / "profile", "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert "<body" in dom and "</table>" in dom  # the page was parsed and serialised
    assert "<script" not in dom  # no element was injected, so no script ran...
    title = re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert "pwned" in title and title.startswith("Energy statement: account &lt;script&gt;")
    assert "<td>&lt;script&gt;document.title='pwned'&lt;/script&gt; &amp; co</td>" in dom


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
