"""Wall-power accounting: the ``platform`` device, what a node meter sees beyond the parts.

Where a whole-node meter is read (pm_counters ``energy``, an ACPI power meter, Grace Hopper
module sensors: devices with component ``psys`` and an ``attrs["meter"]``), the node's energy
is the meter's. The part the component counters do not explain (fans, NICs, disks, voltage
regulators, power-supply losses) becomes a device of its own:

    platform = meter - (CPU + DRAM + GPU counters)          interval by interval

so that the counted devices (cpu, dram, gpu, platform) add up to the meter and jobs can carry
wall-plug energy. The meter itself stays a ``psys`` row (shown, never added).

Rules:

* One source per physical device: the sensors are chosen so (see
  :func:`llem.sensors.open_sensors`); this module subtracts every cpu, dram and gpu device.
* An interval in which the meter or any component has no data has no platform data either
  (a gap), and the carried deficit below is dropped: meters do not step together across a gap.
* A negative residual (the meters out of step: the parts were read a little later than the
  meter, or a component counter runs ahead) is never clipped silently: the interval's
  platform energy is 0, an event ``platform_negative`` records the exact figure, and the
  deficit is carried into the next intervals so that, over a run, meter = parts + platform
  exactly (the node store keeps energies non-negative).
* The platform is ``measured`` only when the meter and every part are; otherwise
  ``estimated`` (a measured meter minus an estimated CPU is an estimate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llem.model import EnergyRow, Event
from llem.sensors.base import ESTIMATED, MEASURED, OK, Device
from llem.units import GAP, UJ_PER_J
from llem.units import OK as STEP_OK

PLATFORM_KEY = "platform:node"
PARTS = ("cpu", "dram", "gpu")
RESIDUAL = "residual"


def meters(devices: Sequence[Device]) -> list[Device]:
    """The whole-node meter devices, all from the first sensor that has any."""
    found = [d for d in devices if d.component == "psys" and d.attrs.get("meter")]
    return [d for d in found if d.sensor == found[0].sensor] if found else []


@dataclass
class PlatformResidual:
    """Derives the platform row of each interval from the meter and part rows."""

    device: Device
    meter_keys: tuple[str, ...]
    part_keys: tuple[str, ...]
    deficit_uj: int = 0

    @classmethod
    def for_devices(cls, devices: Sequence[Device]) -> PlatformResidual | None:
        """None when no node meter is read (then there is no platform device)."""
        meter = meters(devices)
        if not meter:
            return None
        parts = [d for d in devices if d.component in PARTS]
        measured = all(d.source == MEASURED for d in meter + parts)
        device = Device(
            key=PLATFORM_KEY,
            component="platform",
            name="platform",
            sensor="platform",
            source=MEASURED if measured else ESTIMATED,
            method=RESIDUAL,
            attrs={
                "meter": [d.key for d in meter],
                "parts": [d.key for d in parts],
                "meter_kind": str(meter[0].attrs.get("meter")),
            },
        )
        return cls(device, tuple(d.key for d in meter), tuple(d.key for d in parts))

    def row(self, rows: Sequence[EnergyRow], ts_ns: int, events: list[Event]) -> EnergyRow:
        """The platform's row for one interval; appends an event for a negative residual."""
        by_key = {r.device_key: r for r in rows}
        needed = [by_key.get(k) for k in self.meter_keys + self.part_keys]
        if any(r is None or r.status != OK or r.kind not in (STEP_OK, "wrap") for r in needed):
            self.deficit_uj = 0
            return EnergyRow(self.device.key, 0, GAP, OK, None)
        meter = sum(by_key[k].energy_uj for k in self.meter_keys)
        parts = sum(by_key[k].energy_uj for k in self.part_keys)
        residual = meter - parts - self.deficit_uj
        if residual >= 0:
            self.deficit_uj = 0
            return EnergyRow(self.device.key, residual, STEP_OK, OK, None)
        events.append(
            Event(
                ts_ns,
                "platform_negative",
                f"meter {meter / UJ_PER_J:.3f} J < parts {parts / UJ_PER_J:.3f} J"
                + (f" + carried {self.deficit_uj / UJ_PER_J:.3f} J" if self.deficit_uj else "")
                + f": residual {residual / UJ_PER_J:.3f} J carried to the next interval",
                self.device.key,
            )
        )
        self.deficit_uj = -residual
        return EnergyRow(self.device.key, 0, STEP_OK, OK, None)
