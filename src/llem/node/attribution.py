"""Attribution of a node's energy to the jobs running on it: a pure, documented function.

For each interval and each device of the node:

* **GPU**: to the job the GPU is allocated to (``gpu_allocation``); a GPU shared by several
  jobs (MPS, sharding) is split equally between them (``gpu_shared``); a GPU allocated to no
  running job goes to the remainder.
* **CPU package** (measured or estimated): in proportion to each job's CPU time in the
  interval, over the node's busy CPU time (``cpu_time``). The busy time of processes outside
  jobs, and the whole package energy of an interval in which nothing was busy, go to the
  remainder. Jobs' CPU time is not known per socket: every package is split alike.
* **DRAM**: in proportion to each job's memory in use over the node's memory in use
  (``memory_share``).
* Anything else (psys) goes to the remainder.

Integer arithmetic (floor for each job, the rest to the remainder) makes the invariant exact:
for every interval and device, the jobs' shares plus the remainder equal the node's energy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from llem.model import EnergyRow, JobShare
from llem.sensors.base import Device

GPU_ALLOCATION = "gpu_allocation"
GPU_SHARED = "gpu_shared"
CPU_TIME = "cpu_time"
MEMORY_SHARE = "memory_share"


@dataclass(frozen=True)
class JobLoad:
    """One job's use of the node over one interval."""

    run_id: int
    gpus: tuple[str, ...] = ()
    """Device keys of the GPUs allocated to the job on this node."""
    cpu_ns: int | None = None
    """CPU time the job's processes used in the interval (None: unknown, counts as 0)."""
    memory_bytes: int | None = None
    """Memory the job holds (None: unknown, counts as 0)."""


@dataclass(frozen=True)
class NodeLoad:
    busy_cpu_ns: int | None = None
    """CPU time all processes used in the interval (from /proc/stat)."""
    used_memory_bytes: int | None = None
    """Memory in use on the node (MemTotal - MemAvailable)."""


def _split(energy_uj: int, weights: Sequence[tuple[int, int]], total: int,
           device_key: str, method: str) -> tuple[list[JobShare], int]:
    shares = []
    given = 0
    for run_id, weight in weights:
        if weight <= 0:
            continue
        part = energy_uj * weight // total
        given += part
        shares.append(JobShare(run_id, device_key, part, method, weight / total))
    return shares, energy_uj - given


def attribute(
    rows: Sequence[EnergyRow],
    devices: Mapping[str, Device],
    jobs: Sequence[JobLoad],
    node: NodeLoad,
) -> tuple[list[JobShare], list[tuple[str, int]]]:
    """Split each row's energy between jobs; return (job shares, remainder per device).

    Rows without energy produce nothing. The result satisfies, for every row,
    ``sum(shares of the device) + remainder of the device == row.energy_uj``.
    """
    shares: list[JobShare] = []
    remainder: list[tuple[str, int]] = []
    for row in rows:
        if row.energy_uj <= 0:
            continue
        device = devices[row.device_key]
        rest = row.energy_uj
        if device.component == "gpu":
            holders = [j.run_id for j in jobs if row.device_key in j.gpus]
            if holders:
                method = GPU_ALLOCATION if len(holders) == 1 else GPU_SHARED
                got, rest = _split(row.energy_uj, [(r, 1) for r in holders], len(holders),
                                   row.device_key, method)
                shares += got
        elif device.component in ("cpu", "dram"):
            if device.component == "cpu":
                weights = [(j.run_id, max(0, j.cpu_ns or 0)) for j in jobs]
                node_total = node.busy_cpu_ns or 0
                method = CPU_TIME
            else:
                weights = [(j.run_id, max(0, j.memory_bytes or 0)) for j in jobs]
                node_total = node.used_memory_bytes or 0
                method = MEMORY_SHARE
            # Cgroup and /proc/stat accounting can disagree slightly: never give jobs more
            # than all of it.
            total = max(node_total, sum(w for _, w in weights))
            if total > 0:
                got, rest = _split(row.energy_uj, weights, total, row.device_key, method)
                shares += got
        if rest:
            remainder.append((row.device_key, rest))
    return shares, remainder


