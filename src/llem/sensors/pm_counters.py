"""Node, CPU, memory and accelerator energy from HPE Cray EX ``pm_counters``.

Cray EX compute nodes (LUMI, Frontier, El Capitan, Perlmutter...) publish the node
controller's counters under ``/sys/cray/pm_counters``, updated about ten times a second
(``raw_scan_hz``). Files read:

* ``energy`` (the whole node, at the wall side of the node's power supply), ``cpu_energy``,
  ``memory_energy``, ``accelN_energy``: ``27725 J 1571230862955436 us``, a cumulative count in
  whole joules and the controller's timestamp of that value in microseconds;
* ``freshness``: a number the controller increments at every update: when it stops moving the
  values are stale (the controller is not updating them), and reads are failed reads;
* ``startup``: the controller's start time: when it changes the controller restarted and every
  counter restarted with it: the step is a reset, a recorded gap, whatever the values say.
  (Slurm's ``acct_gather_energy/pm_counters`` takes the step as an unsigned difference and has
  stored 10^20 J for jobs that spanned such a restart.)
* ``generation``, ``raw_scan_hz``, ``version``: shown by ``llem doctor``.

The node's ``energy`` is a whole-node meter: it becomes a ``psys`` device (never added to the
others) and :mod:`llem.sensors.platform` turns it into the ``platform`` residual. All the files
of one read must carry the same controller timestamp (one update): a read that straddles an
update is taken again.

The controller's timestamp dates the values, not the host's read: each reading is dated at
the controller's time of its values, mapped onto the host's monotonic clock by the smallest
offset seen in the controller's life (the freshest values; taken again when the values fall
behind by more than the stale limit, e.g. after a stall), so that the time between two
readings, which the sampler checks each step's power against, is the controller's time
between the two values, not the jitter of when the host happened to read them. A timestamp that goes backwards without a restart is a failed read (a gap); a
timestamp that does not move for the stale limit is stale, like ``freshness`` (firmware
without ``freshness`` is guarded by the timestamps alone).

``accelN`` follows the order of the node's GPUs, assumed to be their minor numbers (Slurm's GRES
index). Where a vendor library (NVML, amdsmi) sees the GPUs, it is preferred and the accel
counters are not read (one source per physical device, see :func:`llem.sensors.open_sensors`).

``LLEM_PM_COUNTERS_ROOT`` points the sensor at another tree (tests, containers).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llem.errors import SensorReadError, SensorUnavailable
from llem.sensors.base import COUNTER, ERROR, MEASURED, OK, Device, Probe, Reading
from llem.units import NS_PER_S, UJ_PER_J

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/cray/pm_counters"

# Plausibility bounds for a counter step (no Cray EX node or part of one draws more).
NODE_MAX_POWER_W = 6000.0
CPU_MAX_POWER_W = 2000.0
MEMORY_MAX_POWER_W = 1000.0
ACCEL_MAX_POWER_W = 1500.0

# freshness moves ~10 times a second: unchanged for this long means the controller stopped.
STALE_AFTER_NS = 2 * NS_PER_S
# A read that straddles a controller update is retried this many times.
TORN_READ_TRIES = 4

_VALUE = re.compile(r"^\s*(\d+)\s+J\s+(\d+)\s+us\s*$")
_ACCEL = re.compile(r"^accel(\d+)_energy$")


@dataclass(frozen=True)
class Counter:
    """One ``*_energy`` file."""

    file: str
    component: str
    name: str
    max_power_w: float
    index: int | None = None


def root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("LLEM_PM_COUNTERS_ROOT") or DEFAULT_ROOT)


def parse_value(text: str, path: str = "") -> tuple[int, int]:
    """``'27725 J 1571230862955436 us'`` -> (joules, controller timestamp in microseconds).

    Raises:
        SensorReadError: anything else (an empty file, a unit other than J, garbage).
    """
    m = _VALUE.match(text)
    if m is None:
        raise SensorReadError(f"{path}: not a pm_counters energy value: {text.strip()[:60]!r}")
    return int(m.group(1)), int(m.group(2))


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(128).decode("ascii", "replace")
    except OSError as e:
        raise SensorReadError(f"{path}: {e.strerror or e}") from e


def _read_int(path: Path) -> int:
    text = _read(path).strip()
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        raise SensorReadError(f"{path}: not an integer: {text[:40]!r}") from None


def find_counters(base: Path) -> list[Counter]:
    """The energy files present under a pm_counters root, node first."""
    try:
        names = set(os.listdir(base))
    except OSError:
        return []
    found = []
    if "energy" in names:
        found.append(Counter("energy", "psys", "node", NODE_MAX_POWER_W))
    if "cpu_energy" in names:
        found.append(Counter("cpu_energy", "cpu", "cpu", CPU_MAX_POWER_W))
    if "memory_energy" in names:
        found.append(Counter("memory_energy", "dram", "memory", MEMORY_MAX_POWER_W))
    accels = sorted(int(m.group(1)) for n in names if (m := _ACCEL.match(n)))
    for i in accels:
        found.append(Counter(f"accel{i}_energy", "gpu", f"accel{i}", ACCEL_MAX_POWER_W, i))
    return found


def _device(counter: Counter, base: Path) -> Device:
    attrs: dict[str, object] = {"path": str(base / counter.file)}
    if counter.component == "psys":
        attrs["meter"] = "node"
    if counter.index is not None:
        # Assumed to follow the GPU minor numbers (Slurm's GRES index); documented.
        attrs.update(index=counter.index, minor=counter.index)
    return Device(
        key=f"pm_counters:{counter.name}",
        component=counter.component,
        name=counter.name,
        sensor="pm_counters",
        source=MEASURED,
        method=COUNTER,
        max_range_uj=None,  # 64-bit joules: never wraps; a step backwards is a restart
        max_power_w=counter.max_power_w,
        attrs=attrs,
    )


class PmCountersSensor:
    """Reads the node controller's energy counters, each as one device.

    Args:
        base: the pm_counters directory (default ``$LLEM_PM_COUNTERS_ROOT`` or
            ``/sys/cray/pm_counters``).
        components: which components to read among ``psys`` (the node), ``cpu``, ``dram``,
            ``gpu`` (the accel counters).

    Raises:
        SensorUnavailable: no energy file found, or none readable.
    """

    name = "pm_counters"

    def __init__(
        self,
        base: str | os.PathLike | None = None,
        components: Iterable[str] = ("psys", "cpu", "dram", "gpu"),
    ) -> None:
        self.base = Path(base) if base is not None else root()
        self.notes: list[str] = []
        wanted = set(components)
        counters = [c for c in find_counters(self.base) if c.component in wanted]
        if not counters:
            raise SensorUnavailable(f"no pm_counters energy file under {self.base}")
        try:
            _read_int(self.base / "startup")
            parse_value(_read(self.base / counters[0].file), counters[0].file)
        except SensorReadError as e:
            raise SensorUnavailable(f"pm_counters cannot be read: {e}") from e
        self._counters = counters
        self._devices = [_device(c, self.base) for c in counters]
        self._files = [self.base / c.file for c in counters]
        self._freshness: int | None = None
        self._fresh_since_ns: int | None = None
        # The controller's time: the last values' (startup, timestamp), since when it has
        # not moved (host ns), and the offset from controller ns to host monotonic ns.
        self._last_ts: tuple[int, int] | None = None
        self._ts_since_ns: int | None = None
        self._offset: tuple[int, int] | None = None  # (startup, offset_ns)
        self.torn_reads = 0
        """Reads that straddled a controller update (each retried)."""

    def devices(self) -> Sequence[Device]:
        return self._devices

    def drop(self, component: str, why: str) -> None:
        """Stop reading one component (another sensor measures those devices)."""
        dropped = [d.name for d in self._devices if d.component == component]
        if not dropped:
            return
        keep = [i for i, d in enumerate(self._devices) if d.component != component]
        self._counters = [self._counters[i] for i in keep]
        self._devices = [self._devices[i] for i in keep]
        self._files = [self._files[i] for i in keep]
        self.notes.append(f"pm_counters: {', '.join(dropped)} not read: {why}")

    def _snapshot(self) -> tuple[int, list[tuple[int, int]]]:
        """(startup, [(joules, timestamp_us)]), from one controller update when possible.

        A read that straddles an update is taken again; when updates keep coming faster than
        the files can be read, the last read is kept: the counters are cumulative, so the
        parts read one update late are caught up by the next interval. A restart during the
        read (``startup`` changed) is always taken again, and never mixed.
        """
        for _ in range(TORN_READ_TRIES):
            startup = _read_int(self.base / "startup")
            values = [parse_value(_read(p), str(p)) for p in self._files]
            if _read_int(self.base / "startup") != startup:
                continue
            if len({ts for _, ts in values}) <= 1:
                return startup, values
            self.torn_reads += 1
        if _read_int(self.base / "startup") != startup:
            raise SensorReadError(f"{self.base}: the controller restarted during the read")
        return startup, values

    def _stale(self, mono_ns: int) -> str | None:
        """Why the values are stale, or None. ``freshness`` must move between updates."""
        try:
            freshness = _read_int(self.base / "freshness")
        except SensorReadError:
            return None  # an older firmware without freshness: the timestamps still guard
        if freshness != self._freshness or self._fresh_since_ns is None:
            self._freshness, self._fresh_since_ns = freshness, mono_ns
            return None
        still_ns = mono_ns - self._fresh_since_ns
        if still_ns >= STALE_AFTER_NS:
            return (
                f"{self.base}/freshness has stayed at {freshness} for "
                f"{still_ns / NS_PER_S:.1f} s: the node controller is not updating the "
                "counters (stale data, a recorded gap)"
            )
        return None

    def _controller_time(self, startup: int, ts_us: int, mono_ns: int) -> int:
        """The values' time on the host's monotonic clock.

        Raises:
            SensorReadError: the timestamp went backwards without a restart, or has not
                moved for the stale limit.
        """
        last = self._last_ts
        if last is not None and last[0] == startup:
            if ts_us < last[1]:
                raise SensorReadError(
                    f"{self.base}: the controller's timestamp went back from {last[1]} to "
                    f"{ts_us} us without a restart (a recorded gap)"
                )
            if ts_us == last[1]:
                since = self._ts_since_ns if self._ts_since_ns is not None else mono_ns
                if mono_ns - since >= STALE_AFTER_NS:
                    raise SensorReadError(
                        f"{self.base}: the controller's timestamp has stayed at {ts_us} us for "
                        f"{(mono_ns - since) / NS_PER_S:.1f} s (stale data, a recorded gap)"
                    )
            else:
                self._ts_since_ns = mono_ns
        else:
            self._ts_since_ns = mono_ns
        self._last_ts = (startup, ts_us)
        device_ns = ts_us * 1000
        here = mono_ns - device_ns  # the host clock minus the controller's, plus the values' age
        off = self._offset
        # The offset is the smallest seen (the freshest values: a value is never dated after
        # its read), taken again on a new controller life or when the values fall behind by
        # more than the stale limit (a stall, a clock step).
        if off is None or off[0] != startup or here < off[1] or here - off[1] > STALE_AFTER_NS:
            self._offset = off = (startup, here)
        return device_ns + off[1]

    def read(self, mono_ns: int) -> list[Reading]:
        keys = [d.key for d in self._devices]
        try:
            stale = self._stale(mono_ns)
            if stale is not None:
                raise SensorReadError(stale)
            startup, values = self._snapshot()
            at_ns = self._controller_time(startup, max(ts for _, ts in values), mono_ns)
        except SensorReadError as e:
            return [Reading(k, None, mono_ns, ERROR, str(e)) for k in keys]
        return [
            Reading(k, joules * UJ_PER_J, at_ns, OK, epoch=startup)
            for k, (joules, _) in zip(keys, values)
        ]

    def close(self) -> None:
        pass


def probe(base: str | os.PathLike | None = None) -> Probe:
    """What pm_counters can measure here, and exactly why not."""
    path = Path(base) if base is not None else root()
    try:
        sensor = PmCountersSensor(path)
    except SensorUnavailable as e:
        why = str(e)
        if not path.exists():
            why = (
                f"{path} does not exist: not an HPE Cray EX node (the pm_counters interface "
                "is published by Cray's node controller driver)"
            )
        return Probe("pm_counters", False, (), (why,))
    notes = []
    for extra in ("version", "generation", "raw_scan_hz"):
        try:
            notes.append(f"{extra}: {_read(path / extra).strip()}")
        except SensorReadError:
            pass
    problems = [r.error or r.device_key for r in sensor.read(0) if r.status != OK]
    return Probe("pm_counters", True, tuple(sensor.devices()), tuple(problems[:1]), tuple(notes))
