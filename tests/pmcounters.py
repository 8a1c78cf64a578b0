"""A ``/sys/cray/pm_counters`` tree in a temporary directory, shaped like the real one.

Real files (HPE Cray EX node controller): ``energy``, ``cpu_energy``, ``memory_energy``,
``accelN_energy`` (``27725 J 1571230862955436 us``), ``power``, ``cpu_power``... (``340 W
1571230862955436 us``), ``freshness`` (incremented at every update), ``generation``,
``startup`` (the controller's start, in microseconds), ``raw_scan_hz`` (10), ``version``.
Each update is a folder of its own, swapped in atomically (see FakePmCounters).

:class:`PmWriter` advances the tree in a background thread at fixed powers, ten updates a
second like the controller, with whole-joule counters carried as exact fractions. Like the
controller's scans, the updates are whole periods of the controller's own clock (timestamps
100 000 us apart at 10 Hz), paced against the host's monotonic clock without drift; they are
not the host thread's jittery wake-up times.
"""

from __future__ import annotations

import os
import threading
import time
from fractions import Fraction
from pathlib import Path

FILES = ("energy", "cpu_energy", "memory_energy")


class FakePmCounters:
    """The tree at ``path`` (a symlink swapped atomically to each update's folder).

    sysfs serves every file from the controller's latest scan; a folder per update, published
    by renaming a symlink, gives readers the same view: a reader that opens files across an
    update sees two timestamps, never half a value.
    """

    def __init__(
        self,
        root: Path,
        accels: int = 4,
        startup_us: int = 1_571_230_000_000_000,
    ) -> None:
        self.base = Path(root).parent / f".{Path(root).name}.d"
        self.base.mkdir(parents=True, exist_ok=True)
        self.path = Path(root)
        self.names = list(FILES) + [f"accel{i}_energy" for i in range(accels)]
        self.joules: dict[str, Fraction] = {n: Fraction(0) for n in self.names}
        self.startup_us = startup_us
        self.freshness = 0
        self.ts_us = startup_us
        self.lock = threading.Lock()
        self.watts: dict[str, float] = {}
        self.publish()

    def publish(self, watts: dict[str, float] | None = None) -> None:
        """One scan: every file with the current timestamp, freshness bumped, swapped in."""
        self.watts = watts if watts is not None else self.watts
        self.freshness += 1
        folder = self.base / f"scan-{self.freshness}"
        folder.mkdir()
        files = {
            "generation": "7",
            "raw_scan_hz": "10",
            "version": "2",
            "startup": str(self.startup_us),
            "freshness": str(self.freshness),
        }
        for name in self.names:
            files[name] = f"{int(self.joules[name])} J {self.ts_us} us"
            power = name.replace("energy", "power")
            files[power] = f"{int(self.watts.get(name, 0))} W {self.ts_us} us"
        for name, text in files.items():
            (folder / name).write_text(text + "\n")
        link = self.base / "next"
        os.symlink(folder, link)
        os.replace(link, self.path)
        old = self.base / f"scan-{self.freshness - 5}"
        if old.exists():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def advance(self, watts: dict[str, float], seconds: float) -> None:
        """One controller update: every counter grows by its power times ``seconds``."""
        with self.lock:
            for name, w in watts.items():
                self.joules[name] += Fraction(w) * Fraction(seconds)
            self.ts_us += int(Fraction(seconds) * 10**6)
            self.publish(watts)

    def restart(self, startup_us: int | None = None) -> None:
        """The controller restarts: counters from zero, a new startup time."""
        with self.lock:
            self.startup_us = startup_us if startup_us is not None else self.startup_us + 10**9
            for name in self.names:
                self.joules[name] = Fraction(0)
            self.publish()

    def total_j(self, name: str) -> float:
        return float(self.joules[name])


class PmWriter(threading.Thread):
    """Advances a fake tree at fixed powers, ten updates a second, until stopped.

    Each update is a whole number of scan periods (``1/hz`` s exactly) of the controller's
    clock: scan ``k`` is due at ``t0 + k/hz`` on the host's monotonic clock, and a late wake
    publishes every scan then due in one update. So each counter holds ``watts * k / hz``
    exactly, and what its whole-joule file truncates is set by the power and the scan count
    (none at all where a scan's energy is a whole joule), never by the host's timing.
    """

    def __init__(
        self,
        fake: FakePmCounters,
        watts: dict[str, float],
        hz: float = 10.0,
    ) -> None:
        super().__init__(daemon=True, name="pm-writer")
        self.fake, self.watts = fake, watts
        self.scan_s = 1 / Fraction(hz).limit_denominator(1000)  # exact: 1/20, 1/10
        self.period = float(self.scan_s)
        self.stopping = threading.Event()
        # Restart the controller (counters from zero) once this file exists: the test's
        # command makes it, so the restart falls inside the measured window however slowly
        # the measuring process started.
        self.restart_when: Path | None = None

    def run(self) -> None:
        t0 = time.monotonic()
        scans = 0
        while not self.stopping.wait(max(0.0, t0 + (scans + 1) * self.period - time.monotonic())):
            now = time.monotonic()
            if self.restart_when is not None and self.restart_when.exists():
                self.restart_when = None
                self.fake.restart()
            due = max(scans + 1, int((now - t0) / self.period))
            self.fake.advance(self.watts, (due - scans) * self.scan_s)
            scans = due

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
