"""The sampler loop: read every sensor each interval, turn counter steps into energy, hand the
interval to its sinks (the node store, or the in-memory accumulator of ``llem wrap``).

Clock, sensors and sinks are injected. Durations come from the monotonic clock; wall-clock
time only places intervals on the calendar. A wall clock that jumps (NTP step, manual change)
is recorded as an event and the interval keeps its true, monotonic length.

Pacing is deadline-based (no drift); the wait is on a ``threading.Event`` so that SIGTERM wakes
the loop at once, which takes a final reading, flushes and returns well within a second.

A counter whose range is small for its device's power (a 1,000 J RAPL range wraps every 20 s
at 50 W, every second at 1,000 W) is read between intervals as often as it must be for no
wrap to hide: at least twice per range at its plausible maximum power
(:func:`counter_read_s`). These sub-reads only carry the counter forward and add up its
energy; the interval and everything written stay one per ``interval_s``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from llem.model import EnergyRow, Event, Interval, Remainder
from llem.sensors.base import OK, Device, Reading, Sensor
from llem.sensors.platform import PlatformResidual
from llem.units import FIRST, GAP, NS_PER_S, RESET, UJ_PER_J, WRAP, CounterDelta, counter_delta
from llem.wakeup import SignalSafeEvent

log = logging.getLogger(__name__)

# A wall clock that moved this much more or less than the monotonic clock has jumped.
CLOCK_JUMP_NS = 2 * NS_PER_S
# Counters are never read faster than this, whatever their range (a sysfs read costs ~10 us).
MIN_COUNTER_READ_S = 0.05
MIN_READ_SPACING_S = 0.25
"""A reading on request (a wake: a job ended, a window opened; the final reading) comes at
least this long after the last one (at most half the interval). Counters move in steps (an
NVML or pm_counters counter every 20 to 100 ms): read a few ms after the last reading, one
step looks like impossible power and the interval becomes a gap (issue 20, item 3)."""


def counter_read_s(device: Device) -> float | None:
    """The longest pause between two reads of ``device``'s counter that keeps every wrap
    visible: half its range at its plausible maximum power; None when it has no known range
    or no power bound (NVML's counters never wrap; they only reset)."""
    if not device.max_range_uj or not device.max_power_w:
        return None
    return device.max_range_uj / UJ_PER_J / (2 * device.max_power_w)


class Clock(Protocol):
    def monotonic_ns(self) -> int: ...

    def time_ns(self) -> int: ...


class SystemClock:
    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def time_ns(self) -> int:
        return time.time_ns()


class Sink(Protocol):
    def register_devices(self, devices: Iterable[Device], ts_ns: int) -> None: ...

    def write(self, interval: Interval) -> object: ...


@dataclass
class _DeviceState:
    device: Device
    raw_uj: int | None = None
    mono_ns: int | None = None
    lost: bool = False
    # What sub-reads between two intervals found: energy so far, whether the counter wrapped,
    # and the first step that could not be trusted (then the interval has no data for it).
    pending_uj: int = 0
    pending_wrap: bool = False
    pending_bad: str | None = None
    # The counter's epoch as the device states it (pm_counters' startup): a new one is a reset.
    epoch: object = None

    def step(self, reading: Reading) -> CounterDelta:
        """The counter's step since the last read; the state moves on to ``reading``."""
        dev = self.device
        elapsed_s = None if self.mono_ns is None else (reading.mono_ns - self.mono_ns) / NS_PER_S
        step = counter_delta(
            self.raw_uj,
            reading.energy_uj,
            dev.max_range_uj,
            elapsed_s=elapsed_s,
            max_power_w=dev.max_power_w,
        )
        if self.raw_uj is not None and reading.epoch != self.epoch:
            # The device says its counter restarted (pm_counters startup): no step to trust.
            step = CounterDelta(0, RESET)
        self.raw_uj, self.mono_ns, self.epoch = reading.energy_uj, reading.mono_ns, reading.epoch
        return step

    def take_pending(self, last: CounterDelta) -> CounterDelta:
        """The interval's step: the sub-reads' energy plus ``last``; the pending part is reset."""
        bad, energy, wrapped = self.pending_bad, self.pending_uj, self.pending_wrap
        self.pending_uj, self.pending_wrap, self.pending_bad = 0, False, None
        if last.kind in (RESET, GAP):
            return last
        if bad is not None:
            return CounterDelta(0, bad)
        if last.kind == FIRST:
            return last
        kind = WRAP if wrapped or last.kind == WRAP else last.kind
        return CounterDelta(energy + last.delta, kind)


class Sampler:
    """Reads sensors and produces :class:`Interval` objects.

    Args:
        sensors: opened sensors; their device lists are fixed.
        sinks: where each interval goes (``register_devices`` once, then ``write``).
        clock: monotonic and wall time (injected in tests).
        interval_s: seconds between reads (at least 0.1).
        sampler_id: identifies this sampler's run in the store (pid and start time by default).
    """

    def __init__(
        self,
        sensors: Sequence[Sensor],
        sinks: Sequence[Sink],
        clock: Clock | None = None,
        interval_s: float = 10.0,
        sampler_id: str | None = None,
        attribute: Callable[[Interval], Interval] | None = None,
    ) -> None:
        if interval_s < 0.1:
            raise ValueError(f"interval_s must be at least 0.1, got {interval_s}")
        self.sensors = list(sensors)
        self.sinks = list(sinks)
        self.clock = clock or SystemClock()
        self.interval_s = interval_s
        self.sampler_id = sampler_id or f"{os.getpid()}-{time.time_ns()}"
        self.devices: list[Device] = [d for s in self.sensors for d in s.devices()]
        self._state = {d.key: _DeviceState(d) for d in self.devices}
        # Where a node meter is read, the part the components do not explain is a device.
        self.platform = PlatformResidual.for_devices(self.devices)
        if self.platform is not None:
            self.devices.append(self.platform.device)
        self._last_mono: int | None = None
        self._last_wall: int | None = None
        self.intervals = 0
        self.attribute = attribute
        # Both are set from signal handlers (the node daemon's SIGUSR1, SIGTERM): see
        # llem.wakeup for why they are not threading.Event.
        self.wake = SignalSafeEvent()
        """Set it to make the loop take a reading now (a job ends, a window opens)."""
        self.stopping = SignalSafeEvent()
        self.next_deadline_ns: int | None = None
        """When the next regular reading is due (monotonic ns), while :meth:`run` runs."""
        self.spacing_s = min(MIN_READ_SPACING_S, interval_s / 2)
        """The least time between the last reading and one on request or the final one."""
        self._pause = threading.Event()  # never set: an uninterruptible, bounded wait
        fast = {
            d.key: t
            for d in self.devices
            if (t := counter_read_s(d)) is not None and t < interval_s
        }
        self.counter_read_s = max(MIN_COUNTER_READ_S, min(fast.values())) if fast else None
        """Seconds between sub-reads of fast-wrapping counters; None when none needs them."""
        self._fast_keys = frozenset(fast)
        self._fast_sensors = [s for s in self.sensors if any(d.key in fast for d in s.devices())]
        self._pending_events: list[Event] = []
        for key, t in fast.items():
            if t < MIN_COUNTER_READ_S:
                log.warning(
                    "%s: its counter may wrap unseen (needs a read every %.3f s; "
                    "llem reads every %.2f s at most)",
                    key,
                    t,
                    MIN_COUNTER_READ_S,
                )

    def stop(self) -> None:
        """Make :meth:`run` take its final reading and return (safe from signal handlers)."""
        self.stopping.set()
        self.wake.set()

    # -- one step --------------------------------------------------------------------------

    def _read_all(self, mono_ns: int, sensors: Sequence[Sensor] | None = None) -> list[Reading]:
        readings: list[Reading] = []
        for sensor in self.sensors if sensors is None else sensors:
            try:
                readings.extend(sensor.read(mono_ns))
            except Exception as e:  # a sensor's bug must not stop the others
                log.exception("sensor %s failed", sensor.name)
                readings.extend(
                    Reading(d.key, None, mono_ns, "error", f"{type(e).__name__}: {e}")
                    for d in sensor.devices()
                )
        return readings

    def start(self) -> None:
        """Take the baseline reading (no energy yet) and register the devices with the sinks."""
        mono, wall = self.clock.monotonic_ns(), self.clock.time_ns()
        for sink in self.sinks:
            sink.register_devices(self.devices, wall)
        for reading in self._read_all(mono):
            st = self._state.get(reading.device_key)
            if st is not None and reading.energy_uj is not None:
                st.raw_uj, st.mono_ns = reading.energy_uj, reading.mono_ns
                st.epoch = reading.epoch
        self._last_mono, self._last_wall = mono, wall

    def tick(self) -> Interval:
        """Read every device once and emit the interval since the previous read."""
        if self._last_mono is None or self._last_wall is None:
            raise RuntimeError("Sampler.start() must be called before tick()")
        mono, wall = self.clock.monotonic_ns(), self.clock.time_ns()
        events: list[Event] = []
        elapsed_ns = mono - self._last_mono
        start_wall = self._last_wall
        end_wall = wall
        if abs((wall - self._last_wall) - elapsed_ns) > CLOCK_JUMP_NS:
            jump_s = ((wall - self._last_wall) - elapsed_ns) / NS_PER_S
            events.append(Event(wall, "clock_jump", f"wall clock moved {jump_s:+.3f} s"))
            end_wall = start_wall + elapsed_ns
        events.extend(self._pending_events)
        self._pending_events.clear()
        rows = [self._row(r, events, wall) for r in self._read_all(mono)]
        if self.platform is not None:
            rows.append(self.platform.row(rows, wall, events))
        interval = Interval(
            self.sampler_id,
            start_wall,
            end_wall,
            self._last_mono,
            mono,
            tuple(rows),
            tuple(events),
        )
        if self.attribute is not None:
            interval = self._attributed(interval)
        self._last_mono, self._last_wall = mono, wall
        for sink in self.sinks:
            sink.write(interval)
        self.intervals += 1
        return interval

    def _attributed(self, interval: Interval) -> Interval:
        try:
            return self.attribute(interval)  # type: ignore[misc]
        except Exception as e:
            # Never lose the node's energy because attribution broke: all of it is remainder.
            log.exception("attribution failed")
            rest = tuple(Remainder(r.device_key, r.energy_uj) for r in interval.rows if r.energy_uj)
            event = Event(interval.end_ns, "attribution_error", f"{type(e).__name__}: {e}")
            return replace(interval, remainder=rest, shares=(), events=interval.events + (event,))

    def _row(self, reading: Reading, events: list[Event], wall: int) -> EnergyRow:
        st = self._state[reading.device_key]
        dev = st.device
        if reading.status != OK or reading.energy_uj is None:
            if reading.status == "lost" and not st.lost:
                events.append(Event(wall, "device_lost", reading.error or "", dev.key))
                st.lost = True
            # Keep the last good raw value: if the device comes back, the step spans the gap
            # and is judged (plausibility, reset) like any other. What sub-reads saw of this
            # interval is dropped with it (the interval has no data for the device).
            st.take_pending(CounterDelta(0, GAP))
            return EnergyRow(dev.key, 0, GAP, reading.status, None)
        if st.lost:
            events.append(Event(wall, "device_back", "", dev.key))
            st.lost = False
        prev, prev_epoch = st.raw_uj, st.epoch
        step = st.step(reading)
        if step.kind in (RESET, GAP):
            detail = f"{prev} -> {reading.energy_uj}"
            if prev is not None and reading.epoch != prev_epoch:
                detail += f" (counter epoch {prev_epoch} -> {reading.epoch})"
            events.append(Event(wall, f"counter_{step.kind}", detail, dev.key))
        step = st.take_pending(step)
        return EnergyRow(dev.key, step.delta, step.kind, OK, reading.energy_uj)

    def subread(self) -> None:
        """Carry fast-wrapping counters forward between intervals (no interval is emitted)."""
        mono = self.clock.monotonic_ns()
        for reading in self._read_all(mono, self._fast_sensors):
            st = self._state.get(reading.device_key)
            if (
                reading.device_key not in self._fast_keys
                or st is None
                or st.lost
                or reading.status != OK
                or reading.energy_uj is None
                or st.raw_uj is None
            ):
                continue  # errors and first reads are the next interval's to judge
            prev = st.raw_uj
            step = st.step(reading)
            if step.kind in (RESET, GAP):
                self._pending_events.append(
                    Event(
                        self.clock.time_ns(),
                        f"counter_{step.kind}",
                        f"{prev} -> {reading.energy_uj}",
                        reading.device_key,
                    )
                )
                st.pending_bad = st.pending_bad or step.kind
            else:
                st.pending_uj += step.delta
                st.pending_wrap = st.pending_wrap or step.kind == WRAP

    # -- the loop --------------------------------------------------------------------------

    def run(
        self,
        max_intervals: int | None = None,
        on_interval: Callable[[Interval], None] | None = None,
    ) -> None:
        """Sample until :meth:`stop` is called (or ``max_intervals``), then take a final reading.

        The caller calls :meth:`start` first, or lets ``run`` do it.
        """
        stop = self.stopping
        if self._last_mono is None:
            self.start()
        interval_ns = int(self.interval_s * NS_PER_S)
        next_deadline = self.clock.monotonic_ns() + interval_ns
        while True:
            self.next_deadline_ns = next_deadline  # the window server plans around it
            woken = self._wait_until(next_deadline)
            if stop.is_set():
                break
            if woken:
                self._keep_spacing()
            interval = self.tick()
            if on_interval is not None:
                on_interval(interval)
            if max_intervals is not None and self.intervals >= max_intervals:
                return
            if woken:
                continue  # an extra reading on request: the regular beat is unchanged
            next_deadline += interval_ns
            now = self.clock.monotonic_ns()
            if next_deadline <= now:  # overran (suspended, stalled): skip the missed beats
                missed = (now - next_deadline) // interval_ns + 1
                next_deadline += missed * interval_ns
        self._keep_spacing()
        interval = self.tick()  # the final reading: the last partial interval is not lost
        if on_interval is not None:
            on_interval(interval)

    def _keep_spacing(self) -> None:
        """Wait until :attr:`spacing_s` has passed since the last reading (at most that)."""
        if self._last_mono is None or self.spacing_s <= 0:
            return
        spacing_ns = int(self.spacing_s * NS_PER_S)
        left_ns = self._last_mono + spacing_ns - self.clock.monotonic_ns()
        if left_ns > 0:
            self._pause.wait(min(left_ns, spacing_ns) / NS_PER_S)

    def _wait_until(self, deadline_ns: int) -> bool:
        """Wait for the deadline or a wake-up (True), sub-reading fast counters meanwhile."""
        sub_ns = None if self.counter_read_s is None else int(self.counter_read_s * NS_PER_S)
        while True:
            now = self.clock.monotonic_ns()
            if deadline_ns <= now:
                return False
            wait_ns = deadline_ns - now if sub_ns is None else min(sub_ns, deadline_ns - now)
            if self.wake.wait(wait_ns / NS_PER_S):
                self.wake.clear()
                return True
            if sub_ns is not None and self.clock.monotonic_ns() < deadline_ns:
                self.subread()

    def close(self) -> None:
        for sensor in self.sensors:
            try:
                sensor.close()
            except Exception:
                log.exception("closing sensor %s failed", sensor.name)
