"""Node and module power meters read through hwmon: ACPI ``power_meter``, Grace Hopper.

Layouts read (each hwmon device ``hwmonN`` under ``/sys/class/hwmon``; the ACPI driver puts its
files either in ``hwmonN/`` or in ``hwmonN/device/`` depending on the kernel):

* an ACPI 4.0 power meter (``name`` = ``power_meter``) with ``power1_average`` in microwatts,
  the average over the meter's window ``power1_average_interval`` (milliseconds). Without an
  ``oem_info`` naming a part it is the node's meter (component ``psys``, never added to the
  others; :mod:`llem.sensors.platform` derives the ``platform`` residual from it).
* NVIDIA Grace Hopper (GH200) and Grace superchips publish one such meter per rail, named by
  ``power1_oem_info``: ``Module Power Socket N`` (the whole module: Grace CPU, its LPDDR5X,
  Hopper GPU and HBM, regulators) is a meter (``psys``); ``Grace Power Socket N`` (the Grace
  CPU and its memory) is the CPU device; ``CPU Power Socket N`` and ``SysIO Power Socket N``
  are rails inside Grace, shown by ``llem doctor`` and never added. The GPU is NVML's, so the
  module's residual is what is neither Grace nor the GPU. A module meter covers the modules,
  not the rest of the node (NICs, fans outside them): said in the device's attrs.

These meters give power, not energy: the sensor integrates it between reads (method
``power_poll``), each interval at the power the meter reports at its end, which is the average
over the meter's window ending then. The window is recorded with the device; jobs shorter than
it are not resolved by the meter. A failed read restarts the integration, and the next step is
a recorded gap (a new ``epoch``), never power carried across the failure.

``LLEM_HWMON_ROOT`` points at another tree (tests, containers).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llem.errors import SensorPermissionError, SensorReadError, SensorUnavailable
from llem.sensors.base import ERROR, MEASURED, OK, POWER_POLL, Device, Probe, Reading
from llem.units import NS_PER_S

DEFAULT_ROOT = "/sys/class/hwmon"
METER_MAX_POWER_W = 20_000.0
GRACE_MAX_POWER_W = 1_000.0

_AVERAGE = re.compile(r"^power(\d+)_average$")
_MODULE = re.compile(r"^Module Power Socket (\d+)")
_GRACE = re.compile(r"^Grace Power Socket (\d+)")
_RAIL = re.compile(r"^(CPU|SysIO) Power Socket (\d+)")


@dataclass(frozen=True)
class Meter:
    path: Path  # the powerK_average file
    component: str  # psys (a meter) or cpu (Grace)
    name: str
    meter: str | None  # "node" or "module" for meters
    window_ms: int | None
    oem_info: str


def root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("LLEM_HWMON_ROOT") or DEFAULT_ROOT)


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(path: Path) -> int | None:
    text = _text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def find_meters(base: Path, notes: list[str] | None = None) -> list[Meter]:
    """Every power meter under an hwmon root that llem reads, in a stable order."""
    notes = [] if notes is None else notes
    try:
        hwmons = sorted(os.listdir(base), key=lambda n: (len(n), n))
    except OSError:
        return []
    found: list[Meter] = []
    nodes = 0
    for hw in hwmons:
        for folder in (base / hw, base / hw / "device"):
            name = _text(folder / "name") or _text(base / hw / "name")
            if name != "power_meter":
                continue
            try:
                files = sorted(f for f in os.listdir(folder) if _AVERAGE.match(f))
            except OSError:
                continue
            for f in files:
                k = _AVERAGE.match(f).group(1)  # type: ignore[union-attr]
                oem = _text(folder / f"power{k}_oem_info") or ""
                window = _int(folder / f"power{k}_average_interval")
                path = folder / f
                if m := _MODULE.match(oem):
                    found.append(Meter(path, "psys", f"module-{m.group(1)}", "module", window, oem))
                elif m := _GRACE.match(oem):
                    found.append(Meter(path, "cpu", f"grace-{m.group(1)}", None, window, oem))
                elif _RAIL.match(oem):
                    notes.append(
                        f"{path}: '{oem}' is a rail inside the Grace CPU, whose "
                        "'Grace Power' is read: not added"
                    )
                elif oem:
                    notes.append(f"{path}: power meter '{oem}' of unknown scope: not read")
                else:
                    found.append(
                        Meter(
                            path, "psys", f"node-{nodes}" if nodes else "node", "node", window, oem
                        )
                    )
                    nodes += 1
            break  # hwmonN and hwmonN/device are the same meter
    if any(m.meter == "node" for m in found) and any(m.meter == "module" for m in found):
        notes.append(
            "both a node meter and module meters: the node meter is the meter, the "
            "modules are not read (they are inside it)"
        )
        found = [m for m in found if m.meter != "module"]
    return found


def amdgpu_power_files(base: Path) -> dict[str, Path]:
    """The amdgpu driver's power file of each AMD GPU under an hwmon root, by PCI BDF.

    Each GPU has an ``hwmonN`` named ``amdgpu`` whose ``device`` link is its PCI device
    (``.../0000:c1:00.0``). The file is ``power1_average`` (MI100/MI200 and older: the average
    over the firmware's window) or else ``power1_input`` (MI300 and RDNA3: the current power),
    both in microwatts. Read by :mod:`llem.sensors.amdsmi` as its last fallback.
    """
    found: dict[str, Path] = {}
    try:
        hwmons = sorted(os.listdir(base), key=lambda n: (len(n), n))
    except OSError:
        return found
    for hw in hwmons:
        folder = base / hw
        if _text(folder / "name") != "amdgpu":
            continue
        bdf = os.path.basename(os.path.realpath(folder / "device")).lower()
        for f in ("power1_average", "power1_input"):
            if (folder / f).exists():
                found.setdefault(bdf, folder / f)
                break
    return found


def _device(m: Meter) -> Device:
    attrs: dict[str, object] = {"path": str(m.path), "averaging_window_ms": m.window_ms}
    if m.oem_info:
        attrs["oem_info"] = m.oem_info
    if m.meter:
        attrs["meter"] = m.meter
        if m.meter == "module":
            attrs["scope"] = "the Grace Hopper modules, not the rest of the node"
    return Device(
        key=f"hwmon:{m.name}",
        component=m.component,
        name=m.name,
        sensor="hwmon",
        source=MEASURED,
        method=POWER_POLL,
        max_range_uj=None,
        max_power_w=METER_MAX_POWER_W if m.component == "psys" else GRACE_MAX_POWER_W,
        attrs=attrs,
    )


def read_power_uw(path: Path) -> int:
    """One ``powerK_average`` value in microwatts.

    Raises:
        SensorPermissionError: root-only on this system.
        SensorReadError: missing, unreadable, garbage or negative.
    """
    try:
        text = path.read_text().strip()
    except PermissionError:
        raise SensorPermissionError(
            f"{path}: permission denied (the node sampler runs as "
            "root; ask an admin to make it group-readable)"
        ) from None
    except OSError as e:
        raise SensorReadError(f"{path}: {e.strerror or e}") from e
    try:
        value = int(text)
    except ValueError:
        raise SensorReadError(f"{path}: not a power in microwatts: {text[:40]!r}") from None
    if value < 0:
        raise SensorReadError(f"{path}: negative power {value}")
    return value


class HwmonSensor:
    """Integrates every power meter found into a synthetic energy counter (microjoules).

    Raises:
        SensorUnavailable: no meter found.
        SensorPermissionError: meters found, none readable.
    """

    name = "hwmon"

    def __init__(self, base: str | os.PathLike | None = None) -> None:
        self.base = Path(base) if base is not None else root()
        self.notes: list[str] = []
        found = find_meters(self.base, self.notes)
        if not found:
            raise SensorUnavailable(f"no ACPI or Grace Hopper power meter under {self.base}")
        denied = []
        for m in found:
            try:
                read_power_uw(m.path)
            except SensorPermissionError as e:
                denied.append(str(e))
            except SensorReadError as e:
                self.notes.append(str(e))
        if len(denied) == len(found):
            raise SensorPermissionError(denied[0])
        self._meters = found
        self._devices = [_device(m) for m in found]
        n = len(found)
        self._acc_uw_ns = [0] * n  # integer uW x ns: exact, divided by 1e9 when read
        self._last_ns: list[int | None] = [None] * n
        self._epoch = [0] * n

    def devices(self) -> Sequence[Device]:
        return self._devices

    def read(self, mono_ns: int) -> list[Reading]:
        out = []
        for i, (m, d) in enumerate(zip(self._meters, self._devices)):
            try:
                power_uw = read_power_uw(m.path)
            except (SensorReadError, SensorPermissionError) as e:
                if self._last_ns[i] is not None:
                    self._epoch[i] += 1  # the next good read starts a new series
                self._last_ns[i] = None
                out.append(Reading(d.key, None, mono_ns, ERROR, str(e)))
                continue
            last = self._last_ns[i]
            if last is not None and mono_ns > last:
                self._acc_uw_ns[i] += power_uw * (mono_ns - last)
            self._last_ns[i] = mono_ns
            out.append(
                Reading(d.key, self._acc_uw_ns[i] // NS_PER_S, mono_ns, OK, epoch=self._epoch[i])
            )
        return out

    def close(self) -> None:
        pass


def probe(base: str | os.PathLike | None = None) -> Probe:
    """What hwmon power meters can measure here, and exactly why not."""
    path = Path(base) if base is not None else root()
    try:
        sensor = HwmonSensor(path)
    except SensorPermissionError as e:
        return Probe("hwmon", False, tuple(_device(m) for m in find_meters(path)), (str(e),))
    except SensorUnavailable as e:
        why = str(e) + (
            ": no ACPI 4.0 power meter (the acpi_power_meter module not loaded, "
            "or the firmware has none) and no Grace Hopper module sensors"
        )
        return Probe("hwmon", False, (), (why,))
    notes = list(sensor.notes)
    for d in sensor.devices():
        window = d.attrs.get("averaging_window_ms")
        notes.append(
            f"{d.name}: averaging window "
            + (f"{window} ms" if window is not None else "unknown")
            + "; shorter jobs are not resolved by this meter"
        )
    problems = [r.error or r.device_key for r in sensor.read(0) if r.status != OK]
    return Probe("hwmon", True, tuple(sensor.devices()), tuple(problems), tuple(notes))
