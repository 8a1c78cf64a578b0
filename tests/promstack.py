"""Debian's real node_exporter and Prometheus, started on the loopback by the tests.

Installed by scripts/install-prometheus.sh (scripts/test.sh runs it as root). A missing binary
fails the test: in CI a skipped real-parts test is a failure. Every process started here is
stopped here, by its pid, with bounded waits.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


def need(path: str) -> str:
    found = path if Path(path).exists() else shutil.which(Path(path).name)
    if not found:
        pytest.fail(f"{path} is missing: run scripts/install-prometheus.sh (as root)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout_s: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - loopback only
        return r.read()


def wait_for(what: str, check, timeout_s: float, every_s: float = 0.2):
    """Poll ``check()`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - keep polling, report the last one
            last_error = e
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last error: {last_error}")


def stop(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


class Stack:
    """node_exporter reading ``textfile_dir`` and Prometheus scraping it every second."""

    def __init__(self, textfile_dir: Path, work: Path) -> None:
        self.textfile_dir = textfile_dir
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.exporter_port = free_port()
        self.prom_port = free_port()

    @property
    def prom_url(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    @property
    def exporter_url(self) -> str:
        return f"http://127.0.0.1:{self.exporter_port}/metrics"

    def start(self) -> Stack:
        exporter = need(NODE_EXPORTER)
        prometheus = need(PROMETHEUS)
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.work / "node_exporter.log", "wb")
        self.procs.append(
            subprocess.Popen(
                [
                    exporter,
                    "--collector.disable-defaults",
                    "--collector.textfile",
                    f"--collector.textfile.directory={self.textfile_dir}",
                    f"--web.listen-address=127.0.0.1:{self.exporter_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for("node_exporter", lambda: http_get(self.exporter_url), 15)
        config = self.work / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: node\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{self.exporter_port}']\n"
        )
        log = open(self.work / "prometheus.log", "wb")
        self.procs.append(
            subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.prom_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for("prometheus ready", lambda: http_get(f"{self.prom_url}/-/ready"), 30)
        return self

    def query(self, expr: str) -> list[dict]:
        """An instant query: the result vector."""
        url = f"{self.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(http_get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess:
    """``promtool check metrics`` on an exposition: its lint findings."""
    return subprocess.run(
        [need(PROMTOOL), "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
