"""Shared by the meter tests: a clock that steps on demand, a sink that keeps intervals, and
a fake hwmon tree."""

from __future__ import annotations

from pathlib import Path

from llem.units import NS_PER_S


class StepClock:
    def __init__(self) -> None:
        self.mono = 10 * NS_PER_S
        self.wall = 1_700_000_000 * NS_PER_S

    def monotonic_ns(self) -> int:
        return self.mono

    def time_ns(self) -> int:
        return self.wall

    def step(self, seconds: float) -> None:
        self.mono += int(seconds * NS_PER_S)
        self.wall += int(seconds * NS_PER_S)


class Sink:
    def __init__(self) -> None:
        self.devices = []
        self.intervals = []

    def register_devices(self, devices, ts_ns):
        self.devices = list(devices)

    def write(self, interval):
        self.intervals.append(interval)


class FakeHwmon:
    """``hwmonN`` folders; ``in_device`` puts the meter files in ``hwmonN/device/`` as the
    ACPI driver does on kernels before 6.x."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root)
        self.path.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.files: dict[str, Path] = {}

    def add(
        self,
        key: str,
        power_uw: int,
        oem: str | None = None,
        window_ms: int = 1000,
        name: str = "power_meter",
        in_device: bool = False,
    ) -> Path:
        hw = self.path / f"hwmon{self.n}"
        self.n += 1
        folder = hw / "device" if in_device else hw
        folder.mkdir(parents=True)
        (folder / "name").write_text(name + "\n")
        (folder / "power1_average").write_text(f"{power_uw}\n")
        (folder / "power1_average_interval").write_text(f"{window_ms}\n")
        if oem is not None:
            (folder / "power1_oem_info").write_text(oem + "\n")
        self.files[key] = folder / "power1_average"
        return folder

    def set(self, key: str, power_uw: int | str) -> None:
        self.files[key].write_text(f"{power_uw}\n")

    def add_amdgpu(self, bdf: str, power_uw: int, file: str = "power1_average") -> Path:
        """An amdgpu ``hwmonN`` as the driver makes it: ``name`` amdgpu, ``device`` a link to
        the GPU's PCI device folder (named by its BDF), the power file in microwatts."""
        pci = self.path.parent / "devices" / bdf
        pci.mkdir(parents=True, exist_ok=True)
        hw = self.path / f"hwmon{self.n}"
        self.n += 1
        hw.mkdir(parents=True)
        (hw / "name").write_text("amdgpu\n")
        (hw / "device").symlink_to(pci)
        (hw / file).write_text(f"{power_uw}\n")
        self.files[bdf] = hw / file
        return hw
