"""`llem wrap --json` on a node meter: HPE Cray EX pm_counters advanced by a background
writer at known powers, like the node controller (ten updates a second)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.memory import memory_dir
from tests.pmcounters import FakePmCounters, PmWriter

LLEM = [sys.executable, "-m", "llem.cli.main"]
WATTS = {
    "energy": 400,
    "cpu_energy": 150,
    "memory_energy": 50,
    "accel0_energy": 40,
    "accel1_energy": 40,
    "accel2_energy": 40,
    "accel3_energy": 40,
}
EXPECTED_W = {
    "node": 400,
    "cpu": 150,
    "memory": 50,
    "accel0": 40,
    "accel1": 40,
    "accel2": 40,
    "accel3": 40,
    "platform": 40,
}


def wrap_json(fake, seconds, tmp_path, command=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env.update(
        LLEM_CONFIG="/dev/null",
        LLEM_PM_COUNTERS_ROOT=str(fake.path),
        LLEM_POWERCAP_ROOT=str(tmp_path / "no-powercap"),
        LLEM_HWMON_ROOT=str(tmp_path / "no-hwmon"),
        LLEM_SENSORS="auto",
    )
    r = subprocess.run(
        LLEM + ["wrap", "--json", "--interval", "0.5", "--", *(command or ["sleep", str(seconds)])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def window_s(out):
    t = [dt.datetime.fromisoformat(out[k].replace("Z", "+00:00")) for k in ("start", "end")]
    return (t[1] - t[0]).total_seconds()


@pytest.fixture
def fake(tmp_path):
    with memory_dir(tmp_path) as root:
        yield FakePmCounters(root / "pm_counters")


def test_node_energy_and_each_domain_within_2_percent_with_the_platform_residual(fake, tmp_path):
    writer = PmWriter(fake, WATTS, hz=20)
    writer.start()
    try:
        out, stderr = wrap_json(fake, 5, tmp_path)
    finally:
        writer.stop()
    # The budget of the 2% below on the platform (0.8 W, 4 J in 5 s): the residual is the node
    # minus six whole-joule counters, truncated at both ends of the window. Whole scans of
    # 1/20 s leave halves at most (cpu 7.5 J a scan, memory 2.5 J): 1 J of resolution, not 7.
    # The rest is the window's ends: each at most a scan (50 ms, 1% of 5 s) off the values read.
    assert all(j.denominator <= 2 for j in fake.joules.values()), fake.joules
    seconds = window_s(out)
    power = {c["device"]: c["energy_j"] / seconds for c in out["components"]}
    assert set(power) == set(EXPECTED_W)
    for device, watts in EXPECTED_W.items():
        assert power[device] == pytest.approx(watts, rel=0.02), device
    by_device = {c["device"]: c for c in out["components"]}
    assert by_device["node"]["component"] == "psys"
    assert by_device["platform"]["component"] == "platform"
    assert by_device["platform"]["method"] == "residual"
    assert by_device["platform"]["source"] == "measured"
    # Coverage: 1.0 in almost every run; under load one read in a run can miss the fake
    # controller's update window (1 run in 4 once, at a load of 8): the energy checks above
    # hold either way. Exactly 1.0 is what a quiet node gives (investigate if it drops more).
    assert all(c["coverage"] >= 0.9 for c in out["components"]), out["components"]
    # The node's energy is the meter's: the counted parts plus the platform add up to it.
    assert out["energy_j"] == pytest.approx(by_device["node"]["energy_j"], abs=0.01)
    assert out["energy_j"] / seconds == pytest.approx(400, rel=0.02)
    assert "platform" in stderr and "not added" in stderr


def test_a_counter_restart_mid_run_is_a_recorded_gap(fake, tmp_path):
    fake.advance(WATTS, 3600.0)  # an hour of counts before the restart: 1.44 MJ on the node
    writer = PmWriter(fake, WATTS, hz=20)
    flag = tmp_path / "restart-now"
    writer.restart_when = flag
    writer.start()
    try:
        # The command asks for the restart 1.5 s in: llem wrap has read the counters by then
        # (its first reading precedes the command), however long its own start took.
        out, _ = wrap_json(fake, 4, tmp_path, ["sh", "-c", f"sleep 1.5; : > '{flag}'; sleep 2.5"])
    finally:
        writer.stop()
    assert writer.restart_when is None, "the writer did not restart the counters"
    resets = [e for e in out["events"] if e["kind"] == "counter_reset"]
    assert {e["device"] for e in resets} >= {
        "pm_counters:node",
        "pm_counters:cpu",
        "pm_counters:accel0",
    }
    seconds = window_s(out)
    for c in out["components"]:
        assert 0 <= c["energy_j"] <= EXPECTED_W[c["device"]] * seconds * 1.02, c
        assert c["coverage"] < 1.0, c  # the interval across the restart has no data
        assert c["coverage"] > 0.6, c
    assert 0 < out["energy_j"] < 400 * seconds
