"""CPU package and DRAM energy from Linux powercap (RAPL), and AMD's ``amd_energy`` hwmon.

Layouts read:

* powercap ``intel-rapl`` zones (Intel, and AMD Zen on Linux >= 5.11, which reuses the same
  driver): top-level zones named ``package-N`` (or ``package-N-die-M``) and their subzones;
  ``dram`` subzones (or top-level ``dram`` zones) are read, ``core``/``uncore`` subzones are
  parts of the package and never added, and ``psys`` (the whole platform) is never added to
  the package: it is reported by ``probe()`` and not read.
* ``intel-rapl-mmio`` zones: the same package counter through MMIO; used only for a package
  that has no MSR-based zone, so that no package is counted twice.
* the ``amd_energy`` hwmon driver (Linux 5.8 to 5.12): ``energyN_input`` files labelled
  ``EsocketN`` (microjoules, extended to 64 bits by the driver, so no wrap); per-core
  ``Ecore`` counters are parts of the socket and never added.

The counters wrap at ``max_energy_range_uj`` (every few minutes under load); the sampler reads
often enough and :func:`llem.units.counter_delta` handles the wrap. Since Linux 5.10
``energy_uj`` is readable by root only (CVE-2020-8694, "Platypus"): the node sampler runs as
root; elsewhere the permission error explains the choice.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llem.errors import SensorPermissionError, SensorReadError, SensorUnavailable
from llem.sensors.base import COUNTER, ERROR, MEASURED, OK, Device, Probe, Reading

log = logging.getLogger(__name__)

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
DEFAULT_HWMON_ROOT = "/sys/class/hwmon"

# Plausibility bounds for a counter step (no CPU package or DIMM set draws more).
PACKAGE_MAX_POWER_W = 1000.0
DRAM_MAX_POWER_W = 500.0
# Margin over the zone's own power limits (constraint_*_max_power_uw): short bursts above the
# long-term limit are normal. The bound sets how often the counter is read (twice per range
# at this power) and which steps are plausible, so it errs high.
CONSTRAINT_MARGIN = 1.5

_ZONE_DIR = re.compile(r"^(intel-rapl|intel-rapl-mmio):(\d+)(?::(\d+))?$")
_PACKAGE_NAME = re.compile(r"^package-(\d+)(?:-die-(\d+))?$")

PERMISSION_HELP = (
    "Since Linux 5.10 the RAPL energy counters are readable by root only, a mitigation of "
    "CVE-2020-8694 (the 'Platypus' power side channel). The llem node sampler runs as root "
    "(from the Slurm Prolog) and is not affected. To measure as an ordinary user on a "
    "workstation you trust, an admin can grant read access to a group, e.g. "
    "'chgrp llem /sys/class/powercap/intel-rapl:*/energy_uj && chmod g+r ...' at boot (a udev "
    "rule or sysfsutils), knowing that it re-opens that side channel to the group's members; "
    "without it llem falls back to the estimate model and says so."
)


@dataclass(frozen=True)
class Zone:
    """One counter file found in the tree."""

    path: Path  # directory of the zone (or the hwmon energy file for amd_energy)
    component: str  # "cpu" or "dram"
    socket: int
    die: int | None
    layout: str  # "intel-rapl", "intel-rapl-mmio", "amd_energy"

    @property
    def energy_file(self) -> Path:
        return self.path if self.layout == "amd_energy" else self.path / "energy_uj"

    @property
    def name(self) -> str:
        base = "package" if self.component == "cpu" else "dram"
        die = f"-die-{self.die}" if self.die is not None else ""
        return f"{base}-{self.socket}{die}"


def powercap_root(env: dict | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("LLEM_POWERCAP_ROOT") or DEFAULT_POWERCAP_ROOT)


def hwmon_root(env: dict | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("LLEM_HWMON_ROOT") or DEFAULT_HWMON_ROOT)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _zone_dirs(root: Path) -> dict[str, Path]:
    """Every powercap zone directory below root, by its name (flat symlinks or nested)."""
    found: dict[str, Path] = {}
    stack = [root]
    while stack:
        parent = stack.pop()
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            if _ZONE_DIR.match(entry.name) and entry.name not in found:
                try:
                    if not entry.is_dir():
                        continue
                except OSError:
                    continue
                found[entry.name] = Path(entry.path)
                stack.append(Path(entry.path))
            elif entry.name in ("intel-rapl", "intel-rapl-mmio") and parent == root:
                stack.append(Path(entry.path))  # the control-type folder holds zones too
    return found


def find_zones(root: Path, notes: list[str] | None = None) -> list[Zone]:
    """The package and DRAM zones under a powercap root, MMIO duplicates removed."""
    notes = [] if notes is None else notes
    dirs = _zone_dirs(root)
    packages: dict[str, dict[tuple[int, int | None], Zone]] = {
        "intel-rapl": {},
        "intel-rapl-mmio": {},
    }
    drams: list[Zone] = []
    for dirname in sorted(dirs, key=_zone_sort_key):
        m = _ZONE_DIR.match(dirname)
        assert m is not None
        layout, top, sub = m.group(1), int(m.group(2)), m.group(3)
        name = _read_text(dirs[dirname] / "name")
        if name is None:
            notes.append(f"{dirname}: no readable 'name' file; zone ignored")
            continue
        pkg = _PACKAGE_NAME.match(name)
        if pkg and sub is None:
            socket, die = int(pkg.group(1)), (int(pkg.group(2)) if pkg.group(2) else None)
            packages[layout][(socket, die)] = Zone(dirs[dirname], "cpu", socket, die, layout)
        elif name == "dram" and layout == "intel-rapl":
            socket, die = top, None
            parent = dirs.get(f"{layout}:{top}")
            parent_name = _read_text(parent / "name") if parent is not None and sub else None
            parent_pkg = _PACKAGE_NAME.match(parent_name) if parent_name else None
            if parent_pkg:
                socket = int(parent_pkg.group(1))
                die = int(parent_pkg.group(2)) if parent_pkg.group(2) else None
            drams.append(Zone(dirs[dirname], "dram", socket, die, layout))
        elif name == "psys":
            notes.append(
                f"{dirname}: psys (whole-platform) zone found; not read, because it overlaps the "
                "package and DRAM counters and must never be added to them"
            )
        elif name in ("core", "uncore"):
            continue  # parts of the package counter
    zones = list(packages["intel-rapl"].values())
    for key, zone in packages["intel-rapl-mmio"].items():
        if key in packages["intel-rapl"]:
            notes.append(f"{zone.path.name}: MMIO copy of package-{key[0]}; the MSR zone is read")
        else:
            zones.append(zone)
    return zones + drams


def find_amd_energy(root: Path) -> list[Zone]:
    """Socket counters of the ``amd_energy`` hwmon driver, if loaded."""
    zones = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return zones
    for entry in entries:
        hw = Path(entry.path)
        if _read_text(hw / "name") != "amd_energy":
            continue
        for label_file in sorted(hw.glob("energy*_label")):
            label = _read_text(label_file) or ""
            m = re.match(r"^Esocket(\d+)$", label)
            if m:
                energy = hw / label_file.name.replace("_label", "_input")
                zones.append(Zone(energy, "cpu", int(m.group(1)), None, "amd_energy"))
    return zones


def _zone_sort_key(name: str) -> tuple:
    m = _ZONE_DIR.match(name)
    assert m is not None
    return (m.group(1), int(m.group(2)), -1 if m.group(3) is None else int(m.group(3)))


def _parse_counter(text: str, path: Path) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise SensorReadError(f"{path}: not an integer counter: {text.strip()[:40]!r}") from None
    if value < 0:
        raise SensorReadError(f"{path}: negative counter {value}")
    return value


def read_counter(path: Path) -> int:
    """Read one energy counter file (microjoules).

    Raises:
        SensorPermissionError: the file exists but is root-only (with the CVE explanation).
        SensorReadError: the file is missing, unreadable or holds garbage.
    """
    try:
        with open(path, "rb") as f:
            text = f.read(64).decode("ascii", "replace")
    except PermissionError:
        raise SensorPermissionError(f"{path}: permission denied. {PERMISSION_HELP}") from None
    except OSError as e:
        raise SensorReadError(f"{path}: {e.strerror or e}") from e
    return _parse_counter(text, path)


def _max_range(zone: Zone) -> int | None:
    if zone.layout == "amd_energy":
        return None  # the driver accumulates to 64 bits
    text = _read_text(zone.path / "max_energy_range_uj")
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None


def _max_power_w(zone: Zone) -> float:
    """The most the zone can plausibly draw: its own power limits (``constraint_N_max_power_uw``)
    with a margin when it states any, never above the generic bound for its component."""
    bound = PACKAGE_MAX_POWER_W if zone.component == "cpu" else DRAM_MAX_POWER_W
    stated = []
    for path in zone.path.glob("constraint_*_max_power_uw"):
        text = _read_text(path)
        if text is not None and text.isdigit() and int(text) > 0:
            stated.append(int(text) / 1e6)
    return min(bound, max(stated) * CONSTRAINT_MARGIN) if stated else bound


def _device(zone: Zone) -> Device:
    max_power = _max_power_w(zone)
    return Device(
        key=f"rapl:{zone.name}",
        component=zone.component,
        name=zone.name,
        sensor="rapl",
        source=MEASURED,
        method=COUNTER,
        max_range_uj=_max_range(zone),
        max_power_w=max_power,
        attrs={
            "socket": zone.socket,
            "die": zone.die,
            "layout": zone.layout,
            "path": str(zone.energy_file),
        },
    )


class RaplSensor:
    """Reads every package and DRAM counter found, each as one device.

    Args:
        root: the powercap tree (default ``$LLEM_POWERCAP_ROOT`` or ``/sys/class/powercap``).
        hwmon: the hwmon tree for ``amd_energy`` (default ``$LLEM_HWMON_ROOT`` or
            ``/sys/class/hwmon``).
        components: which components to read (``cpu``, ``dram``).

    Raises:
        SensorUnavailable: no zone found.
        SensorPermissionError: zones found but none readable by this process.
    """

    name = "rapl"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        hwmon: str | os.PathLike | None = None,
        components: Iterable[str] = ("cpu", "dram"),
    ) -> None:
        self.root = Path(root) if root is not None else powercap_root()
        self.notes: list[str] = []
        wanted = set(components)
        zones = find_zones(self.root, self.notes)
        if not any(z.component == "cpu" for z in zones):
            zones += find_amd_energy(Path(hwmon) if hwmon is not None else hwmon_root())
        zones = [z for z in zones if z.component in wanted]
        if not zones:
            raise SensorUnavailable(f"no RAPL package or DRAM zone under {self.root}")
        readable, denied = [], []
        for zone in zones:
            try:
                read_counter(zone.energy_file)
                readable.append(zone)
            except SensorPermissionError:
                denied.append(zone)
            except SensorReadError as e:
                # A zone that exists but cannot be read now may recover; keep it, reads say why.
                self.notes.append(str(e))
                readable.append(zone)
        if not readable:
            raise SensorPermissionError(
                f"{denied[0].energy_file}: permission denied. {PERMISSION_HELP}"
            )
        self._zones = readable
        self._devices = [_device(z) for z in readable]
        self._files = [z.energy_file for z in readable]

    def devices(self) -> Sequence[Device]:
        return self._devices

    def read(self, mono_ns: int) -> list[Reading]:
        readings = []
        for device, path in zip(self._devices, self._files):
            try:
                readings.append(Reading(device.key, read_counter(path), mono_ns, OK))
            except (SensorReadError, SensorPermissionError) as e:
                readings.append(Reading(device.key, None, mono_ns, ERROR, str(e)))
        return readings

    def close(self) -> None:
        pass


def probe(root: str | os.PathLike | None = None, hwmon: str | os.PathLike | None = None) -> Probe:
    """What RAPL can measure here, and exactly why not."""
    root_path = Path(root) if root is not None else powercap_root()
    try:
        sensor = RaplSensor(root_path, hwmon)
    except SensorPermissionError as e:
        notes: list[str] = []
        zones = find_zones(root_path, notes)
        return Probe("rapl", False, tuple(_device(z) for z in zones), (str(e),), tuple(notes))
    except SensorUnavailable as e:
        why = str(e)
        if not root_path.exists():
            why = (
                f"{root_path} does not exist: no powercap interface (not Linux, the intel_rapl "
                "modules not loaded, a VM or container without it, or a CPU without RAPL)"
            )
        return Probe("rapl", False, (), (why,))
    problems = []
    for reading in sensor.read(0):
        if reading.status != OK:
            problems.append(reading.error or f"{reading.device_key}: read failed")
    return Probe("rapl", True, tuple(sensor.devices()), tuple(problems), tuple(sensor.notes))
