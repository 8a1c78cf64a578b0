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


class ConstantPower:
    """A thread that advances zones' counters as hardware at a constant power would.

    Every ``step_s`` each zone's ``energy_uj`` becomes its start value plus watts x elapsed
    time (wrapping at its range), written atomically (a new file renamed over the old one)
    so that a reader never sees a half-written counter. Use as a context manager.
    """

    def __init__(self, tree: FakePowercap, watts: dict[str, float], step_s: float = 0.005):
        import threading

        self.tree, self.watts, self.step_s = tree, dict(watts), step_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import time

        start = {z: self.tree.get(z) for z in self.watts}
        ranges = {
            z: int((self.tree.zones[z] / "max_energy_range_uj").read_text()) for z in self.watts
        }
        t0 = time.monotonic()
        while not self._stop.is_set():
            elapsed = time.monotonic() - t0
            for zone, watts in self.watts.items():
                value = (start[zone] + int(watts * elapsed * 1e6)) % ranges[zone]
                path = self.tree.zones[zone] / "energy_uj"
                tmp = path.with_name(".energy_uj.tmp")
                tmp.write_text(f"{value}\n")
                os.replace(tmp, path)
            self._stop.wait(self.step_s)

    def __enter__(self) -> ConstantPower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
