"""HPE Cray EX pm_counters against a tree shaped like /sys/cray/pm_counters."""

from __future__ import annotations

import pytest

from llem.errors import SensorReadError, SensorUnavailable
from llem.sampler import Sampler
from llem.sensors import pm_counters
from llem.sensors.base import ERROR, OK
from llem.units import NS_PER_S, RESET, UJ_PER_J
from tests.helpers.meters import Sink, StepClock
from tests.pmcounters import FakePmCounters

WATTS = {
    "energy": 400,
    "cpu_energy": 150,
    "memory_energy": 50,
    "accel0_energy": 40,
    "accel1_energy": 40,
    "accel2_energy": 40,
    "accel3_energy": 40,
}


@pytest.fixture
def fake(tmp_path):
    return FakePmCounters(tmp_path / "pm_counters")


def run(fake, steps, sensor=None):
    """Sample the tree; each step is (seconds, action) with action None, 'restart', 'stall'."""
    clock, sink = StepClock(), Sink()
    sensor = sensor or pm_counters.PmCountersSensor(fake.path)
    sampler = Sampler([sensor], [sink], clock=clock, interval_s=1.0)
    sampler.start()
    for seconds, action in steps:
        if action == "restart":
            fake.restart()
        if action != "stall":
            fake.advance(WATTS, seconds)
        clock.step(seconds)
        sampler.tick()
    return sink


def energy_j(sink, key):
    return sum(r.energy_uj for i in sink.intervals for r in i.rows if r.device_key == key) / 1e6


def test_parse_value_is_joules_and_the_controller_timestamp():
    assert pm_counters.parse_value("27725 J 1571230862955436 us\n") == (27725, 1571230862955436)
    for bad in ("", "27725 W 1571230862955436 us", "-5 J 1 us", "18446744073709551615"):
        with pytest.raises(SensorReadError):
            pm_counters.parse_value(bad, "energy")


def test_devices_node_cpu_memory_and_accels(fake):
    sensor = pm_counters.PmCountersSensor(fake.path)
    devs = {d.key: d for d in sensor.devices()}
    assert list(devs) == ["pm_counters:node", "pm_counters:cpu", "pm_counters:memory"] + [
        f"pm_counters:accel{i}" for i in range(4)
    ]
    assert devs["pm_counters:node"].component == "psys"
    assert devs["pm_counters:node"].attrs["meter"] == "node"
    assert devs["pm_counters:memory"].component == "dram"
    assert devs["pm_counters:accel2"].component == "gpu"
    assert devs["pm_counters:accel2"].attrs["minor"] == 2
    readings = sensor.read(0)
    assert all(r.status == OK and r.epoch == fake.startup_us for r in readings)


def test_energy_and_platform_residual_over_a_run(fake):
    sink = run(fake, [(1.0, None)] * 5)
    assert energy_j(sink, "pm_counters:node") == pytest.approx(2000, abs=1)
    assert energy_j(sink, "pm_counters:cpu") == pytest.approx(750, abs=1)
    assert energy_j(sink, "pm_counters:memory") == pytest.approx(250, abs=1)
    assert energy_j(sink, "pm_counters:accel3") == pytest.approx(200, abs=1)
    assert energy_j(sink, "platform:node") == pytest.approx(200, abs=1)
    keys = [d.key for d in sink.devices]
    assert keys[-1] == "platform:node"
    counted = [r for i in sink.intervals for r in i.rows if r.device_key != "pm_counters:node"]
    assert sum(r.energy_uj for r in counted) == pytest.approx(2000 * UJ_PER_J, abs=UJ_PER_J)


def test_the_platform_residual_is_exact_to_the_whole_joule_counters(fake):
    """The residual is node minus six counters, each truncated to whole joules at both ends of
    a window: llem gives exactly what the files say, and that alone can be 4 J (2%) off the
    platform's 200 J over 5 s (why ``PmWriter`` steps whole scans, see test_wrap_meters)."""
    seconds = 5.022525  # accels at 200.901 J (.901 lost each), node at 2009.01 J (.01 lost)
    sink = run(fake, [(seconds / 10, None)] * 10)
    files = {n: int(j) for n, j in fake.joules.items()}
    assert files["energy"] - sum(v for n, v in files.items() if n != "energy") == 205
    assert energy_j(sink, "platform:node") == 205  # exact to the files, nothing lost or mixed
    assert float(fake.joules["energy"]) / 10 == pytest.approx(200.901)  # the true 40 W
    assert 205 / seconds > 40 * 1.02  # 40.82 W: the counters' resolution, not a pairing error
    platform = [r for i in sink.intervals for r in i.rows if r.device_key == "platform:node"]
    assert [r.kind for r in platform] == ["ok"] * 10


def test_a_controller_restart_is_a_recorded_gap_even_when_the_counter_reads_higher(fake):
    # One second at 400 W (400 J), then the controller restarts and, by the next read, its
    # counter has run for 5 s worth (2000 J): higher than before, a plausible-looking forward
    # step of 1600 J. Only 'startup' tells the restart.
    clock, sink = StepClock(), Sink()
    sampler = Sampler([pm_counters.PmCountersSensor(fake.path)], [sink], clock=clock)
    sampler.start()
    for action in (None, "restart", None):
        if action == "restart":
            fake.restart()
            fake.advance(WATTS, 5.0)
        else:
            fake.advance(WATTS, 1.0)
        clock.step(1.0)
        sampler.tick()
    node = [r for i in sink.intervals for r in i.rows if r.device_key == "pm_counters:node"]
    assert [r.kind for r in node] == ["ok", RESET, "ok"]
    assert all(r.energy_uj >= 0 for i in sink.intervals for r in i.rows)
    assert energy_j(sink, "pm_counters:node") == pytest.approx(800, abs=1)
    events = [e for i in sink.intervals for e in i.events if e.kind == "counter_reset"]
    assert {e.device_key for e in events} == {d.key for d in sink.devices[:-1]}
    assert "epoch" in events[0].detail
    platform = [r for i in sink.intervals for r in i.rows if r.device_key == "platform:node"]
    assert [r.kind for r in platform] == ["ok", "gap", "ok"]


