"""hwmon power meters (ACPI power_meter, Grace Hopper) against trees shaped like sysfs."""

from __future__ import annotations

import pytest

from llem.errors import SensorUnavailable
from llem.sampler import Sampler
from llem.sensors import hwmon
from llem.sensors.base import ERROR, OK, POWER_POLL
from llem.units import RESET
from tests.helpers.meters import FakeHwmon, Sink, StepClock


@pytest.fixture
def tree(tmp_path):
    return FakeHwmon(tmp_path / "hwmon")


def sample(sensor, steps):
    clock, sink = StepClock(), Sink()
    sampler = Sampler([sensor], [sink], clock=clock, interval_s=1.0)
    sampler.start()
    for seconds, change in steps:
        clock.step(seconds)
        if change:
            change()
        sampler.tick()
    return sink


def energy_j(sink, key):
    return sum(r.energy_uj for i in sink.intervals for r in i.rows if r.device_key == key) / 1e6


def test_acpi_node_meter_power_is_integrated_between_reads(tree):
    tree.add("node", 350_000_000, window_ms=1000, in_device=True)
    tree.add("coretemp", 0, name="coretemp")
    sensor = hwmon.HwmonSensor(tree.path)
    (dev,) = sensor.devices()
    assert (dev.key, dev.component, dev.method) == ("hwmon:node", "psys", POWER_POLL)
    assert dev.attrs["meter"] == "node" and dev.attrs["averaging_window_ms"] == 1000
    sink = sample(sensor, [(2.0, None), (1.0, lambda: tree.set("node", 500_000_000)), (0.5, None)])
    # Each interval at the power the meter reports at its end: 2x350 + 1x500 + 0.5x500.
    assert energy_j(sink, "hwmon:node") == pytest.approx(1450.0, abs=1e-6)


def test_grace_hopper_module_grace_and_rails(tree):
    for s in (0, 1):
        tree.add(f"module{s}", 900_000_000, f"Module Power Socket {s}", window_ms=50)
        tree.add(f"grace{s}", 250_000_000, f"Grace Power Socket {s}", window_ms=50)
        tree.add(f"cpu{s}", 200_000_000, f"CPU Power Socket {s}", window_ms=50)
        tree.add(f"sysio{s}", 30_000_000, f"SysIO Power Socket {s}", window_ms=50)
    sensor = hwmon.HwmonSensor(tree.path)
    devs = {d.name: d for d in sensor.devices()}
    assert set(devs) == {"module-0", "module-1", "grace-0", "grace-1"}
    assert devs["module-1"].component == "psys" and devs["module-1"].attrs["meter"] == "module"
    assert devs["grace-0"].component == "cpu"
    assert sum("rail inside the Grace CPU" in n for n in sensor.notes) == 4
    sink = sample(sensor, [(1.0, None)] * 3)
    # platform = modules - Grace (no GPU sensor here): 2 x (900 - 250) W for 3 s.
    assert energy_j(sink, "platform:node") == pytest.approx(3900.0, abs=1e-3)
    assert energy_j(sink, "hwmon:grace-0") == pytest.approx(750.0, abs=1e-3)


def test_a_node_meter_wins_over_module_meters(tree):
    tree.add("node", 1_000_000_000)
    tree.add("module0", 900_000_000, "Module Power Socket 0")
    notes: list[str] = []
    found = hwmon.find_meters(tree.path, notes)
    assert [m.name for m in found] == ["node"]
    assert "modules are not read" in notes[0]


def test_a_failed_read_restarts_the_integration_as_a_recorded_gap(tree):
    tree.add("node", 300_000_000)
    sensor = hwmon.HwmonSensor(tree.path)
    sink = sample(
        sensor,
        [
            (1.0, None),
            (1.0, lambda: tree.set("node", "garbage")),
            (5.0, lambda: tree.set("node", 300_000_000)),
            (1.0, None),
        ],
    )
    node = [r for i in sink.intervals for r in i.rows if r.device_key == "hwmon:node"]
    assert [r.status for r in node] == [OK, ERROR, OK, OK]
    assert [r.kind for r in node] == ["ok", "gap", RESET, "ok"]
    # Never the 300 W carried across the 5 s of failure: only the two good intervals.
    assert energy_j(sink, "hwmon:node") == pytest.approx(600.0, abs=1e-6)


def test_unknown_meters_and_missing_tree(tree, tmp_path):
    tree.add("x", 1, "Some Vendor Rail")
    with pytest.raises(SensorUnavailable):
        hwmon.HwmonSensor(tree.path)
    notes: list[str] = []
    hwmon.find_meters(tree.path, notes)
    assert "unknown scope" in notes[0]
    probe = hwmon.probe(tmp_path / "nothing")
    assert not probe.available and "acpi_power_meter" in probe.problems[0]


def test_probe_says_the_averaging_window(tree):
    tree.add("node", 400_000_000, window_ms=30000)
    probe = hwmon.probe(tree.path)
    assert probe.available
    assert any("averaging window 30000 ms" in n for n in probe.notes)


def test_jobs_shorter_than_the_meter_window_are_flagged(tmp_path, tree):
    from llem.node.jobs import seal_figures
    from llem.node.store import NodeStore

    tree.add("node", 300_000_000, window_ms=30_000)
    store = NodeStore(tmp_path / "node.db")
    store.register_devices(hwmon.HwmonSensor(tree.path).devices(), 0)
    s = 1_000_000_000
    _, short = seal_figures(store, 1, 1_700_000_000 * s, 1_700_000_010 * s)
    _, long = seal_figures(store, 2, 1_700_000_000 * s, 1_700_000_060 * s)
    assert "shorter_than_meter_window" in short
    assert "shorter_than_meter_window" not in long
