"""BMC power over IPMI DCMI against a real BMC simulator (OpenIPMI's ipmi_sim, DCMI power
readings served by tests/ipmisim/dcmi_power.c), read by the real FreeIPMI ipmi-dcmi and
ipmitool over LAN. A missing simulator fails the tests: run scripts/install-ipmi.sh as root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from llem import config as config_mod
from llem.errors import SensorReadError, SensorUnavailable
from llem.sampler import Sampler
from llem.sensors import ipmi, open_sensors, probe_all
from llem.sensors.base import ERROR, OK, POWER_POLL
from llem.units import NS_PER_S
from tests.helpers.meters import FakeHwmon, Sink, StepClock
from tests.ipmisim.lib import PASSWORD, Bmc, SimulatorMissing

TOOLS = ("ipmi-dcmi", "ipmitool")


@pytest.fixture(scope="module")
def bmc(tmp_path_factory):
    try:
        b = Bmc(tmp_path_factory.mktemp("bmc"))
    except SimulatorMissing as e:
        pytest.fail(str(e))
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def password(monkeypatch):
    monkeypatch.setenv("IPMI_PASSWORD", PASSWORD)  # ipmitool -E


def args(bmc, tool):
    return bmc.freeipmi_args() if tool == "ipmi-dcmi" else bmc.ipmitool_args()


class Clock:
    """The sensor's own clock, stepped by the test (the age of the BMC's answers)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("tool", TOOLS)
def test_the_instantaneous_power_never_the_average(bmc, tool):
    bmc.set(watts=432, min=100, max=900, avg=250, period_ms=60_000)
    sensor = ipmi.IpmiSensor(tool, args(bmc, tool), start=False)
    try:
        (dev,) = sensor.devices()
        assert dev.component == "psys" and dev.attrs["meter"] == "node"
        assert dev.method == POWER_POLL and dev.attrs["tool"] == tool
        assert "432 W" in sensor.notes[0]
        sensor.read(0)
        (r,) = sensor.read(2 * NS_PER_S)
        assert r.status == OK and r.energy_uj == 864_000_000  # 432 W x 2 s
    finally:
        sensor.close()


@pytest.mark.parametrize("tool", TOOLS)
def test_an_inactive_measurement_or_an_error_code_is_refused(bmc, tool):
    bmc.set(watts=432, active=0)
    with pytest.raises(SensorUnavailable, match="not active"):
        ipmi.IpmiSensor(tool, args(bmc, tool), start=False)
    bmc.set(watts=0, cc=0xD5)  # "not supported in present state"
    with pytest.raises(SensorUnavailable, match="no DCMI power reading"):
        ipmi.IpmiSensor(tool, args(bmc, tool), start=False)


def test_parse_rejects_output_without_a_reading():
    with pytest.raises(SensorReadError, match="no power reading"):
        ipmi.parse("ipmitool", "Average power reading over sample period: 221 Watts\n")
    with pytest.raises(SensorReadError, match="no power reading"):
        ipmi.parse("ipmi-dcmi", "Average Power over sampling duration : 221 watts\n")


def test_a_failed_read_is_a_recorded_gap_never_power_carried(bmc):
    bmc.set(watts=300)
    clock = Clock()
    sensor = ipmi.IpmiSensor("ipmitool", bmc.ipmitool_args(), clock=clock, start=False)
    tick, sink = StepClock(), Sink()
    sampler = Sampler([sensor], [sink], clock=tick, interval_s=1.0)
    sampler.start()
    try:
        steps = [(300, {}), (0, {"cc": 0xD5}), (300, {}), (300, {})]
        for watts, more in steps:
            bmc.set(watts=watts, **more)
            sensor.poll_once()
            tick.step(5.0 if more else 1.0)
            sampler.tick()
        rows = [i.rows[0] for i in sink.intervals]
        assert [r.status for r in rows] == [OK, ERROR, OK, OK]
        assert [r.kind for r in rows] == ["ok", "gap", "reset", "ok"]
        assert [r.energy_uj for r in rows] == [300_000_000, 0, 0, 300_000_000]
        bmc.set(watts=0, cc=0xD5)
        sensor.poll_once()
        (r,) = sensor.read(tick.monotonic_ns())
        assert r.status == ERROR
        assert "ipmitool exited 1" in r.error and "not supported in present state" in r.error
    finally:
        sensor.close()


