"""The llem site of the real-Slurm tests with fake AMD GPUs (the real amdsmi package loading
the tests' fake libamd_smi.so, advanced by a thread at known powers) and an HPE Cray EX
pm_counters node meter."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tests.fakeamdsmi import lib as fakeamdsmi
from tests.pmcounters import FakePmCounters, PmWriter

from .llem_site import REPO, Site

UNIT = 65536  # amdsmi accumulator ticks per joule
METER_W = {
    "energy": 900,
    "cpu_energy": 200,
    "memory_energy": 60,
    "accel0_energy": 120,
    "accel1_energy": 280,
}


def two_gpus(acc: list[float], watts: tuple[float, ...]) -> list[fakeamdsmi.FakeAmdGpu]:
    """Two plain GPUs (renderD128, renderD129), each reporting its own energy."""
    return [
        fakeamdsmi.FakeAmdGpu(
            f"0000:{0xC1 + 0x10 * i:02x}:00.0",
            f"5bff74bf-0000-1000-80ba-00000000000{i}",
            card=i,
            acc=int(acc[i]),
            power_w=int(watts[i]),
        )
        for i in range(2)
    ]


def mi250x(acc: list[float], watts: tuple[float, ...]) -> list[fakeamdsmi.FakeAmdGpu]:
    """One MI250X: two dies sharing a board serial; the first reports the package's energy
    (``watts[0]``), the second nothing (the fake's mi250x quirk)."""
    return [
        fakeamdsmi.FakeAmdGpu(
            f"0000:{0xC1 + 0x10 * i:02x}:00.0",
            f"5bff74bf-0000-1000-80ba-0000000000a{i}",
            card=i,
            acc=int(acc[i]),
            power_w=int(watts[i]),
            serial="MI250X-PKG0",
            product="AMD Instinct MI250X",
            kind="mi250x",
        )
        for i in range(2)
    ]


class AmdGpus:
    """The fake library's state, counters advanced at ``watts`` by a thread: the library is
    built under ``base``, the state it rewrites lives under ``live`` (in memory)."""

    def __init__(
        self,
        base,
        live,
        watts: tuple[float, ...] = (120.0, 280.0),
        make: Callable[[list[float], tuple[float, ...]], list] = two_gpus,
    ) -> None:
        self.rocm = fakeamdsmi.build(base / "rocm")
        live.mkdir(parents=True, exist_ok=True)
        self.state = live / "amdsmi.state"
        self.watts, self.make = watts, make
        self.acc = [0.0 for _ in watts]
        self.write()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def write(self) -> None:
        fakeamdsmi.write_state(self.state, self.make(self.acc, self.watts))

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.05):
            now = time.monotonic()
            for i, w in enumerate(self.watts):
                self.acc[i] += w * (now - last) * UNIT
            last = now
            self.write()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class MeterSite(Site):
    """The llem site of the other real-Slurm tests, with AMD GPUs and a node meter."""

    def __init__(self, **amd) -> None:
        super().__init__()
        self.amd = AmdGpus(self.base / "amd", self.live / "amd", **amd)
        self.pm = FakePmCounters(self.live / "pm_counters", accels=2)
        self.pm_writer = PmWriter(self.pm, METER_W, hz=10)
        self.write_defaults(
            LLEM_PM_COUNTERS_ROOT=str(self.pm.path),
            LLEM_POWERCAP_ROOT=str(self.base / "no-powercap"),
        )
        for p in [self.base, *self.base.rglob("*"), self.live, *self.live.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o755)

    def hook(self, kind: str):
        path = self.base / f"{kind}-wrapper.sh"
        path.write_text(
            "#!/bin/bash\n"
            f"export LLEM_DEFAULTS_FILE={self.defaults}\n"
            f"export ROCM_PATH={self.amd.rocm}\n"
            f"export FAKE_AMDSMI_STATE={self.amd.state}\n"
            f"exec /bin/bash {REPO / 'slurm' / (kind + '.sh')}\n"
        )
        path.chmod(0o755)
        return path

    def cleanup(self) -> None:
        self.amd.stop()
        self.pm_writer.stop()
        super().cleanup()

    def start(self) -> None:
        self.hw.start()
        self.amd.start()
        self.pm_writer.start()
