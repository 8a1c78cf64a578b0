"""Shared by the metrics tests: a sampler rig writing the node textfile, a parser of the
exposition text, and the cluster metrics' config."""

from __future__ import annotations

from dataclasses import replace

from llem.config import CarbonConfig
from llem.model import JobRecord
from llem.node.attribution import JobLoad, NodeLoad, attribute
from llem.node.metrics import NodeMetrics
from llem.node.store import NodeStore
from llem.sampler import Sampler
from llem.sensors.base import COUNTER, MEASURED, Device
from tests.fakes import FakeClock, FakeSensor
from tests.helpers.nodes import T0, S, node_config


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """name and sorted label pairs -> value, from an exposition (HELP/TYPE lines skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        pairs = (
            tuple(sorted(tuple(p.split("=", 1)) for p in labels.rstrip("}").split('",') if p))
            if labels
            else ()
        )
        pairs = tuple((k, v.strip('"')) for k, v in pairs)
        out[(name, pairs)] = float(value)
    return out


class Rig:
    """A sampler over fake sensors into a real store, with attribution to chosen jobs."""

    def __init__(self, tmp_path, textfile_dir=None, dcgm_dir=None, gpus=True):
        self.clock = FakeClock()
        self.cpu = FakeSensor({"pkg0": 0}, component="cpu", max_range_uj=2**40)
        self.sensors = [self.cpu]
        self.gpu_devices = []
        if gpus:
            self.gpu = FakeSensor({"g0": 0, "g1": 0}, component="gpu")
            self.sensors.append(self.gpu)
        self.store = NodeStore(tmp_path / "node.db")
        self.loads: list[JobLoad] = []
        devices = [d for s in self.sensors for d in s.devices()]
        if gpus:  # minor and NVML index differ, as they may on real nodes
            devices = [
                d
                if d.component != "gpu"
                else Device(
                    d.key,
                    "gpu",
                    d.name,
                    "fake",
                    MEASURED,
                    COUNTER,
                    attrs={"minor": str(1 - i), "index": i},
                )
                for i, d in enumerate(devices[1:])
            ]
            devices = [self.cpu.devices()[0]] + devices
        self.devices = {d.key: d for d in devices}

        def attr(interval):
            from dataclasses import replace

            shares, rest = attribute(
                interval.rows,
                self.devices,
                self.loads,
                NodeLoad(busy_cpu_ns=10**9, used_memory_bytes=None),
            )
            return replace(interval, shares=tuple(shares), remainder=tuple(rest))

        self.sampler = Sampler(
            self.sensors, [self.store], clock=self.clock, interval_s=1.0, attribute=attr
        )
        self.metrics = NodeMetrics(
            self.store, "n1", devices, 1.0, textfile_dir, dcgm_dir, clock=lambda: 1_700_000_000.0
        )
        self.sampler.start()

    def job(self, job_id: str, gpus=(), account="acct") -> int:
        return self.store.add_job(
            JobRecord(
                job_id,
                "c",
                "n1",
                1,
                uid=1000,
                user="u",
                account=account,
                partition="p",
                gpus=tuple(gpus),
            )
        )

    def tick(self, cpu_uj=10_000_000, gpu_uj=20_000_000):
        self.clock.advance(1.0)
        self.cpu.counters["pkg0"] += cpu_uj
        if hasattr(self, "gpu"):
            for k in self.gpu.counters:
                self.gpu.counters[k] += gpu_uj
        interval = self.sampler.tick()
        self.metrics.on_interval(interval)
        assert self.metrics.flush(5.0)
        return interval


NOW = T0 + 10 * 3600 * S


def config(tmp_path):
    cfg = node_config(tmp_path, "admin")
    return replace(cfg, carbon=CarbonConfig(region="DE", intensity_g_per_kwh=400.0, pue=1.5))
