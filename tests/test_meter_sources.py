"""One source per physical device: which sensor measures what when several could."""

from __future__ import annotations

from llem.config import Config
from llem.sensors import OpenedSensors, meters, open_sensors
from llem.sensors.base import Device
from tests.helpers.meters import FakeHwmon
from tests.pmcounters import FakePmCounters
from tests.powercap import FakePowercap


class FakeNvml:
    name = "nvml"

    def devices(self):
        return [Device("nvml:GPU-a", "gpu", "gpu0", "nvml", "measured", "counter")]


def env(tmp_path, **roots):
    base = {
        "LLEM_PM_COUNTERS_ROOT": str(tmp_path / "none-pm"),
        "LLEM_POWERCAP_ROOT": str(tmp_path / "none-pc"),
        "LLEM_HWMON_ROOT": str(tmp_path / "none-hw"),
    }
    base.update({k: str(v) for k, v in roots.items()})
    return base


def keys(opened):
    return [d.key for s in opened.sensors for d in s.devices()]


def test_pm_counters_measures_the_cpus_rapl_is_not_read(tmp_path):
    pm = FakePmCounters(tmp_path / "pm")
    pc = FakePowercap(tmp_path / "pc")
    pc.add_socket(0)
    hw = FakeHwmon(tmp_path / "hw")
    hw.add("node", 300_000_000)
    opened = open_sensors(
        Config(sensors=("pm_counters", "rapl", "hwmon")),
        env=env(
            tmp_path,
            LLEM_PM_COUNTERS_ROOT=pm.path,
            LLEM_POWERCAP_ROOT=pc.path,
            LLEM_HWMON_ROOT=hw.path,
        ),
    )
    assert [s.name for s in opened.sensors] == ["pm_counters"]
    assert any(n.startswith("rapl: not read: pm_counters") for n in opened.notes)
    assert any(n.startswith("hwmon: power meters not read") for n in opened.notes)


def test_an_acpi_meter_with_rapl_parts(tmp_path):
    pc = FakePowercap(tmp_path / "pc")
    pc.add_socket(0)
    hw = FakeHwmon(tmp_path / "hw")
    hw.add("node", 300_000_000)
    opened = open_sensors(
        Config(sensors=("rapl", "hwmon")),
        env=env(tmp_path, LLEM_POWERCAP_ROOT=pc.path, LLEM_HWMON_ROOT=hw.path),
    )
    assert sorted(keys(opened)) == ["hwmon:node", "rapl:dram-0", "rapl:package-0"]


def test_nvml_gpus_win_over_pm_counters_accels(tmp_path):
    pm = FakePmCounters(tmp_path / "pm")
    from llem.sensors import pm_counters

    out = OpenedSensors([pm_counters.PmCountersSensor(pm.path), FakeNvml()])
    meters.one_source_per_gpu(out)
    assert keys(out) == ["pm_counters:node", "pm_counters:cpu", "pm_counters:memory", "nvml:GPU-a"]
    assert any("measured by nvml" in n for n in out.notes)


def test_without_a_vendor_library_the_accels_measure_the_gpus(tmp_path):
    pm = FakePmCounters(tmp_path / "pm")
    opened = open_sensors(
        Config(sensors=("pm_counters",)), env=env(tmp_path, LLEM_PM_COUNTERS_ROOT=pm.path)
    )
    assert "pm_counters:accel3" in keys(opened)
