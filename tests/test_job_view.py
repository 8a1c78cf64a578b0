"""``llem job JOBID`` (issue 18): a job built by a node's production code (node store, the
sampler's attribution, windows with work, the Epilog's seal and export), merged into a real
ledger, then shown by the command in words, JSON, PNG and HTML."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llem import slices
from llem.cli.job import refusal
from llem.cluster.job_queries import load_job
from llem.cluster.ledger import Ledger, digest
from llem.node.export import export_job
from llem.node.jobs import seal
from tests.helpers.nodes import (
    GPU_MINOR,
    T0,
    S,
    add_intervals,
    build_store,
    node_config,
    prolog_env,
    register,
)

LLEM = [sys.executable, "-m", "llem.cli.main"]
START = T0 + 1800 * S
NAME = "<b>gen</b>\x1b[31m"  # a job name with markup and a terminal escape


@pytest.fixture
def ledger_config(tmp_path):
    """Job 100 on n1: 30 min with its GPU at 250 W, then 30 min with it idle at 40 W; a
    window 'gen' of 1,000,000 tokens; then sealed, exported and merged."""
    store, run_id = build_store(
        tmp_path / "s" / "node.db", seconds=1800, end=False, windows=False, name=NAME
    )
    add_intervals(store, run_id, START + 1800 * S, 1800, 60, gpu_uw=40_000_000, first_id=30)
    window = store.open_window(run_id, "100", "0", "gen", 1000, 7, START + 120 * S, 2, {})
    energy = store.run_energy_between(run_id, 2, 20)
    store.close_window(window, START + 1200 * S, 20, {}, energy, 1e6, "tokens")
    env = prolog_env("100", "n1", "n1", "alice", NAME, str(GPU_MINOR))
    register(store, "end", env, START + 3600 * S)
    seal(store, store.run(run_id))
    data = export_job(store, run_id, node_config(tmp_path), now_ns=T0 + 5 * 3600 * S)
    store.close()
    path = tmp_path / "lib" / "ledger.db"
    path.parent.mkdir(mode=0o755)
    with Ledger(path) as ledger:
        ledger.merge(
            [(data, digest(slices.encode(data)))], now_ns=T0 + 6 * 3600 * S, grace_s=3600.0
        )
    config = tmp_path / "llem.yaml"
    config.write_text(f"cluster: c1\nledger: {path}\ncarbon:\n  intensity_g_per_kwh: 400\n")
    return config, data


def job(config, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env["LLEM_CONFIG"] = str(config)
    return subprocess.run(
        LLEM + ["job", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_json_view_holds_the_job_by_device_its_idle_gpu_windows_and_timeline(
    ledger_config,
):
    config, data = ledger_config
    r = job(config, "100", "--json")
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["schema"] == "llem.job/1" and view["name"] == NAME  # JSON escapes it
    energy_j = sum(e["energy_uj"] for e in data["energy"]) / 1e6
    assert view["energy_j"] == pytest.approx(energy_j, abs=1e-3)
    assert view["average_power_w"] == pytest.approx(energy_j / 3600, rel=1e-3)
    (node,) = view["nodes"]
    gpu = next(d for d in node["devices"] if d["component"] == "gpu")
    # 30 min at 250 W then 30 min at 40 W: the idle level is the lowest minute, 40 W.
    assert gpu["energy_j"] == pytest.approx(1800 * 250 + 1800 * 40)
    assert gpu["idle_power_w"] == pytest.approx(40.0)
    assert gpu["idle_energy_j"] == pytest.approx(1800 * 40)
    assert view["gpu_idle_energy_j"] == pytest.approx(1800 * 40)
    # The timeline: one point a minute, the job's power; the peak is a busy minute.
    timeline = view["timeline"]
    assert timeline["step_s"] == 60 and len(timeline["watts"]) == 60
    assert [w for _, w in timeline["gpu_watts"]] == [250.0] * 30 + [40.0] * 30
    assert view["peak_power_w"] == max(w for _, w in timeline["watts"])
    assert view["peak_power_w"] > view["average_power_w"]
    (window,) = view["windows"]
    assert window["work"] == 1e6 and window["unit"] == "tokens"
    assert window["energy_per_unit_j"] == pytest.approx(window["energy_j"] / 1e6)
    assert window["gpu_energy_per_unit_j"] == pytest.approx(18 * 60 * 250 / 1e6)
    assert window["per_unit_basis"] == "attributed"
    assert view["co2e_g"] == pytest.approx(energy_j / 3.6e6 * 400, rel=1e-3)
    assert view["carbon"]["intensity_g_per_kwh"] == 400
    assert "gpu_index_assumed_minor" in view["flags"]
    assert any("minor number" in text for text in view["explained"])


def test_the_terminal_view_has_a_sparkline_and_safe_names(ledger_config):
    config, _ = ledger_config
    r = job(config, "100")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "\x1b" not in out and "<b>gen</b>\\x1b[31m" in out
    spark = next(line for line in out.splitlines() if line.strip().startswith("power "))
    bars = spark.split()[1]
    assert len(bars) == 60 and bars[:30] == "█" * 30 and set(bars[30:]) == {bars[-1]}
    assert bars[-1] != "█"
    assert "allocated GPUs while idle: 72.00 kJ" in out
    assert "1,000,000 tokens" in out and "J/unit (attributed)" in out
    assert "gpu_index_assumed_minor: the job's GPUs were matched" in out


def test_plot_and_html_files(ledger_config, tmp_path):
    config, _ = ledger_config
    png, page = tmp_path / "power.png", tmp_path / "job.html"
    r = job(config, "100", "--plot", str(png), "--html", str(page))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    assert "<svg" in html and "<polyline" in html
    assert "<b>gen</b>" not in html and "&lt;b&gt;gen&lt;/b&gt;" in html


def test_unknown_job_and_bad_id_are_clear_errors(ledger_config):
    config, _ = ledger_config
    r = job(config, "999")
    assert r.returncode == 1 and "no job 999 on cluster c1" in r.stderr
    r = job(config, "../etc")
    assert r.returncode == 2 and "JOBID" in r.stderr


def test_a_user_sees_their_own_jobs_and_root_every_job(ledger_config):
    config, _ = ledger_config
    ledger = config.read_text().split("ledger: ")[1].split("\n")[0]
    with Ledger(ledger, readonly=True) as led:
        run = load_job(led, "c1", "100").run
    assert refusal(run, 1000, "alice") is None  # the owner (uid 1000 in the Prolog)
    assert refusal(run, 0, "root") is None
    assert refusal(run, 1001, "bob") == (
        "job 100 is alice's: llem job shows a user their own jobs (root: every job)"
    )