def test_a_hung_bmc_never_delays_the_tick(bmc):
    """The BMC holds its answer 3 s (ipmi_sim is single-threaded: it hangs); the thread's
    read is killed after 1 s; the ticks go on at their pace, then the answer is stale (a
    gap), then the BMC recovers and a new series starts."""
    bmc.set(watts=250)
    sensor = ipmi.IpmiSensor("ipmitool", bmc.ipmitool_args(), poll_s=0.2, timeout_s=1.0, start=True)
    tick, sink = StepClock(), Sink()
    sampler = Sampler([sensor], [sink], clock=tick, interval_s=0.2)
    sampler.start()
    try:
        time.sleep(0.3)
        bmc.set(watts=250, delay_ms=3000)
        slowest = 0.0
        seen_errors = set()
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:  # ticks while the BMC hangs
            time.sleep(0.2)
            tick.step(0.2)
            t0 = time.perf_counter()
            sampler.tick()
            slowest = max(slowest, time.perf_counter() - t0)
            with sensor._lock:
                seen_errors.add(sensor._error or "")
        bmc.set(watts=250)
        deadline = time.monotonic() + 30  # ipmi_sim drains the held requests, then answers
        while time.monotonic() < deadline:
            time.sleep(0.2)
            tick.step(0.2)
            sampler.tick()
            if sink.intervals[-1].rows[0].status == OK and sink.intervals[-2].rows[0].status == OK:
                break
        rows = [i.rows[0] for i in sink.intervals]
        assert slowest < 0.1, f"a tick took {slowest * 1e3:.0f} ms while the BMC hung"
        assert ERROR in [r.status for r in rows], "the hung BMC left no gap"
        first_error = [r.status for r in rows].index(ERROR)
        assert any(r.kind == "reset" for r in rows[first_error:])  # a new series after it
        assert rows[-1].status == OK and rows[-1].energy_uj == 50_000_000  # 250 W x 0.2 s
        assert "did not answer within 1 s" in "\n".join(seen_errors), seen_errors
    finally:
        sensor.close()


def test_open_sensors_reads_the_bmc_only_without_another_meter(bmc, tmp_path):
    bmc.set(watts=500)
    on = config_mod.IpmiConfig(enabled=True, tool="ipmitool", args=" ".join(bmc.ipmitool_args()))
    hw = FakeHwmon(tmp_path / "hwmon")
    env = {
        "LLEM_HWMON_ROOT": str(hw.path),
        "LLEM_POWERCAP_ROOT": str(tmp_path / "none"),
        "LLEM_PM_COUNTERS_ROOT": str(tmp_path / "none"),
    }

    def names(cfg):
        opened = open_sensors(cfg, env=env)
        opened.close()
        return [s.name for s in opened.sensors if s.name in ("ipmi", "hwmon")], opened.notes

    found, notes = names(config_mod.Config(ipmi=on))
    assert found == ["ipmi"] and any("the BMC answered 500 W" in n for n in notes)
    off, _ = names(config_mod.Config())  # auto without ipmi.enabled: the BMC is not asked
    assert off == []
    hw.add("node", 400_000_000)  # an ACPI power meter: finer than the BMC
    found, notes = names(config_mod.Config(ipmi=on))
    assert found == ["hwmon"]
    assert any("the BMC is not read" in n for n in notes)


def test_doctor_says_why_not(bmc, tmp_path):
    probes = {p.sensor: p for p in probe_all(config_mod.Config(), env={})}
    assert not probes["ipmi"].available
    assert "ipmi.enabled: false" in probes["ipmi"].problems[0]
    on = config_mod.IpmiConfig(enabled=True, tool="ipmitool", args=" ".join(bmc.ipmitool_args()))
    bmc.set(watts=0, cc=0xD5)
    down = ipmi.probe(on)
    assert not down.available and "no DCMI power reading" in down.problems[0]
    bmc.set(watts=321)
    up = ipmi.probe(on)
    assert up.available and "321 W" in up.notes[0]


def test_llem_wrap_json_with_the_bmc_as_node_meter(bmc, tmp_path):
    """`llem wrap` with the BMC as the node meter and the estimate model for the CPU: the
    meter row is the BMC's, and the platform residual is the meter minus the CPU."""
    bmc.set(watts=400)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env.update(
        LLEM_CONFIG="/dev/null",
        LLEM_SENSORS="ipmi,estimate",
        LLEM_IPMI_TOOL="ipmi-dcmi",
        LLEM_IPMI_ARGS=" ".join(bmc.freeipmi_args()),
        LLEM_IPMI_POLL_S="0.2",
        LLEM_POWERCAP_ROOT=str(tmp_path / "none"),
    )
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "wrap", "--json", "--interval", "0.5"]
        + ["--", "sleep", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    by = {c["device"]: c for c in out["components"]}
    assert by["bmc"]["component"] == "psys" and by["bmc"]["sensor"] == "ipmi"
    meter_w = by["bmc"]["energy_j"] / out["duration_s"]
    assert meter_w == pytest.approx(400, rel=0.3)  # the sampled window inside the run
    parts = sum(c["energy_j"] for c in out["components"] if c["component"] in ("cpu", "dram"))
    residual = by["bmc"]["energy_j"] - parts
    if not out["events"]:
        assert by["platform"]["energy_j"] == pytest.approx(residual, abs=0.01)
    else:  # a part's gap (on a loaded machine): that interval has no platform data
        assert by["platform"]["coverage"] < 1 and by["platform"]["energy_j"] < residual
