"""A powercap sysfs tree in a temporary directory, shaped like the kernel's.

Real layout: ``/sys/class/powercap/intel-rapl:0`` (name ``package-0``) holding subzones
``intel-rapl:0:0`` (``core``), ``intel-rapl:0:1`` (``dram``)..., each with ``energy_uj`` and
``max_energy_range_uj``. The class/ folder holds flat symlinks to every zone; this tree nests
zones the way ``/sys/devices/virtual/powercap/intel-rapl`` does and adds the flat symlinks,
so both walks are exercised.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# The range of a typical Xeon package counter (2^32 * 61 uJ units ~ 262 kJ).
DEFAULT_RANGE_UJ = 262_143_328_850


class FakePowercap:
    def __init__(self, root: Path, flat_links: bool = True) -> None:
        self.root = Path(root)
        self.devices = self.root / "devices"
        self.cls = self.root / "class"
        self.devices.mkdir(parents=True, exist_ok=True)
        self.cls.mkdir(parents=True, exist_ok=True)
        self.flat_links = flat_links
        self.zones: dict[str, Path] = {}

    @property
    def path(self) -> Path:
        """What LLEM_POWERCAP_ROOT points at (the class/ folder)."""
        return self.cls

    def add_zone(
        self,
        zone_id: str,
        name: str,
        energy_uj: int = 0,
        max_range_uj: int | str | None = DEFAULT_RANGE_UJ,
        control: str = "intel-rapl",
    ) -> Path:
        """Add zone ``control:zone_id`` (e.g. ``0`` or ``0:1``), nested under its parent."""
        parts = zone_id.split(":")
        dirname = f"{control}:{zone_id}"
        if len(parts) == 1:
            parent = self.devices / control
        else:
            parent = self.zones[f"{control}:{parts[0]}"]
        path = parent / dirname
        path.mkdir(parents=True, exist_ok=True)
        (path / "name").write_text(name + "\n")
        (path / "energy_uj").write_text(f"{energy_uj}\n")
        if max_range_uj is not None:
            (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
        self.zones[dirname] = path
        if self.flat_links:
            link = self.cls / dirname
            if not link.exists():
                os.symlink(path, link)
        return path

    def add_socket(
        self,
        socket: int,
        dram: bool = True,
        energy_uj: int = 0,
        max_range_uj: int = DEFAULT_RANGE_UJ,
    ) -> None:
        self.add_zone(f"{socket}", f"package-{socket}", energy_uj, max_range_uj)
        self.add_zone(f"{socket}:0", "core", energy_uj // 2, max_range_uj)
        if dram:
            self.add_zone(f"{socket}:1", "dram", energy_uj // 10, max_range_uj)

    def set(self, dirname: str, energy_uj: int | str) -> None:
        """Write the counter as sysfs shows it: whole, never an empty or half-written file
        (a truncate-then-write left readers an empty file now and then, which the sensor
        rightly took as a read error). The file's mode and owner are kept."""
        path = self.zones[dirname] / "energy_uj"
        tmp = path.with_name(".energy_uj.tmp")
        tmp.write_text(f"{energy_uj}\n")
        try:
            st = path.stat()
        except FileNotFoundError:
            pass
        else:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)

    def get(self, dirname: str) -> int:
        return int((self.zones[dirname] / "energy_uj").read_text())

    def advance(self, dirname: str, delta_uj: int) -> None:
        """Advance a counter, wrapping at its max_energy_range_uj like the hardware."""
        max_file = self.zones[dirname] / "max_energy_range_uj"
        max_range = int(max_file.read_text()) if max_file.exists() else None
        value = self.get(dirname) + delta_uj
        if max_range is not None:
            value %= max_range
        self.set(dirname, value)
