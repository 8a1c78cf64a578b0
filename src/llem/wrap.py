"""``llem wrap`` outside Slurm: run a command while the sampler measures the node.

The figures are the *node's* energy while the command ran (counters cannot tell processes
apart), which the summary says. Each component says whether it was measured or estimated,
and its coverage: the share of the window for which that device had data.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from llem.model import Interval
from llem.sensors.base import Device
from llem.units import NS_PER_S, OK, WRAP, split_by_hour, uj_to_j

SCHEMA = "llem.wrap/1"
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


@dataclass
class DeviceTotal:
    device: Device
    energy_uj: int = 0
    covered_ns: int = 0
    gaps: int = 0


@dataclass
class Accumulator:
    """A sampler sink that keeps totals in memory (no store, no root needed)."""

    devices: dict[str, DeviceTotal] = field(default_factory=dict)
    by_hour_uj: dict[int, int] = field(default_factory=dict)
    start_ns: int | None = None
    end_ns: int | None = None
    mono_ns: int = 0
    events: list = field(default_factory=list)

    def register_devices(self, devices: Iterable[Device], ts_ns: int) -> None:
        for d in devices:
            self.devices.setdefault(d.key, DeviceTotal(d))
        if self.start_ns is None:
            self.start_ns = ts_ns

    def write(self, interval: Interval) -> None:
        length = interval.mono_end_ns - interval.mono_start_ns
        self.mono_ns += length
        self.end_ns = interval.end_ns
        self.events.extend(interval.events)
        for row in interval.rows:
            total = self.devices[row.device_key]
            if row.status == OK and row.kind in (OK, WRAP):
                total.energy_uj += row.energy_uj
                total.covered_ns += length
                if total.device.component != "psys":
                    for hour, uj in split_by_hour(
                        interval.start_ns, interval.end_ns, row.energy_uj
                    ).items():
                        self.by_hour_uj[hour] = self.by_hour_uj.get(hour, 0) + uj
            else:
                total.gaps += 1


def _iso(ts_ns: int | None) -> str | None:
    if ts_ns is None:
        return None
    return (
        dt.datetime.fromtimestamp(ts_ns / NS_PER_S, dt.timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def overall_source(sources: Sequence[str]) -> str | None:
    kinds = set(sources)
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"


def result(
    acc: Accumulator,
    *,
    name: str | None,
    command: Sequence[str],
    exit_code: int | None,
    duration_s: float,
    carbon: dict,
    co2e_g: float | None,
    notes: Sequence[str] = (),
) -> dict:
    """The documented ``--json`` object (docs/user-guide.md: "llem wrap --json")."""
    window_ns = max(acc.mono_ns, 1)
    components = []
    for total in acc.devices.values():
        d = total.device
        component = {
            "component": d.component,
            "device": d.name,
            "energy_j": round(uj_to_j(total.energy_uj), 6),
            "source": d.source,
            "sensor": d.sensor,
            "method": d.method,
            "coverage": round(min(1.0, total.covered_ns / window_ns), 4),
        }
        if d.attrs.get("package_split"):  # an MI250X die, an MI300X partition: a share
            component["package_split"] = d.attrs["package_split"]
        components.append(component)
    counted = [c for c in components if c["component"] != "psys"]
    energy_j = round(sum(c["energy_j"] for c in counted), 6)
    return {
        "schema": SCHEMA,
        "name": name,
        "command": list(command),
        "exit_code": exit_code,
        "start": _iso(acc.start_ns),
        "end": _iso(acc.end_ns),
        "duration_s": round(duration_s, 6),
        "scope": "node",
        "energy_j": energy_j,
        "average_power_w": round(energy_j / duration_s, 3) if duration_s > 0 else None,
        "source": overall_source([c["source"] for c in counted]),
        "components": components,
        "co2e_g": co2e_g,
        "carbon": carbon,
        "events": [
            {"kind": e.kind, "device": e.device_key, "detail": e.detail} for e in acc.events
        ],
        "notes": list(notes),
    }


def carbon_for(config, acc: Accumulator, duration_s: float) -> tuple[dict, float | None, list[str]]:
    """The carbon object and CO2e of the window; (carbon, co2e_g, notes).

    A carbon problem (an unknown region, a bad intensity file) never loses the measurement:
    the energy is still reported, with ``co2e_g`` null and the reason.
    """
    from llem import carbon
    from llem.errors import LlemError

    unknown = {
        "region": config.carbon.region,
        "intensity_g_per_kwh": None,
        "source": None,
        "year": None,
        "basis": None,
        "pue": None,
    }
    if not acc.devices:
        return {**unknown, "reason": "no energy was measured"}, None, []
    energy_j = {hour: uj / 1e6 for hour, uj in acc.by_hour_uj.items()}
    n_gpus = sum(1 for t in acc.devices.values() if t.device.component == "gpu")
    hours = duration_s / 3600
    try:
        result = carbon.emissions(config, energy_j, gpu_hours=n_gpus * hours, node_hours=hours)
    except (LlemError, ValueError) as e:
        return {**unknown, "reason": f"carbon: {e}"}, None, [f"carbon: {e}"]
    return result.carbon, result.co2e_g, list(result.carbon.get("notes", []))


def accumulator_of_window(closed: dict) -> Accumulator:
    """The accumulator of a window the node sampler closed (its ``close`` answer)."""
    acc = Accumulator()
    span_ns = max(1, closed["end_ns"] - closed["start_ns"])
    acc.start_ns, acc.end_ns, acc.mono_ns = closed["start_ns"], closed["end_ns"], span_ns
    coverage = closed.get("coverage", 0.0)
    for key, meta in closed.get("devices", {}).items():
        dev = Device(
            key, meta["component"], meta["device"], meta["sensor"], meta["source"], meta["method"]
        )
        uj = int(closed.get("energy_uj", {}).get(key, 0))
        acc.devices[key] = DeviceTotal(dev, uj, int(coverage * span_ns))
        for hour, part in split_by_hour(closed["start_ns"], closed["end_ns"], uj).items():
            acc.by_hour_uj[hour] = acc.by_hour_uj.get(hour, 0) + part
    return acc


def per_unit_basis(res: dict, policy: str | None = None) -> str | None:
    """How a per-unit figure of ``res`` was obtained (see docs/ml.md, "Scope"):
    ``estimated``/``mixed`` when some energy is estimated; inside a job, ``measured`` only
    where the job held the node alone (``exclusive``), else ``attributed`` (a proportional
    share); outside Slurm ``measured`` (the whole node's counters)."""
    source = res.get("source")
    if source is None:
        return None
    if source in ("estimated", "mixed"):
        return source
    if res.get("scope") == "job" and policy != "exclusive":
        return "attributed"
    return "measured"


def add_work(res: dict, work: float | None, unit: str | None, policy: str | None = None) -> dict:
    """Add the work keys to a ``--json`` object (the same keys in ``llem.window``'s
    ``to_dict()``): ``work``, ``unit``, ``energy_per_unit_j`` (the result's scope: the node,
    or the job's share), ``gpu_energy_per_unit_j`` (GPUs only, ML.ENERGY's scope),
    ``co2e_per_unit_g`` and ``per_unit_basis``; and the overall ``coverage``."""
    counted = [c for c in res["components"] if c["component"] != "psys"]
    if "coverage" not in res:
        res["coverage"] = min((c["coverage"] for c in counted), default=None)
    res["work"] = work
    res["unit"] = unit
    if work:
        gpu_j = sum(c["energy_j"] for c in counted if c["component"] == "gpu")
        res["energy_per_unit_j"] = res["energy_j"] / work if counted else None
        res["gpu_energy_per_unit_j"] = (
            gpu_j / work if any(c["component"] == "gpu" for c in counted) else None
        )
        res["co2e_per_unit_g"] = None if res["co2e_g"] is None else res["co2e_g"] / work
        res["per_unit_basis"] = per_unit_basis(res, policy)
    else:
        res["energy_per_unit_j"] = res["gpu_energy_per_unit_j"] = None
        res["co2e_per_unit_g"] = res["per_unit_basis"] = None
    return res


class ChildRunner:
    """Runs the command and forwards the signals wrap receives to it."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.proc: subprocess.Popen | None = None
        self._old: dict[int, object] = {}

    def _forward(self, signum: int, frame: object) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if signum in (signal.SIGINT, signal.SIGQUIT) and _terminal_sent_it_to_child():
            return  # the terminal already delivered it to the whole foreground group
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    def start(self) -> None:
        for sig in FORWARDED_SIGNALS:
            self._old[sig] = signal.signal(sig, self._forward)
        try:
            self.proc = subprocess.Popen(self.argv)
        except BaseException:
            self.restore()
            raise

    def wait(self) -> int:
        assert self.proc is not None
        while True:
            try:
                return self.proc.wait()
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old.clear()


def _terminal_sent_it_to_child() -> bool:
    """True when wrap and the child are the terminal's foreground group (Ctrl-C, Ctrl-\\)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def exit_status(returncode: int) -> int:
    """The shell's convention: a command killed by signal N exits 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def run_sampler_thread(sampler) -> threading.Thread:
    thread = threading.Thread(target=sampler.run, name="llem-sampler", daemon=True)
    thread.start()
    return thread
