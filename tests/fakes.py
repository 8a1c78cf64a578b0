"""Fakes at our own seams: a sensor with scripted counters and a controllable clock."""

from __future__ import annotations

from dataclasses import dataclass, field

from llem.sensors.base import COUNTER, MEASURED, Device, Reading


class FakeClock:
    def __init__(self, mono_ns: int = 10**12, wall_ns: int = 1_700_000_000 * 10**9) -> None:
        self.mono = mono_ns
        self.wall = wall_ns

    def monotonic_ns(self) -> int:
        return self.mono

    def time_ns(self) -> int:
        return self.wall

    def advance(self, seconds: float, wall_extra_s: float = 0.0) -> None:
        self.mono += int(seconds * 1e9)
        self.wall += int((seconds + wall_extra_s) * 1e9)


@dataclass
class FakeSensor:
    """Devices whose raw counters the test sets; a status per device can be forced."""

    counters: dict[str, int]
    max_range_uj: int | None = None
    max_power_w: float | None = None
    component: str = "cpu"
    name: str = "fake"
    status: dict[str, str] = field(default_factory=dict)
    reads: int = 0

    def devices(self):
        return [
            Device(
                key=f"fake:{k}",
                component=self.component,
                name=k,
                sensor="fake",
                source=MEASURED,
                method=COUNTER,
                max_range_uj=self.max_range_uj,
                max_power_w=self.max_power_w,
            )
            for k in self.counters
        ]

    def read(self, mono_ns: int):
        self.reads += 1
        out = []
        for k, v in self.counters.items():
            st = self.status.get(k, "ok")
            if st == "ok":
                out.append(Reading(f"fake:{k}", v, mono_ns))
            else:
                out.append(Reading(f"fake:{k}", None, mono_ns, st, f"{k} is {st}"))
        return out

    def close(self):
        pass


class BrokenSensor(FakeSensor):
    def read(self, mono_ns: int):
        raise RuntimeError("driver exploded")