class JobAttributor:
    """Reads the jobs' use of the node each interval and applies :func:`attribute`."""

    def __init__(self, store, node: str, devices, started_ns: int,
                 proc_root: str | os.PathLike = "/proc", cgroup_root: str | None = None,
                 gres_conf: str | os.PathLike | None = None) -> None:
        from llem.node.slurm import GpuMap
        from llem.node.usage import CgroupLocator, ProcScanner

        self.store = store
        self.node = node
        self.devices = {d.key: d for d in devices}
        self.gpu_map = GpuMap(devices, node, gres_conf)
        self.started_ns = started_ns
        self.proc = Path(proc_root)
        self.locator = CgroupLocator(Path(cgroup_root)) if cgroup_root else CgroupLocator()
        self.scanner = ProcScanner(proc_root)
        self._cpu_prev: dict[int, int] = {}
        self._busy_prev: int | None = None
        self.cgroups: dict[int, str] = {}

    def _job_gpus(self, job) -> tuple[str, ...]:
        """The job's GPUs as device keys: Slurm's indices are resolved once, at the job's
        first interval, and stored (with any flag the resolution brings) in its record."""
        keys, flags = self.gpu_map.resolve(job.gpus)
        if keys != job.gpus or not set(flags) <= set(job.flags):
            self.store.update_job(job.run_id, gpus=keys,
                                  flags=sorted(set(job.flags) | set(flags)))
        return keys

    def _node_busy_ns(self) -> int | None:
        try:
            fields = (self.proc / "stat").read_text().split("\n", 1)[0].split()
            ticks = sum(int(fields[i]) for i in (1, 2, 3, 6, 7))  # user nice system irq softirq
        except (OSError, ValueError, IndexError):
            return None
        from llem.node.usage import CLK_TCK

        return ticks * 1_000_000_000 // CLK_TCK

    def _node_used_memory(self) -> int | None:
        try:
            info = {}
            for line in (self.proc / "meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
            return info["MemTotal"] - info["MemAvailable"]
        except (OSError, ValueError, KeyError, IndexError):
            return None

    def __call__(self, interval):
        from llem.node.attribution import JobLoad, NodeLoad, attribute

        jobs = self.store.runs_active_since(interval.start_ns)
        busy = self._node_busy_ns()
        busy_delta = None if busy is None or self._busy_prev is None else busy - self._busy_prev
        self._busy_prev = busy
        loads = []
        proc_usage = None
        for job in jobs:
            usage = self.locator.usage(job.job_id, job.uid, self.node)
            if usage is None:
                if proc_usage is None:
                    proc_usage = self.scanner.usage_by_job({j.job_id for j in jobs})
                usage = proc_usage.get(job.job_id)
            else:
                self.cgroups[job.run_id] = usage.source
            cpu_delta = None
            if usage is not None and usage.cpu_ns is not None:
                prev = self._cpu_prev.get(job.run_id)
                if prev is None:
                    # A cgroup born after this sampler started counts from zero; otherwise
                    # (the sampler restarted mid-job) the first reading is only a baseline.
                    prev = 0 if job.start_ns >= self.started_ns else usage.cpu_ns
                cpu_delta = max(0, usage.cpu_ns - prev)
                self._cpu_prev[job.run_id] = usage.cpu_ns
            gpus = tuple(g for g in self._job_gpus(job) if g in self.devices)
            loads.append(JobLoad(job.run_id, gpus, cpu_delta,
                                 usage.memory_bytes if usage else None))
        live = {j.run_id for j in jobs}
        self._cpu_prev = {k: v for k, v in self._cpu_prev.items() if k in live}
        shares, rest = attribute(interval.rows, self.devices, loads,
                                 NodeLoad(busy_delta, self._node_used_memory()))
        return replace(interval, shares=tuple(shares), remainder=tuple(rest))
