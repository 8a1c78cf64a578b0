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
from tests.helpers.meters import Sink, StepClock

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


def test_llem_wrap_json_with_fake_amd_gpus(rocm, tmp_path):
    state = tmp_path / "amdsmi.state"
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
