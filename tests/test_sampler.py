import threading
import time

import pytest

from llem.node.store import NodeStore
from llem.sampler import MIN_READ_SPACING_S, Sampler
from llem.wrap import Accumulator
from tests.fakes import BrokenSensor, FakeClock, FakeSensor


def make(tmp_path, sensors, clock=None, interval_s=1.0):
    store = NodeStore(tmp_path / "state" / "node.db")
    clock = clock or FakeClock()
    s = Sampler(sensors, [store], clock=clock, interval_s=interval_s, sampler_id="t")
    return s, store, clock


def test_energy_per_interval_and_totals(tmp_path):
    sensor = FakeSensor({"a": 0, "b": 1000})
    s, store, clock = make(tmp_path, [sensor])
    s.start()
    for _ in range(5):
        clock.advance(1.0)
        sensor.counters["a"] += 100_000
        sensor.counters["b"] += 7
        s.tick()
    assert store.energy_by_device() == {"fake:a": 500_000, "fake:b": 35}
    assert store.query("SELECT COUNT(*) FROM intervals")[0][0] == 5


def test_wrap_reset_and_lost_device(tmp_path):
    sensor = FakeSensor({"w": 990, "r": 5_000_000, "l": 0}, max_range_uj=1000)
    sensor_r = sensor
    s, store, clock = make(tmp_path, [sensor])
    s.start()
    clock.advance(1)
    sensor.counters.update(w=10, r=5_000_100, l=50)  # w wraps: 20 uJ
    s.tick()
    clock.advance(1)
    sensor.counters.update(w=30)
    sensor_r.counters["r"] = 3  # r goes back beyond any range: w/ max_range 1000 -> reset
    sensor.status["l"] = "lost"
    s.tick()
    rows = store.query(
        "SELECT device_key, energy_uj, kind, status FROM energy ORDER BY interval_id, device_key"
    )
    assert rows == [
        ("fake:l", 50, "ok", "ok"),
        ("fake:r", 100, "ok", "ok"),
        ("fake:w", 20, "wrap", "ok"),
        ("fake:l", 0, "gap", "lost"),
        ("fake:r", 0, "reset", "ok"),
        ("fake:w", 20, "ok", "ok"),
    ]
    kinds = [k for (k,) in store.query("SELECT kind FROM events ORDER BY id")]
    assert sorted(kinds) == ["counter_reset", "device_lost"]


def test_broken_sensor_does_not_stop_the_others(tmp_path):
    good = FakeSensor({"g": 0})
    bad = BrokenSensor({"x": 0}, name="broken")
    s, store, clock = make(tmp_path, [good, bad])
    s.start()
    clock.advance(1)
    good.counters["g"] = 42
    s.tick()
    assert store.energy_by_device()["fake:g"] == 42
    assert store.query("SELECT status FROM energy WHERE device_key='fake:x'") == [("error",)]


def test_clock_jump_is_recorded_and_interval_keeps_its_true_length(tmp_path):
    sensor = FakeSensor({"a": 0})
    s, store, clock = make(tmp_path, [sensor])
    s.start()
    clock.advance(1.0, wall_extra_s=-3600)  # NTP steps the wall clock back an hour
    sensor.counters["a"] = 10
    iv = s.tick()
    assert iv.end_ns - iv.start_ns == 1_000_000_000
    assert [e.kind for e in iv.events] == ["clock_jump"]
    assert "-3600" in iv.events[0].detail


def test_implausible_jump_is_a_gap_never_a_huge_energy(tmp_path):
    sensor = FakeSensor({"a": 0}, max_power_w=500)
    s, store, clock = make(tmp_path, [sensor])
    s.start()
    clock.advance(1)
    sensor.counters["a"] = 10**20
    s.tick()
    assert store.energy_by_device()["fake:a"] == 0


def test_interval_floor():
    with pytest.raises(ValueError):
        Sampler([], [], interval_s=0.05)


def test_run_paces_and_stops_promptly_with_final_reading(tmp_path):
    sensor = FakeSensor({"a": 0})
    acc = Accumulator()
    s = Sampler([sensor], [acc], interval_s=0.1)
    t = threading.Thread(target=s.run)
    t.start()
    time.sleep(0.55)
    t0 = time.monotonic()
    s.stop()
    t.join(2)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 0.5
    # ~5 paced ticks plus the final one
    assert 4 <= s.intervals <= 8
    assert acc.mono_ns == pytest.approx(0.55e9, rel=0.25)


def test_wake_takes_an_extra_reading_without_moving_the_beat(tmp_path):
    sensor = FakeSensor({"a": 0})
    s = Sampler([sensor], [Accumulator()], interval_s=5.0)
    t = threading.Thread(target=s.run)
    t.start()
    try:
        time.sleep(0.2)
        s.wake.set()
        deadline = time.monotonic() + 2
        while s.intervals < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.intervals == 1
    finally:
        s.stop()
        t.join(2)
    assert s.intervals == 2  # the final reading


class SteppedCounter(FakeSensor):
    """A counter that moves every 50 ms, like NVML's or pm_counters': 80 W of a 100 W bound.
    Read a few ms after a step, the step looks like impossible power."""

    def __init__(self) -> None:
        super().__init__({"pkg": 0}, max_power_w=100.0)
        self.t0 = time.monotonic()

    def read(self, mono_ns: int):
        self.counters["pkg"] = int(int((time.monotonic() - self.t0) / 0.05) * 0.05 * 80e6)
        return super().read(mono_ns)


def test_readings_on_request_and_the_final_one_keep_their_spacing():
    """A wake right after a reading (a job's end registration, a window) and the final reading
    right after the last one wait until MIN_READ_SPACING_S has passed: a reading a few ms
    after the last one turned a stepped counter's step into a gap (the lab's lost end
    intervals, issue 20)."""
    intervals = []
    s = Sampler([SteppedCounter()], [Accumulator()], interval_s=2.0)

    def on_interval(interval):
        intervals.append(interval)
        if len(intervals) < 4:
            s.wake.set()  # at once: the next reading is asked for right after this one
        else:
            s.stop()  # the final reading, right after the last one

    t = threading.Thread(target=s.run, kwargs={"on_interval": on_interval})
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert len(intervals) == 5
    for interval in intervals:
        assert interval.mono_end_ns - interval.mono_start_ns >= MIN_READ_SPACING_S * 1e9 * 0.99
        assert [r.kind for r in interval.rows] == ["ok"], interval.rows
