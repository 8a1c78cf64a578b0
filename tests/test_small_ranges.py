"""Counters whose range is small for their power are read often enough that no wrap hides.

A 1,000 J package counter at 50 W wraps every 20 s; read once per 1 s interval with the
generic 1,000 W plausibility bound, one read could hide a whole range, and those steps were
gaps (52 % of the energy lost). The sampler now sub-reads such counters between intervals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from llem.model import Interval
from llem.sampler import MIN_COUNTER_READ_S, Sampler, counter_read_s
from llem.units import GAP, OK, WRAP
from tests.fakes import FakeClock, FakeSensor
from tests.powercap import FakePowercap

RANGE_UJ = 1_000_000_000  # 1,000 J


class Collect:
    def __init__(self) -> None:
        self.intervals: list[Interval] = []

    def register_devices(self, devices, ts_ns) -> None:
        pass

    def write(self, interval: Interval) -> None:
        self.intervals.append(interval)


def sampler(sensor, interval_s=1.0):
    clock, sink = FakeClock(), Collect()
    return (
        Sampler([sensor], [sink], clock=clock, interval_s=interval_s, sampler_id="t"),
        clock,
        sink,
    )


def test_read_period_is_half_a_range_at_plausible_power():
    s, _, _ = sampler(FakeSensor({"p": 0}, max_range_uj=RANGE_UJ, max_power_w=1000.0))
    assert s.counter_read_s == pytest.approx(0.5)
    assert counter_read_s(s.devices[0]) == pytest.approx(0.5)
    # No range (NVML) or a range that outlasts the interval: no sub-reads.
    assert sampler(FakeSensor({"g": 0}, max_power_w=700.0))[0].counter_read_s is None
    big = FakeSensor({"p": 0}, max_range_uj=262_143_328_850, max_power_w=1000.0)
    assert sampler(big)[0].counter_read_s is None
    tiny = FakeSensor({"p": 0}, max_range_uj=1_000_000, max_power_w=1000.0)  # needs 0.5 ms
    assert sampler(tiny)[0].counter_read_s == MIN_COUNTER_READ_S


def test_sub_reads_carry_wraps_into_one_interval():
    sensor = FakeSensor({"p": RANGE_UJ - 100_000_000}, max_range_uj=RANGE_UJ, max_power_w=1000.0)
    s, clock, sink = sampler(sensor, interval_s=10.0)
    s.start()
    for _ in range(20):  # 10 s at 300 W in 0.5 s steps: 3,000 J, three wraps
        clock.advance(0.5)
        sensor.counters["p"] = (sensor.counters["p"] + 150_000_000) % RANGE_UJ
        s.subread()
    interval = s.tick()
    (row,) = interval.rows
    assert (row.energy_uj, row.kind, row.status) == (3_000_000_000, WRAP, OK)
    # The next interval starts from the last sub-read, with nothing pending.
    clock.advance(1.0)
    sensor.counters["p"] += 5
    (row,) = s.tick().rows
    assert (row.energy_uj, row.kind) == (5, OK)


def test_without_sub_reads_the_same_counter_is_a_gap():
    """The failure this fixes: one read per 10 s interval cannot tell how many wraps passed."""
    sensor = FakeSensor({"p": 0}, max_range_uj=RANGE_UJ, max_power_w=1000.0)
    s, clock, _ = sampler(sensor, interval_s=10.0)
    s.start()
    clock.advance(10.0)
    sensor.counters["p"] = 500_000_000
    (row,) = s.tick().rows
    assert (row.energy_uj, row.kind) == (0, GAP)


def test_an_impossible_step_between_intervals_is_a_recorded_gap_not_energy():
    sensor = FakeSensor({"p": 0}, max_range_uj=RANGE_UJ, max_power_w=1000.0)
    s, clock, _ = sampler(sensor, interval_s=10.0)
    s.start()
    clock.advance(0.5)
    sensor.counters["p"] = 50_000_000
    s.subread()
    clock.advance(0.5)
    sensor.counters["p"] = 950_000_000  # 900 J in 0.5 s: 1,800 W, beyond the bound
    s.subread()
    clock.advance(0.5)
    sensor.counters["p"] = 960_000_000
    interval = s.tick()
    (row,) = interval.rows
    assert (row.energy_uj, row.kind) == (0, GAP)
    assert [e.kind for e in interval.events] == ["counter_gap"]


class Writer(threading.Thread):
    """Advances a powercap counter at a constant power, wrapping at its range, like RAPL."""

    def __init__(self, tree: FakePowercap, zone: str, power_w: float) -> None:
        super().__init__(daemon=True)
        self.tree, self.zone, self.power_w = tree, zone, power_w
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        base = self.tree.get(self.zone)
        path = self.tree.zones[self.zone] / "energy_uj"
        tmp = path.with_name(".energy_uj.tmp")
        while not self.stop.wait(0.01):
            energy = base + int(self.power_w * (time.monotonic() - t0) * 1e6)
            # Replaced whole, as sysfs serves a value: a reader never sees a half-written file.
            tmp.write_text(f"{energy % RANGE_UJ}\n")
            os.replace(tmp, path)


def test_llem_wrap_loses_nothing_on_a_1000_j_counter_at_50_w(live_tmp):
    # the counter file is rewritten every 10 ms while llem reads it: in memory, as the other
    # live fakes (tests.helpers.memory), since a rename on a disk under write load can stall
    # for 100 ms and more, and the counter with it (CI: 1275.6 J against 1250.1 +- 2 %, with a
    # PostgreSQL VACUUM writing beside it)
    tree = FakePowercap(live_tmp / "pc")
    tree.add_zone("0", "package-0", 0, RANGE_UJ)
    writer = Writer(tree, "intel-rapl:0", 50.0)
    writer.start()
    env = {
        "PATH": "/usr/bin:/bin",
        "LLEM_CONFIG": "/dev/null",
        "LLEM_SENSORS": "rapl",
        "LLEM_POWERCAP_ROOT": str(tree.path),
    }
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "llem.cli.main",
                "wrap",
                "--json",
                "--interval",
                "1",
                "--",
                "sleep",
                "25",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=90,
        )
    finally:
        writer.stop.set()
        writer.join()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (package,) = out["components"]
    assert package["coverage"] == 1.0
    assert package["energy_j"] == pytest.approx(50.0 * out["duration_s"], rel=0.02)
    assert package["energy_j"] == pytest.approx(1250.0, rel=0.02)


def test_rapl_takes_the_zones_own_power_limits_with_a_margin(tmp_path):
    from llem.sensors.rapl import CONSTRAINT_MARGIN, PACKAGE_MAX_POWER_W, RaplSensor

    tree = FakePowercap(tmp_path / "pc")
    zone = tree.add_zone("0", "package-0", 0, RANGE_UJ)
    tree.add_zone("1", "package-1", 0, RANGE_UJ)
    (zone / "constraint_0_max_power_uw").write_text("100000000\n")  # long term: 100 W
    (zone / "constraint_1_max_power_uw").write_text("120000000\n")  # short term: 120 W
    sensor = RaplSensor(root=tree.path)
    try:
        power = {d.name: d.max_power_w for d in sensor.devices()}
    finally:
        sensor.close()
    assert power == {"package-0": 120.0 * CONSTRAINT_MARGIN, "package-1": PACKAGE_MAX_POWER_W}
