"""What every sensor produces, and the protocol it implements.

A sensor owns one or more *devices*, each with one cumulative energy counter in microjoules.
Sensors only read; the sampler decides the pace and turns counter steps into energy with
:func:`llem.units.counter_delta`. A device without a hardware energy counter (a GPU that only
reports power, a CPU with no RAPL) gets a synthetic counter that the sensor integrates itself,
and says so through ``source`` and ``method``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

MEASURED = "measured"
ESTIMATED = "estimated"

# How a device's counter is obtained.
COUNTER = "counter"  # a hardware energy counter (RAPL energy_uj, NVML total energy)
POWER_POLL = "power_poll"  # instantaneous power integrated by llem between reads (measured)
MODEL = "model"  # the estimate model (estimated)

# Reading status.
OK = "ok"
LOST = "lost"  # the device is gone (GPU fell off the bus); others go on
ERROR = "error"  # this read failed; the next may work

COMPONENTS = ("cpu", "dram", "gpu", "psys", "platform")


@dataclass(frozen=True)
class Device:
    """One energy counter on this node.

    Attributes:
        key: unique and stable on the node, e.g. ``rapl:package-0``, ``nvml:GPU-8f3c...``.
        component: ``cpu`` (a CPU package), ``dram``, ``gpu``, ``psys`` (a whole-platform
            meter: RAPL psys, a node meter; never added to the others) or ``platform`` (the
            node meter minus the components, see :mod:`llem.sensors.platform`).
        name: a short human name (``package-0``, ``dram-1``, ``gpu0``).
        sensor: the sensor module that reads it (``rapl``, ``nvml``, ``estimate``).
        source: ``measured`` or ``estimated``.
        method: ``counter``, ``power_poll`` or ``model``.
        max_range_uj: where the counter wraps to zero, or None if it never wraps (it may reset).
        max_power_w: an upper bound of the device's draw, for plausibility checks; None if unknown.
        attrs: sensor-specific identity (``socket``, ``uuid``, ``minor``, ``index``, ``path``...).
    """

    key: str
    component: str
    name: str
    sensor: str
    source: str
    method: str
    max_range_uj: int | None = None
    max_power_w: float | None = None
    attrs: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Reading:
    """One read of one device's cumulative counter.

    Attributes:
        device_key: the :attr:`Device.key` it belongs to.
        energy_uj: the raw cumulative counter in microjoules, or None when the read failed.
        mono_ns: when it was read, on the monotonic clock the sampler passed in.
        status: ``ok``, ``lost`` or ``error``.
        error: why the read failed, when it did.
        epoch: the counter's epoch where the device tells it (pm_counters ``startup``, a
            power-integrating sensor's restart count); a change between two reads is a reset
            (a recorded gap) whatever the values, so a restarted counter that happens to
            read higher is never taken for a forward step. None: not known.
    """

    device_key: str
    energy_uj: int | None
    mono_ns: int
    status: str = OK
    error: str | None = None
    epoch: object = None


class Sensor(Protocol):
    """What the sampler needs from a sensor."""

    name: str

    def devices(self) -> Sequence[Device]:
        """The devices this sensor reads, fixed when the sensor is opened."""
        ...

    def read(self, mono_ns: int) -> list[Reading]:
        """Read every device once; never raises for one device's failure.

        Args:
            mono_ns: the monotonic time of this read, used by sensors that integrate power.
        """
        ...

    def close(self) -> None:
        """Release what the sensor holds (library handles, files)."""
        ...


@dataclass(frozen=True)
class Probe:
    """What ``llem doctor`` shows for one sensor: can it read, and if not, exactly why.

    Attributes:
        sensor: ``rapl``, ``nvml`` or ``estimate``.
        available: True when at least one device can be read.
        devices: the devices found (readable or not).
        problems: human sentences, each a reason something cannot be read and how to fix it.
        notes: other facts worth showing (driver version, layout found...).
    """

    sensor: str
    available: bool
    devices: tuple[Device, ...] = ()
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