def test_a_counter_going_backwards_is_a_reset_never_an_unsigned_wrap(fake):
    sensor = pm_counters.PmCountersSensor(fake.path)
    sink = Sink()
    clock = StepClock()
    sampler = Sampler([sensor], [sink], clock=clock, interval_s=1.0)
    fake.advance(WATTS, 100.0)
    sampler.start()
    fake.joules["energy"] -= 1000  # a glitch with the same startup
    fake.advance(WATTS, 1.0)
    clock.step(1.0)
    interval = sampler.tick()
    node = next(r for r in interval.rows if r.device_key == "pm_counters:node")
    assert node.kind == RESET and node.energy_uj == 0
    assert max(r.energy_uj for r in interval.rows) < 10**9  # nothing like 2**64 J


def test_stale_values_are_failed_reads_then_the_step_spans_the_stall(fake):
    sink = run(fake, [(1.0, None), (1.5, "stall"), (1.0, "stall"), (1.0, None)])
    node = [r for i in sink.intervals for r in i.rows if r.device_key == "pm_counters:node"]
    assert [r.status for r in node] == [OK, OK, ERROR, OK]
    stale = [r for i in sink.intervals for r in i.rows if r.status == ERROR]
    assert all(r.kind == "gap" for r in stale)


def test_stale_reading_says_why(fake):
    sensor = pm_counters.PmCountersSensor(fake.path)
    sensor.read(0)
    readings = sensor.read(3 * NS_PER_S)
    assert all(r.status == ERROR for r in readings)
    assert "freshness" in readings[0].error and "stale" in readings[0].error


def test_a_read_across_an_update_is_taken_again(fake, monkeypatch):
    sensor = pm_counters.PmCountersSensor(fake.path)
    real = pm_counters._read
    calls = {"n": 0}

    def racing(path):
        calls["n"] += 1
        if calls["n"] == 3:  # the controller updates in the middle of the first snapshot
            fake.advance(WATTS, 0.1)
        return real(path)

    monkeypatch.setattr(pm_counters, "_read", racing)
    startup, values = sensor._snapshot()
    assert len({ts for _, ts in values}) == 1
    assert values[0][0] == int(fake.joules["energy"])


def test_drop_accels_when_a_vendor_library_has_the_gpus(fake):
    sensor = pm_counters.PmCountersSensor(fake.path)
    sensor.drop("gpu", "the GPUs are measured by nvml")
    assert [d.name for d in sensor.devices()] == ["node", "cpu", "memory"]
    assert "accel0, accel1, accel2, accel3 not read" in sensor.notes[0]
    assert len(sensor.read(0)) == 3


def test_missing_tree_and_garbage(tmp_path):
    with pytest.raises(SensorUnavailable):
        pm_counters.PmCountersSensor(tmp_path / "nope")
    probe = pm_counters.probe(tmp_path / "nope")
    assert not probe.available and "not an HPE Cray EX node" in probe.problems[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "energy").write_text("garbage\n")
    (bad / "startup").write_text("1\n")
    with pytest.raises(SensorUnavailable, match="cannot be read"):
        pm_counters.PmCountersSensor(bad)


def test_probe_lists_devices_and_versions(fake):
    probe = pm_counters.probe(fake.path)
    assert probe.available and len(probe.devices) == 7
    assert "raw_scan_hz: 10" in probe.notes


# -- the controller's timestamp -------------------------------------------------------------------


def test_readings_are_dated_by_the_controllers_timestamp(fake):
    """Values 0.5 s apart on the controller, read 1 s apart by the host: the readings are
    0.5 s apart (what the sampler checks each step's power against)."""
    sensor = pm_counters.PmCountersSensor(fake.path)
    fake.advance(WATTS, 0.1)
    first = sensor.read(10 * NS_PER_S)[0]
    fake.advance(WATTS, 0.5)
    second = sensor.read(11 * NS_PER_S)[0]
    assert first.mono_ns == 10 * NS_PER_S
    assert second.mono_ns - first.mono_ns == NS_PER_S // 2
    assert second.mono_ns <= 11 * NS_PER_S  # never dated after its read


def test_a_timestamp_going_back_without_a_restart_is_a_gap(fake):
    sensor = pm_counters.PmCountersSensor(fake.path)
    fake.advance(WATTS, 1.0)
    assert sensor.read(NS_PER_S)[0].status == OK
    fake.ts_us -= 10_000_000
    fake.advance(WATTS, 1.0)
    readings = sensor.read(2 * NS_PER_S)
    assert all(r.status == ERROR for r in readings)
    assert "timestamp went back" in readings[0].error


def test_without_freshness_a_timestamp_that_does_not_move_is_stale(fake):
    """Older firmware has no freshness file: the timestamps alone tell stale data."""
    sensor = pm_counters.PmCountersSensor(fake.path)
    fake.advance(WATTS, 1.0)
    (fake.path / "freshness").unlink()
    assert sensor.read(NS_PER_S)[0].status == OK
    assert sensor.read(2 * NS_PER_S)[0].status == OK  # same values 1 s later: not yet stale
    readings = sensor.read(3 * NS_PER_S + 1)
    assert all(r.status == ERROR for r in readings)
    assert "timestamp has stayed" in readings[0].error and "stale" in readings[0].error
