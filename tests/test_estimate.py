"""Tests of the estimate model sensor, on a fake /proc tree under tmp_path."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llem.config import EstimateConfig
from llem.errors import SensorUnavailable
from llem.sensors import estimate
from llem.sensors.base import ERROR, ESTIMATED, MODEL, OK
from llem.sensors.estimate import (
    EstimateSensor,
    cpu_model_tdp,
    load_tdp_table,
    normalise_model,
    probe,
)

S = 1_000_000_000  # ns per second
GIB_KB = 1024 * 1024  # kB (KiB) per GiB, as /proc/meminfo counts

XEON_6248 = "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz"
EPYC_7763 = "AMD EPYC 7763 64-Core Processor"


# --- the fake /proc ---------------------------------------------------------------------------


def cpuinfo_text(model: str | None, sockets: int = 1, cores: int | None = 4) -> str:
    """A /proc/cpuinfo with one logical CPU per core, ``sockets`` packages."""
    blocks = []
    n = 0
    for socket in range(sockets):
        for core in range(cores or 4):
            lines = [f"processor\t: {n}", "vendor_id\t: GenuineIntel"]
            if model is not None:
                lines.append(f"model name\t: {model}")
            lines.append(f"physical id\t: {socket}")
            if cores is not None:
                lines += [f"core id\t\t: {core}", f"cpu cores\t: {cores}"]
            blocks.append("\n".join(lines))
            n += 1
    return "\n\n".join(blocks) + "\n"


class FakeProc:
    """A procfs tree whose counters the test advances."""

    def __init__(self, root: Path, model: str | None = XEON_6248, sockets=1, cores=4):
        self.root = root
        self.busy = 0
        self.idle = 0
        self.steal = 0
        self.ncpu = sockets * (cores or 4)
        root.mkdir(parents=True, exist_ok=True)
        (root / "cpuinfo").write_text(cpuinfo_text(model, sockets, cores))
        self.write_stat()
        self.set_memory(total_gib=64, used_gib=16)

    def write_stat(self) -> None:
        # user nice system idle iowait irq softirq steal guest guest_nice; busy split across
        # user and system, and guest (already inside user) must not count twice.
        user, system = self.busy - self.busy // 4, self.busy // 4
        line = f"cpu  {user} 0 {system} {self.idle} 0 0 0 {self.steal} {user // 2} 0"
        per_cpu = [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(self.ncpu)]
        (self.root / "stat").write_text("\n".join([line, *per_cpu, "intr 0", "ctxt 0"]) + "\n")

    def advance(self, busy_ticks: int, idle_ticks: int, steal_ticks: int = 0) -> None:
        self.busy += busy_ticks
        self.idle += idle_ticks
        self.steal += steal_ticks
        self.write_stat()

    def set_memory(self, total_gib: float, used_gib: float) -> None:
        total_kb = int(total_gib * GIB_KB)
        avail_kb = int((total_gib - used_gib) * GIB_KB)
        (self.root / "meminfo").write_text(
            f"MemTotal:       {total_kb} kB\nMemFree:        {avail_kb // 2} kB\n"
            f"MemAvailable:   {avail_kb} kB\nBuffers:        0 kB\n"
        )


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def by_key(readings):
    return {r.device_key: r for r in readings}


def cpu_sensor(proc: FakeProc, tdp_w: float | None = 150.0, **kw) -> EstimateSensor:
    config = EstimateConfig(cpu_tdp_w=tdp_w, **kw)
    return EstimateSensor(config, components=("cpu",), proc_root=proc.root)


def write_table(path: Path, rows: list[tuple]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["vendor", "model", "match", "tdp_w", "cores", "source"])
        w.writerows(rows)
    return path


# --- CPU energy -------------------------------------------------------------------------------


def test_first_read_is_zero_and_energy_accrues_from_the_second(proc):
    sensor = cpu_sensor(proc)
    first = sensor.read(5 * S)
    assert [(r.energy_uj, r.status, r.mono_ns) for r in first] == [(0, OK, 5 * S)]
    proc.advance(busy_ticks=500, idle_ticks=500)
    assert sensor.read(15 * S)[0].energy_uj > 0


def test_half_utilisation_for_ten_seconds_is_975_joules(proc):
    # 150 W x (0.3 + 0.7 x 0.5) = 97.5 W; 97.5 W x 10 s = 975 J.
    sensor = cpu_sensor(proc)
    sensor.read(0)
    proc.advance(busy_ticks=500, idle_ticks=500)
    (reading,) = sensor.read(10 * S)
    assert reading.energy_uj == 975_000_000
    assert isinstance(reading.energy_uj, int)


@pytest.mark.parametrize(
    ("busy", "idle", "expected_uj"),
    [(0, 1000, 450_000_000), (1000, 0, 1_500_000_000), (250, 750, 712_500_000)],
)
def test_idle_full_and_quarter_load(proc, busy, idle, expected_uj):
    sensor = cpu_sensor(proc)
    sensor.read(0)
    proc.advance(busy, idle)
    assert sensor.read(10 * S)[0].energy_uj == expected_uj


def test_steal_time_is_not_this_nodes_work(proc):
    # In a VM, time the hypervisor gave to others counts in the total, not as busy: u = 0.4.
    sensor = cpu_sensor(proc)
    sensor.read(0)
    proc.advance(busy_ticks=400, idle_ticks=400, steal_ticks=200)
    assert sensor.read(10 * S)[0].energy_uj == 870_000_000  # 150 x (0.3 + 0.7 x 0.4) x 10


def test_energy_accumulates_over_intervals(proc):
    sensor = cpu_sensor(proc)
    sensor.read(0)
    proc.advance(500, 500)  # 97.5 W for 10 s
    sensor.read(10 * S)
    proc.advance(1000, 0)  # 150 W for 2 s
    assert sensor.read(12 * S)[0].energy_uj == 975_000_000 + 300_000_000


def test_two_sockets_each_get_the_package_energy(tmp_path):
    proc = FakeProc(tmp_path / "proc", sockets=2, cores=8)
    sensor = cpu_sensor(proc)
    devices = sensor.devices()
    assert [(d.key, d.name, d.attrs["socket"]) for d in devices] == [
        ("estimate:cpu-0", "package-0", 0),
        ("estimate:cpu-1", "package-1", 1),
    ]
    assert all(d.attrs["sockets"] == 2 for d in devices)
    sensor.read(0)
    proc.advance(500, 500)
    readings = sensor.read(10 * S)
    assert [r.energy_uj for r in readings] == [975_000_000, 975_000_000]


def test_idle_fraction_comes_from_config(proc):
    sensor = cpu_sensor(proc, tdp_w=200.0, cpu_idle_fraction=0.5)
    sensor.read(0)
    proc.advance(0, 1000)
    assert sensor.read(1 * S)[0].energy_uj == 100_000_000  # 200 W x 0.5 for 1 s


def test_cpu_devices_are_marked_estimated(proc):
    (device,) = cpu_sensor(proc).devices()
    assert (device.component, device.sensor, device.source, device.method) == (
        "cpu",
        "estimate",
        ESTIMATED,
        MODEL,
    )
    assert device.max_power_w == 150.0
    assert device.max_range_uj is None
    assert device.attrs["model_name"] == XEON_6248
    assert device.attrs["tdp_source"] == "config"
    assert device.attrs["tdp_fallback"] is False
    assert device.attrs["sockets"] == 1
    assert device.attrs["memory_total_bytes"] == 64 * 1024**3


# --- TDP choice -------------------------------------------------------------------------------


def test_tdp_from_the_shipped_table(proc):
    (device,) = EstimateSensor(components=("cpu",), proc_root=proc.root).devices()
    # FakeProc shows 4 cores of a 20-core part: scaled to 4/20 of 150 W.
    assert device.attrs["tdp_w"] == 30.0
    assert device.attrs["tdp_source"].startswith("table: Intel ARK: Xeon Gold 6248")
    assert "scaled to the 4 of 20 cores" in device.attrs["tdp_source"]


def test_tdp_from_table_unscaled_on_full_package(tmp_path):
    proc = FakeProc(tmp_path / "proc", model=XEON_6248, sockets=2, cores=20)
    sensor = EstimateSensor(components=("cpu",), proc_root=proc.root)
    assert [d.attrs["tdp_w"] for d in sensor.devices()] == [150.0, 150.0]
    assert sensor.devices()[0].attrs["tdp_source"] == "table: Intel ARK: Xeon Gold 6248"
    sensor.read(0)
    proc.advance(500, 500)
    assert [r.energy_uj for r in sensor.read(10 * S)] == [975_000_000] * 2


def test_vm_showing_part_of_a_package_is_scaled(tmp_path):
    proc = FakeProc(tmp_path / "proc", model=EPYC_7763, cores=4)
    (device,) = EstimateSensor(components=("cpu",), proc_root=proc.root).devices()
    assert device.attrs["tdp_w"] == 17.5  # 280 W x 4 / 64


def test_config_overrides_the_table(tmp_path):
    proc = FakeProc(tmp_path / "proc", model=XEON_6248, cores=20)
    sensor = EstimateSensor(
        EstimateConfig(cpu_tdp_w=99.0), components=("cpu",), proc_root=proc.root
    )
    (device,) = sensor.devices()
    assert (device.attrs["tdp_w"], device.attrs["tdp_source"]) == (99.0, "config")
    sensor.read(0)
    proc.advance(1000, 0)
    assert sensor.read(2 * S)[0].energy_uj == 198_000_000


def test_unknown_cpu_uses_the_per_core_fallback(tmp_path):
    table = write_table(
        tmp_path / "tdp.csv",
        [
            ("X", "A", "alpha 1", 100, 10, "s1"),  # 10 W/core
            ("X", "B", "alpha 2", 120, 20, "s2"),  # 6 W/core
            ("X", "C", "alpha 3", 160, 20, "s3"),  # 8 W/core
        ],
    )
    proc = FakeProc(tmp_path / "proc", model="Mystery CPU 9000", cores=5)
    sensor = EstimateSensor(components=("cpu",), proc_root=proc.root, tdp_table=table)
    (device,) = sensor.devices()
    assert device.attrs["tdp_w"] == 40.0  # median 8 W/core x 5 cores
    assert device.attrs["tdp_fallback"] is True
    assert device.attrs["tdp_source"].startswith("fallback: 8.00 W/core (median TDP/cores")
    sensor.read(0)
    proc.advance(0, 100)
    assert sensor.read(10 * S)[0].energy_uj == 120_000_000  # 40 W x 0.3 x 10 s


def test_the_fallback_warning_is_logged_once_per_process(tmp_path, caplog):
    """llem doctor opens the sensor twice: its warning came twice (seen on the GPU machine)."""
    estimate._warn_fallback.cache_clear()  # whatever ran before in this process
    proc = FakeProc(tmp_path / "proc", model="Mystery CPU 9001", cores=3)
    with caplog.at_level("WARNING", logger=estimate.log.name):
        for _ in range(3):
            EstimateSensor(components=("cpu",), proc_root=proc.root)
    warnings = [r for r in caplog.records if "not in the TDP table" in r.getMessage()]
    assert len(warnings) == 1 and "Mystery CPU 9001" in warnings[0].getMessage()


def test_fallback_is_capped_at_the_largest_tdp(tmp_path):
    table = write_table(tmp_path / "tdp.csv", [("X", "A", "alpha 1", 100, 10, "s1")])
    proc = FakeProc(tmp_path / "proc", model="Mystery", cores=64)
    (device,) = EstimateSensor(components=("cpu",), proc_root=proc.root, tdp_table=table).devices()
    assert device.attrs["tdp_w"] == 100.0


def test_unreadable_table_uses_the_builtin_fallback(tmp_path):
    proc = FakeProc(tmp_path / "proc", model="Mystery", cores=6)
    sensor = EstimateSensor(
        components=("cpu",), proc_root=proc.root, tdp_table=tmp_path / "missing.csv"
    )
    (device,) = sensor.devices()
    assert device.attrs["tdp_w"] == round(estimate.BUILTIN_W_PER_CORE * 6, 2)
    assert "built-in" in device.attrs["tdp_source"]


def test_builtin_fallback_agrees_with_the_shipped_table():
    table = load_tdp_table()
    assert round(estimate.fallback_w_per_core(table), 2) == estimate.BUILTIN_W_PER_CORE
    assert max(r.tdp_w for r in table.values()) == estimate.BUILTIN_MAX_TDP_W


def test_arm_cpuinfo_without_model_name(tmp_path):
    proc = FakeProc(tmp_path / "proc", model=None, cores=None)
    sensor = EstimateSensor(components=("cpu",), proc_root=proc.root)
    (device,) = sensor.devices()
    assert device.attrs["model_name"] == "unknown"
    assert device.attrs["cores_per_package"] == 4  # from the cpuN lines of /proc/stat
    assert device.attrs["tdp_fallback"] is True


def test_missing_cpuinfo_assumes_one_package(proc):
    (proc.root / "cpuinfo").unlink()
    sensor = cpu_sensor(proc)
    assert [d.key for d in sensor.devices()] == ["estimate:cpu-0"]
    assert sensor.devices()[0].attrs["model_name"] == "unknown"


# --- table lookup -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_name", "tdp_w", "source"),
    [
        (XEON_6248, 150.0, "Intel ARK: Xeon Gold 6248"),
        ("Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz", 205.0, "Intel ARK: Xeon Gold 6248R"),
        ("Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz", 270.0, "Intel ARK: Xeon Platinum 8380"),
        ("Intel(R) Xeon(R) Platinum 8480+", 350.0, "Intel ARK: Xeon Platinum 8480+"),
        ("INTEL(R) XEON(R) PLATINUM 8592+", 350.0, "Intel ARK: Xeon Platinum 8592+"),
        ("Intel(R) Xeon(R) CPU Max 9480", 350.0, "Intel ARK: Xeon CPU Max 9480"),
        ("Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", 120.0, "Intel ARK: Xeon E5-2680 v4"),
        ("Intel(R) Xeon(R) CPU E5-2680 v3 @ 2.50GHz", 120.0, "Intel ARK: Xeon E5-2680 v3"),
        ("12th Gen Intel(R) Core(TM) i9-12900K", 125.0, "Intel ARK: Core i9-12900K"),
        ("Intel(R) Core(TM) i9-9900K CPU @ 3.60GHz", 95.0, "Intel ARK: Core i9-9900K"),
        ("AMD EPYC 7742 64-Core Processor", 225.0, "AMD product page: EPYC 7742"),
        ("AMD EPYC 7H12 64-Core Processor", 280.0, "AMD product page: EPYC 7H12"),
        ("AMD EPYC 7763 64-Core Processor                ", 280.0, "AMD product page: EPYC 7763"),
        ("AMD EPYC 9654 96-Core Processor", 360.0, "AMD product page: EPYC 9654"),
        ("AMD EPYC 9965 192-Core Processor", 500.0, "AMD product page: EPYC 9965"),
        ("AMD Ryzen 9 5950X 16-Core Processor", 105.0, "AMD product page: Ryzen 9 5950X"),
        (
            "AMD Ryzen Threadripper PRO 5995WX 64-Cores",
            280.0,
            "AMD product page: Ryzen Threadripper PRO 5995WX",
        ),
    ],
)
def test_cpu_model_tdp_on_real_cpuinfo_strings(model_name, tdp_w, source):
    assert cpu_model_tdp(model_name) == (tdp_w, source)


@pytest.mark.parametrize(
    "model_name",
    ["AMD EPYC", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "", "QEMU Virtual CPU"],
)
def test_cpu_model_tdp_unknown(model_name):
    assert cpu_model_tdp(model_name) is None


def test_cpu_model_tdp_with_an_explicit_table(tmp_path):
    table = write_table(
        tmp_path / "t.csv", [("Intel", "Xeon Gold 6248", "xeon gold 6248", 1, 2, "x")]
    )
    assert cpu_model_tdp(XEON_6248, tmp_path / "t.csv") == (1.0, "x")
    assert table.exists()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (XEON_6248, "xeon gold 6248"),
        ("AMD EPYC 7742 64-Core Processor", "epyc 7742"),
        ("13th Gen Intel(R) Core(TM) i9-13900K", "core i9-13900k"),
        ("Intel® Xeon® Silver 4314 CPU @ 2.40GHz", "xeon silver 4314"),
        ("  xeon   gold 6248 ", "xeon gold 6248"),
    ],
)
def test_normalise_model(raw, key):
    assert normalise_model(raw) == key


def test_shipped_table_is_consistent():
    rows = list(csv.DictReader(estimate.default_tdp_table().open(encoding="utf-8")))
    table = load_tdp_table()
    assert len(table) == len(rows) >= 300  # no duplicate or skipped rows
    for row in rows:
        assert row["match"] == normalise_model(row["match"]), row
        assert normalise_model(row["model"]) == row["match"], row
        assert 30 <= float(row["tdp_w"]) <= 500, row
        assert 1 <= int(row["cores"]) <= 192, row
        assert row["source"].startswith(("Intel ARK: ", "AMD product page: ")), row
        assert row["vendor"] in ("Intel", "AMD"), row


def test_malformed_table_rows_are_skipped(tmp_path):
    path = write_table(
        tmp_path / "t.csv",
        [
            ("X", "A", "good 1", 100, 10, "s"),
            ("X", "B", "bad tdp", "lots", 10, "s"),
            ("X", "C", "zero", 0, 10, "s"),
            ("X", "D", "", 100, 10, "s"),
        ],
    )
    assert list(load_tdp_table(path)) == ["good 1"]


def test_duplicate_table_rows_warn_and_the_later_wins(tmp_path, caplog):
    path = write_table(
        tmp_path / "t.csv",
        [("X", "A", "alpha 1", 100, 10, "first"), ("X", "A", "Alpha  1", 110, 10, "second")],
    )
    assert load_tdp_table(path)["alpha 1"].source == "second"
    assert "replaces the first" in caplog.text


def test_binary_table_falls_back(tmp_path):
    (tmp_path / "t.csv").write_bytes(b"\xff\xfe\x00garbage")
    proc = FakeProc(tmp_path / "proc", model=XEON_6248, cores=20)
    sensor = EstimateSensor(components=("cpu",), proc_root=proc.root, tdp_table=tmp_path / "t.csv")
    assert sensor.devices()[0].attrs["tdp_fallback"] is True


# --- DRAM -------------------------------------------------------------------------------------


def test_dram_energy_for_memory_in_use(proc):
    sensor = EstimateSensor(components=("dram",), proc_root=proc.root)
    (device,) = sensor.devices()
    assert (device.key, device.component, device.source, device.method) == (
        "estimate:dram",
        "dram",
        ESTIMATED,
        MODEL,
    )
    assert device.attrs["memory_total_bytes"] == 64 * 1024**3
    assert sensor.read(0)[0].energy_uj == 0
    # 16 GiB x 0.3725 W/GiB = 5.96 W; 10 s = 59.6 J.
    assert sensor.read(10 * S)[0].energy_uj == 59_600_000


def test_dram_averages_the_two_ends_of_an_interval(proc):
    proc.set_memory(total_gib=64, used_gib=8)
    sensor = EstimateSensor(components=("dram",), proc_root=proc.root)
    sensor.read(0)
    proc.set_memory(total_gib=64, used_gib=16)
    # mean 12 GiB x 0.3725 = 4.47 W for 10 s = 44.7 J
    assert sensor.read(10 * S)[0].energy_uj == 44_700_000


def test_dram_figure_comes_from_config(proc):
    config = EstimateConfig(memory_w_per_gb=1.0)
    sensor = EstimateSensor(config, components=("dram",), proc_root=proc.root)
    sensor.read(0)
    assert sensor.read(1 * S)[0].energy_uj == 16_000_000


def test_integer_counter_carries_sub_microjoule_rests(proc):
    proc.set_memory(total_gib=2, used_gib=1)  # 0.3725 W
    sensor = EstimateSensor(components=("dram",), proc_root=proc.root)
    last = None
    for i in range(1001):
        (last,) = sensor.read(i * 1000)  # 1 us steps: 0.3725 uJ each
        assert isinstance(last.energy_uj, int)
    assert last.energy_uj in (372, 373)  # 1000 x 0.3725 uJ, not 1000 x round(0.3725)


def test_both_components_by_default(proc):
    sensor = EstimateSensor(EstimateConfig(cpu_tdp_w=150.0), proc_root=proc.root)
    assert [d.component for d in sensor.devices()] == ["cpu", "dram"]
    sensor.read(0)
    proc.advance(500, 500)
    got = by_key(sensor.read(10 * S))
    assert got["estimate:cpu-0"].energy_uj == 975_000_000
    assert got["estimate:dram"].energy_uj == 59_600_000


@pytest.mark.parametrize("components", [(), ("gpu",), ("cpu", "psys")])
def test_unknown_components_are_rejected(proc, components):
    with pytest.raises(ValueError, match="components"):
        EstimateSensor(components=components, proc_root=proc.root)


# --- bad /proc and odd clocks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage", ["", "cpu  a b c d\n", "cpu 1 2\n", "intr 5\n", "\x00\xff\xfe", "cpu -1 0 0 5\n"]
)
def test_garbage_stat_gives_an_error_reading_then_recovers(proc, garbage):
    sensor = cpu_sensor(proc)
    sensor.read(0)
    (proc.root / "stat").write_text(garbage)
    (bad,) = sensor.read(5 * S)
    assert (bad.status, bad.energy_uj, bad.mono_ns) == (ERROR, None, 5 * S)
    assert "/proc/stat" in bad.error
    # The baseline was kept: the next good read covers the whole 10 s.
    proc.advance(500, 500)
    (good,) = sensor.read(10 * S)
    assert (good.status, good.energy_uj) == (OK, 975_000_000)


def test_unreadable_stat_gives_an_error_reading(proc):
    sensor = cpu_sensor(proc)
    sensor.read(0)
    (proc.root / "stat").unlink()
    (proc.root / "stat").mkdir()  # reading a directory fails even as root
    (bad,) = sensor.read(1 * S)
    assert bad.status == ERROR and bad.energy_uj is None


def test_garbage_meminfo_fails_only_dram(proc):
    sensor = EstimateSensor(EstimateConfig(cpu_tdp_w=150.0), proc_root=proc.root)
    sensor.read(0)
    (proc.root / "meminfo").write_text("MemTotal: lots kB\n")
    proc.advance(500, 500)
    got = by_key(sensor.read(10 * S))
    assert got["estimate:cpu-0"].status == OK
    assert got["estimate:dram"].status == ERROR
    assert got["estimate:dram"].energy_uj is None
    proc.set_memory(total_gib=64, used_gib=16)
    assert by_key(sensor.read(20 * S))["estimate:dram"].energy_uj == 119_200_000


def test_meminfo_without_memavailable_is_an_error(proc):
    sensor = EstimateSensor(components=("dram",), proc_root=proc.root)
    (proc.root / "meminfo").write_text("MemTotal: 1024 kB\nMemFree: 10 kB\n")
    assert sensor.read(0)[0].status == ERROR


def test_stat_that_does_not_advance_is_an_error_and_rebases(proc):
    sensor = cpu_sensor(proc)
    sensor.read(0)
    (stalled,) = sensor.read(10 * S)  # time passed, /proc/stat did not
    assert stalled.status == ERROR
    proc.advance(1000, 0)
    (next_,) = sensor.read(11 * S)
    assert next_.energy_uj == 150_000_000  # only the second after the rebase, at full load


def test_clock_that_does_not_advance_adds_nothing(proc):
    sensor = cpu_sensor(proc)
    sensor.read(7 * S)
    proc.advance(500, 500)
    (same,) = sensor.read(7 * S)
    assert (same.status, same.energy_uj) == (OK, 0)
    (later,) = sensor.read(17 * S)  # the baseline was kept: 10 s at u = 0.5
    assert later.energy_uj == 975_000_000


def test_clock_going_backwards_is_an_error(proc):
    sensor = EstimateSensor(EstimateConfig(cpu_tdp_w=150.0), proc_root=proc.root)
    sensor.read(10 * S)
    proc.advance(500, 500)
    readings = sensor.read(5 * S)
    assert [r.status for r in readings] == [ERROR, ERROR]
    assert all("backwards" in r.error for r in readings)


def test_missing_proc_files_make_the_sensor_unavailable(tmp_path):
    with pytest.raises(SensorUnavailable, match="stat"):
        EstimateSensor(components=("cpu",), proc_root=tmp_path)
    with pytest.raises(SensorUnavailable, match="meminfo"):
        EstimateSensor(components=("dram",), proc_root=tmp_path)


def test_close_is_harmless(proc):
    sensor = cpu_sensor(proc)
    sensor.close()
    sensor.close()


@settings(max_examples=50, deadline=None)
@given(
    busy=st.integers(0, 10_000),
    idle=st.integers(0, 10_000),
    seconds=st.integers(1, 3600),
)
def test_energy_stays_between_idle_and_tdp(tmp_path_factory, busy, idle, seconds):
    if busy + idle == 0:
        return
    proc = FakeProc(tmp_path_factory.mktemp("proc"))
    sensor = cpu_sensor(proc)
    sensor.read(0)
    proc.advance(busy, idle)
    (reading,) = sensor.read(seconds * S)
    assert 45 * seconds * 1e6 - 1 <= reading.energy_uj <= 150 * seconds * 1e6 + 1


# --- probe ------------------------------------------------------------------------------------


def test_probe_names_the_model_tdp_and_source(tmp_path):
    proc = FakeProc(tmp_path / "proc", model=EPYC_7763, sockets=2, cores=64)
    result = probe(proc.root)
    assert result.sensor == "estimate" and result.available
    assert [d.key for d in result.devices] == ["estimate:cpu-0", "estimate:cpu-1", "estimate:dram"]
    text = " ".join(result.notes)
    assert EPYC_7763 in text
    assert "TDP 280 W per package from table: AMD product page: EPYC 7763" in text
    assert "estimated" in text
    assert result.problems == ()


def test_probe_flags_the_fallback(tmp_path):
    proc = FakeProc(tmp_path / "proc", model="Mystery", cores=4)
    notes = " ".join(probe(proc.root).notes)
    assert "fallback:" in notes and "estimate.cpu_tdp_w" in notes


def test_probe_without_proc(tmp_path):
    result = probe(tmp_path)
    assert not result.available
    assert len(result.problems) == 2


def test_probe_on_this_machine():
    result = probe()
    assert result.available
    assert any(d.component == "cpu" for d in result.devices)


def test_reads_closer_than_a_clock_tick_are_not_a_stall(proc):
    """An extra reading 5 ms after the last sees no /proc/stat change: no error, no loss."""
    sensor = cpu_sensor(proc)
    sensor.read(10 * S)
    (quick,) = sensor.read(10 * S + 5_000_000)  # /proc/stat unchanged
    assert (quick.status, quick.energy_uj) == (OK, 0)
    proc.advance(500, 500)
    (later,) = sensor.read(20 * S)  # the whole 10 s at u = 0.5, none lost
    assert later.energy_uj == 975_000_000
