"""AMD GPUs through the real ``amdsmi`` package loading a fake ``libamd_smi.so``.

The fake is built by the tests (gcc) with every symbol the installed package binds; the
package finds it through ``ROCM_PATH`` (its first search place) when it is first imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from llem.errors import SensorUnavailable
from llem.sampler import Sampler
from llem.sensors import amdsmi as amd
from llem.sensors.base import COUNTER, ERROR, OK, POWER_POLL
from llem.units import NS_PER_S
from tests.fakeamdsmi.lib import FakeAmdGpu, build, write_state
from tests.helpers.meters import FakeHwmon, Sink, StepClock

UNIT = 65536  # accumulator ticks per joule


def gpus(n=2, **kw):
    return [
        FakeAmdGpu(
            f"0000:{0xC1 + 0x10 * i:02x}:00.0",
            f"5bff74bf-0000-1000-80ba-c1f3a1b2c3{i:02x}",
            card=i,
            **kw,
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def rocm(tmp_path_factory):
    return build(tmp_path_factory.mktemp("fakeamdsmi"))


@pytest.fixture
def state(rocm, tmp_path, monkeypatch):
    monkeypatch.setenv("ROCM_PATH", str(rocm))
    path = tmp_path / "amdsmi.state"
    monkeypatch.setenv("FAKE_AMDSMI_STATE", str(path))
    return path


def test_exact_unit_not_the_rounded_one():
    assert amd.energy_uj(UNIT, 15.3) == 1_000_000  # one joule, exactly
    assert amd.energy_uj(UNIT, 15.300000190734863) == 1_000_000  # the float32 15.3
    assert amd.energy_uj(1000, 1.0) == 1000  # another resolution is taken as reported
    assert int(UNIT * 15.3) == 1_002_700  # what the rounded unit would say: +0.27 %


def test_identity_and_exact_energy_through_the_real_package(state):
    write_state(state, gpus(2, acc=100 * UNIT, power_w=0))
    sensor = amd.AmdSmiSensor(check_wait_s=0)
    devs = sensor.devices()
    assert [d.name for d in devs] == ["gpu0", "gpu1"]
    assert devs[1].key == "amdsmi:5bff74bf-0000-1000-80ba-c1f3a1b2c301"
    assert devs[1].attrs["bdf"] == "0000:d1:00.0" and devs[1].attrs["minor"] == 1
    assert all(d.method == COUNTER and d.component == "gpu" for d in devs)
    readings = sensor.read(0)
    assert [r.energy_uj for r in readings] == [100_000_000, 100_000_000]
    sensor.close()


def test_select_by_minor_uuid_or_bdf(state):
    write_state(state, gpus(3))
    sensor = amd.AmdSmiSensor(select=["2", "0000:c1:00.0"], check_wait_s=0)
    assert [d.name for d in sensor.devices()] == ["gpu0", "gpu2"]
    with pytest.raises(SensorUnavailable, match="none of the GPUs"):
        amd.AmdSmiSensor(select=["7"], check_wait_s=0)


def test_a_stuck_counter_falls_back_to_integrated_power(state):
    write_state(state, gpus(1, acc=5 * UNIT, power_w=300))
    sensor = amd.AmdSmiSensor(check_wait_s=0)
    (dev,) = sensor.devices()
    assert dev.method == POWER_POLL
    assert "stuck" in sensor.notes[0] and "socket power" in sensor.notes[0]
    sensor.read(0)
    assert sensor.read(2 * NS_PER_S)[0].energy_uj == 600_000_000  # 300 W for 2 s


def test_a_counter_going_backwards_at_the_check_is_rejected(state):
    write_state(state, gpus(1, acc=5 * UNIT, power_w=100))
    later = gpus(1, acc=2 * UNIT, power_w=100)
    sensor = amd.AmdSmiSensor(sleep=lambda s: write_state(state, later), check_wait_s=0)
    assert sensor.devices()[0].method == POWER_POLL
    assert "went backwards" in sensor.notes[0]


def advance_during_wait(state, later):
    def sleep(seconds):
        time.sleep(seconds)
        write_state(state, later)

    return sleep


def test_a_counter_that_agrees_with_power_is_kept(state):
    write_state(state, gpus(1, acc=0, power_w=200))
    later = gpus(1, acc=20 * UNIT, power_w=200)  # 20 J in the 0.1 s wait: 200 W
    sensor = amd.AmdSmiSensor(sleep=advance_during_wait(state, later), check_wait_s=0.1)
    assert sensor.devices()[0].method == COUNTER
    assert sensor.notes == []


def test_a_counter_that_disagrees_with_power_is_rejected(state):
    write_state(state, gpus(1, acc=0, power_w=200))
    later = gpus(1, acc=2000 * UNIT, power_w=200)  # 2000 J in 0.1 s: 20 kW
    sensor = amd.AmdSmiSensor(sleep=advance_during_wait(state, later), check_wait_s=0.1)
    assert sensor.devices()[0].method == POWER_POLL
    assert "disagrees" in sensor.notes[0]


def test_read_errors_and_reset_in_the_sampler(state):
    write_state(state, gpus(1, acc=10 * UNIT))
    sensor = amd.AmdSmiSensor(check_wait_s=0)
    clock, sink = StepClock(), Sink()
    sampler = Sampler([sensor], [sink], clock=clock, interval_s=1.0)
    sampler.start()
    for acc, error in ((20, 0), (30, 8), (5, 0), (6, 0)):  # 8: AMDSMI_STATUS_NO_PERM... any
        write_state(state, gpus(1, acc=acc * UNIT, error=error))
        clock.step(1.0)
        sampler.tick()
    rows = [i.rows[0] for i in sink.intervals]
    assert [r.status for r in rows] == [OK, ERROR, OK, OK]
    assert [r.kind for r in rows] == ["ok", "gap", "reset", "ok"]
    assert [r.energy_uj for r in rows] == [10_000_000, 0, 0, 1_000_000]


def test_missing_library_is_a_reason_not_a_crash_nor_stdout(tmp_path):
    code = (
        "import json; from llem.sensors import amdsmi; p = amdsmi.probe(); "
        "print(json.dumps([p.available, list(p.problems)]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ROCM_PATH", "ROCM_HOME")}
    env["ROCM_PATH"] = str(tmp_path / "no-rocm")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    available, problems = json.loads(r.stdout)  # nothing else was printed
    assert available is False
    assert "cannot load libamd_smi.so" in problems[0] and "amd-smi-lib" in problems[0]


def test_llem_wrap_json_with_fake_amd_gpus(rocm, live_tmp):
    state = live_tmp / "amdsmi.state"
    accs = [0, 0]
    write_state(state, gpus(2, acc=0, power_w=0))
    stop = threading.Event()

    def writer():  # 250 W and 100 W, about twenty updates a second, at the real elapsed time
        last = time.monotonic()
        while not stop.wait(0.05):
            now = time.monotonic()
            accs[0] += int(250 * (now - last) * UNIT)
            accs[1] += int(100 * (now - last) * UNIT)
            last = now
            write_state(
                state,
                [
                    FakeAmdGpu(g.bdf, g.uuid, g.card, acc=a, power_w=p)
                    for g, a, p in zip(gpus(2), accs, (250, 100))
                ],
            )

    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env.update(
        LLEM_CONFIG="/dev/null",
        LLEM_SENSORS="amdsmi",
        ROCM_PATH=str(rocm),
        FAKE_AMDSMI_STATE=str(state),
    )
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "llem.cli.main",
                "wrap",
                "--json",
                "--interval",
                "0.5",
                "--",
                "sleep",
                "3",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        stop.set()
        thread.join()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    by = {c["device"]: c for c in out["components"]}
    assert set(by) == {"gpu0", "gpu1"}
    assert all(c["sensor"] == "amdsmi" and c["method"] == "counter" for c in by.values())
    ratio = by["gpu0"]["energy_j"] / by["gpu1"]["energy_j"]
    assert ratio == pytest.approx(2.5, rel=0.05)
    assert by["gpu0"]["energy_j"] / out["duration_s"] == pytest.approx(250, rel=0.1)


# -- the fallback chain: counter, then socket power, then the amdgpu hwmon file -----------------


def test_each_fallback_step_failing_in_turn(state, tmp_path):
    hw = FakeHwmon(tmp_path / "hwmon")
    NOT_SUPPORTED = 2
    g = gpus(4, acc=0, power_w=200)
    g[0].acc = 5 * UNIT  # 0: a good counter (200 W; checked with a zero wait: no rate check)
    g[0].power_w = 0
    g[1].error = NOT_SUPPORTED  # 1: no counter, socket power
    g[2].error = g[2].perror = NOT_SUPPORTED  # 2: neither, the amdgpu hwmon file
    g[3].error = g[3].perror = NOT_SUPPORTED  # 3: neither, and no hwmon: not measured
    hw.add_amdgpu(g[2].bdf, 150_000_000, file="power1_input")
    write_state(state, g)
    sensor = amd.AmdSmiSensor(check_wait_s=0, hwmon_root=hw.path)
    devs = {d.attrs["bdf"]: d for d in sensor.devices()}
    assert set(devs) == {g[0].bdf, g[1].bdf, g[2].bdf}
    assert devs[g[0].bdf].method == COUNTER and devs[g[0].bdf].attrs["energy_source"] == "counter"
    assert devs[g[1].bdf].method == POWER_POLL
    assert devs[g[1].bdf].attrs["energy_source"] == "socket_power"
    assert devs[g[2].bdf].method == POWER_POLL
    assert devs[g[2].bdf].attrs["energy_source"] == f"hwmon:{hw.files[g[2].bdf]}"
    notes = "\n".join(sensor.notes)
    assert f"amdsmi {g[1].bdf}: energy counter unreadable" in notes
    assert "measured by integrating its socket power instead" in notes
    assert f"amdsmi {g[2].bdf}: energy counter unreadable" in notes
    assert "socket power unreadable" in notes and "amdgpu hwmon power" in notes
    assert f"amdsmi {g[3].bdf}:" in notes and "no amdgpu hwmon power file" in notes
    sensor.read(0)
    out = {r.device_key: r for r in sensor.read(2 * NS_PER_S)}
    assert out[devs[g[1].bdf].key].energy_uj == 400_000_000  # 200 W x 2 s
    assert out[devs[g[2].bdf].key].energy_uj == 300_000_000  # 150 W x 2 s, from hwmon


def test_a_failed_hwmon_read_is_a_gap_in_the_sampler(state, tmp_path):
    hw = FakeHwmon(tmp_path / "hwmon")
    (g,) = gpus(1, error=2, perror=2)
    hw.add_amdgpu(g.bdf, 100_000_000)
    write_state(state, [g])
    sensor = amd.AmdSmiSensor(check_wait_s=0, hwmon_root=hw.path)
    clock, sink = StepClock(), Sink()
    sampler = Sampler([sensor], [sink], clock=clock, interval_s=1.0)
    sampler.start()
    for power in (100_000_000, "garbage", 100_000_000, 100_000_000):
        hw.set(g.bdf, power)
        clock.step(1.0)
        sampler.tick()
    rows = [i.rows[0] for i in sink.intervals]
    assert [r.kind for r in rows] == ["ok", "gap", "reset", "ok"]
    assert [r.energy_uj for r in rows] == [100_000_000, 0, 0, 100_000_000]


# -- packages that report for several GPUs: MI250X dies, MI300X partitions ----------------------


def mi250x(packages=2, power_w=(0, 0)):
    """Two dies per package, sharing a board serial; only the first reports (the fake's
    ``mi250x`` quirk zeroes the second's counter and power). The start check runs with no
    wait, so the reported power is 0 for the counter to pass it."""
    out = []
    for p in range(packages):
        for die in range(2):
            n = 2 * p + die
            out.append(
                FakeAmdGpu(
                    f"0000:{0xC1 + 0x10 * n:02x}:00.0",
                    f"5bff74bf-0000-1000-80ba-0000000000{n:02x}",
                    card=n,
                    acc=0,
                    power_w=power_w[p],
                    serial=f"PKG{p}",
                    product="AMD Instinct MI250X",
                    kind="mi250x",
                )
            )
    return out


def test_the_fake_reproduces_the_mi250x_quirk(state, rocm):
    write_state(state, mi250x(1, power_w=(400,)))
    lib = amd.load()
    lib.amdsmi_init(lib.AmdSmiInitFlags.INIT_AMD_GPUS)
    first, second = lib.amdsmi_get_processor_handles()
    assert lib.amdsmi_get_gpu_board_info(second)["product_serial"] == "PKG0"
    assert amd._power_w(lib, first) == 400.0
    assert amd._power_w(lib, second) is None  # "N/A"
    assert lib.amdsmi_get_energy_count(second)["energy_accumulator"] == 0
    lib.amdsmi_shut_down()


def run_ticks(sensor, state, gpus_at, seconds):
    """Tick a sampler once a second; ``gpus_at(t)`` gives the fake's state at t seconds."""
    clock, sink = StepClock(), Sink()
    sampler = Sampler([sensor], [sink], clock=clock, interval_s=1.0)
    write_state(state, gpus_at(0))
    sampler.start()
    for t in range(1, seconds + 1):
        write_state(state, gpus_at(t))
        clock.step(1.0)
        sampler.tick()
    total: dict[str, int] = {}
    for interval in sink.intervals:
        for r in interval.rows:
            total[r.device_key] = total.get(r.device_key, 0) + r.energy_uj
    return total


def test_mi250x_dies_share_their_package_never_0_j(state):
    def at(t):  # package 0 at 400 W, package 1 at 300 W: the first die's counter
        g = mi250x(2)
        g[0].acc, g[2].acc = 400 * t * UNIT, 300 * t * UNIT
        return g

    write_state(state, at(1))
    sensor = amd.AmdSmiSensor(check_wait_s=0)
    devs = sensor.devices()
    assert [d.name for d in devs] == ["gpu0", "gpu1", "gpu2", "gpu3"]
    for d, reporter in zip(devs, ("c1", "c1", "e1", "e1")):
        split = d.attrs["package_split"]
        assert split["share"] == "1/2" and split["reporting"] == [f"0000:{reporter}:00.0"]
        assert split["product"] == "AMD Instinct MI250X"
        assert d.method == COUNTER
    assert sum("charged 1/2 of package PKG0" in n for n in sensor.notes) == 2
    total = run_ticks(sensor, state, at, 4)
    assert [total[d.key] for d in devs] == [800_000_000] * 2 + [600_000_000] * 2


def test_a_job_on_the_silent_die_alone_is_charged_half_its_package(state):
    def at(t):
        g = mi250x(1)
        g[0].acc = 400 * t * UNIT
        return g

    write_state(state, at(0))
    sensor = amd.AmdSmiSensor(select=["1"], check_wait_s=0)  # die 1: reports nothing itself
    (dev,) = sensor.devices()
    assert dev.name == "gpu1" and dev.attrs["package_split"]["members"] == [
        "0000:c1:00.0",
        "0000:d1:00.0",
    ]
    assert run_ticks(sensor, state, at, 3) == {dev.key: 600_000_000}  # 200 W x 3 s


def test_mi300x_cpx_partitions_share_partition_0(state):
    def at(t):
        g = [
            FakeAmdGpu(
                f"0000:{0x05 + p:02x}:00.0",
                f"1f74a1b0-0000-1000-8000-0000000000{p:02x}",
                card=p,
                acc=700 * t * UNIT if p == 0 else 0,
                power_w=700,
                serial="MI300X-A",
                product="AMD Instinct MI300X",
                part=p,
                kind="mi300x",
            )
            for p in range(8)
        ]
        return g

    write_state(state, at(0))
    sensor = amd.AmdSmiSensor(check_wait_s=0)
    devs = sensor.devices()
    assert len(devs) == 8
    assert {d.attrs["package_split"]["share"] for d in devs} == {"1/8"}
    assert [d.attrs["partition"] for d in devs] == list(range(8))
    assert {d.method for d in devs} == {POWER_POLL}  # partition 0's socket power (stuck check)
    total = run_ticks(sensor, state, at, 2)
    assert [total[d.key] for d in devs] == [175_000_000] * 8  # 700 W x 2 s / 8
    assert sum(total.values()) == 1_400_000_000  # the package's energy, nothing lost


def test_a_reset_of_the_reporting_die_is_a_gap_for_every_member(state):
    accs = {0: 10, 1: 20, 2: 3, 3: 4}  # joules on the reporting die; 20 -> 3: a reset

    def at(t):
        g = mi250x(1)
        g[0].acc = accs[t] * UNIT
        return g

    write_state(state, at(0))
    sensor = amd.AmdSmiSensor(check_wait_s=0)
    clock, sink = StepClock(), Sink()
    sampler = Sampler([sensor], [sink], clock=clock, interval_s=1.0)
    sampler.start()
    for t in (1, 2, 3):
        write_state(state, at(t))
        clock.step(1.0)
        sampler.tick()
    for i in range(2):
        rows = [interval.rows[i] for interval in sink.intervals]
        assert [r.kind for r in rows] == ["ok", "reset", "ok"]
        assert [r.energy_uj for r in rows] == [5_000_000, 0, 500_000]


def test_a_package_where_all_members_report_is_not_split(state):
    g = mi250x(1)
    g[1].kind = g[0].kind = "plain"  # both dies report (no quirk)
    g[0].acc, g[1].acc = 10 * UNIT, 20 * UNIT
    write_state(state, g)
    sensor = amd.AmdSmiSensor(check_wait_s=0)
    assert all("package_split" not in d.attrs for d in sensor.devices())
    assert [r.energy_uj for r in sensor.read(0)] == [10_000_000, 20_000_000]


def test_llem_wrap_json_shows_the_package_split(rocm, live_tmp):
    """``llem wrap --json`` on a fake MI250X whose first die alone reports 300 W: both dies
    show about 150 W, each with its ``package_split``."""
    state = live_tmp / "amdsmi.state"
    stop = threading.Event()

    def at(acc):
        g = mi250x(1)
        g[0].acc = int(acc)
        return g

    write_state(state, at(0))

    def writer():
        acc, last = 0.0, time.monotonic()
        while not stop.wait(0.05):
            now = time.monotonic()
            acc += 300 * (now - last) * UNIT
            last = now
            write_state(state, at(acc))

    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env.update(
        LLEM_CONFIG="/dev/null",
        LLEM_SENSORS="amdsmi",
        ROCM_PATH=str(rocm),
        FAKE_AMDSMI_STATE=str(state),
    )
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "llem.cli.main", "wrap", "--json", "--interval", "0.5"]
            + ["--", "sleep", "2"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        stop.set()
        thread.join()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    by = {c["device"]: c for c in out["components"]}
    assert set(by) == {"gpu0", "gpu1"}
    for c in by.values():
        assert c["package_split"]["share"] == "1/2"
        assert c["package_split"]["product"] == "AMD Instinct MI250X"
        assert c["energy_j"] / out["duration_s"] == pytest.approx(150, rel=0.25)
    assert by["gpu0"]["energy_j"] == pytest.approx(by["gpu1"]["energy_j"], abs=0.001)
    text = subprocess.run(  # the same on a terminal's text
        [sys.executable, "-m", "llem.cli.main", "wrap", "--interval", "0.5", "--", "true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert text.returncode == 0, text.stderr
    assert "(1/2 of its package, which only 0000:c1:00.0 reports)" in text.stderr + text.stdout


def test_a_silent_die_with_an_hwmon_file_still_takes_its_share(state, tmp_path):
    """The second die of an MI250X has an amdgpu hwmon file reading 0 W: amdsmi's report of
    the package wins, and the die is charged half of it, not 0 J from its own file."""
    hw = FakeHwmon(tmp_path / "hwmon")

    def at(t):
        g = mi250x(1)
        g[0].acc = 400 * t * UNIT
        return g

    hw.add_amdgpu(at(0)[1].bdf, 0)
    write_state(state, at(0))
    sensor = amd.AmdSmiSensor(check_wait_s=0, hwmon_root=hw.path)
    devs = sensor.devices()
    assert [d.attrs["package_split"]["reporting"] for d in devs] == [["0000:c1:00.0"]] * 2
    assert [d.attrs["energy_source"] for d in devs] == ["counter", "counter"]
    total = run_ticks(sensor, state, at, 2)
    assert [total[d.key] for d in devs] == [400_000_000] * 2
