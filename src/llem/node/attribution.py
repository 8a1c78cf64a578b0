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
* **Platform** (a node meter minus the parts: fans, NICs, disks, power-supply losses; see
  llem.sensors.platform): static power, charged by allocation: each job's allocated CPUs over
  the node's CPUs (``platform_allocation``), so a job alone on an exclusive node carries all
  of it and the unallocated part of a shared node stays in the remainder. Where a job's
  allocation is unknown, by CPU time like a package (``platform_cpu_time``).
* Anything else (psys: a whole-node meter, never added) goes to the remainder.

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
from llem.sensors.platform import PlatformResidual

GPU_ALLOCATION = "gpu_allocation"
GPU_SHARED = "gpu_shared"
CPU_TIME = "cpu_time"
MEMORY_SHARE = "memory_share"
PLATFORM_ALLOCATION = "platform_allocation"
PLATFORM_CPU_TIME = "platform_cpu_time"
PROC_TREE_FLAG = "proc_tree"
"""Job flag: its CPU time and memory came from the process tree under its slurmstepd (no job
cgroup), a weaker fact than a cgroup's (docs/methodology.md)."""


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
    alloc_cpus: int | None = None
    """CPUs Slurm allocated to the job on this node (None: unknown)."""


@dataclass(frozen=True)
class NodeLoad:
    busy_cpu_ns: int | None = None
    """CPU time all processes used in the interval (from /proc/stat)."""
    used_memory_bytes: int | None = None
    """Memory in use on the node (MemTotal - MemAvailable)."""
    cpus: int | None = None
    """CPUs of the node, for allocation shares (None: unknown)."""


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
        elif device.component == "platform":
            got, rest = _platform(row.energy_uj, row.device_key, jobs, node)
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


def _platform(energy_uj: int, key: str, jobs: Sequence[JobLoad],
              node: NodeLoad) -> tuple[list[JobShare], int]:
    """The platform's static power by allocated CPUs; by CPU time where that is unknown."""
    if jobs and node.cpus and all(j.alloc_cpus is not None for j in jobs):
        weights = [(j.run_id, max(0, j.alloc_cpus or 0)) for j in jobs]
        total = max(node.cpus, sum(w for _, w in weights))
        return _split(energy_uj, weights, total, key, PLATFORM_ALLOCATION)
    weights = [(j.run_id, max(0, j.cpu_ns or 0)) for j in jobs]
    total = max(node.busy_cpu_ns or 0, sum(w for _, w in weights))
    if total <= 0:
        return [], energy_uj
    return _split(energy_uj, weights, total, key, PLATFORM_CPU_TIME)


class JobAttributor:
    """Reads the jobs' use of the node each interval and applies :func:`attribute`."""

    def __init__(self, store, node: str, devices, started_ns: int,
                 proc_root: str | os.PathLike = "/proc", cgroup_root: str | None = None) -> None:
        from llem.node.usage import CgroupLocator, ProcScanner

        self.store = store
        self.node = node
        self.devices = {d.key: d for d in devices}
        # The sampler adds the platform device when a node meter is read (the sensors'
        # devices do not include it): know it here too, whoever built the device list.
        platform = PlatformResidual.for_devices(list(self.devices.values()))
        if platform is not None:
            self.devices.setdefault(platform.device.key, platform.device)
        self.gpu_by_minor = {str(d.attrs.get("minor")): d.key for d in devices
                             if d.component == "gpu" and d.attrs.get("minor") is not None}
        self.started_ns = started_ns
        self.proc = Path(proc_root)
        self.locator = CgroupLocator(Path(cgroup_root)) if cgroup_root else CgroupLocator()
        self.scanner = ProcScanner(proc_root)
        self._cpu_prev: dict[int, int] = {}
        self._busy_prev: int | None = None
        self.cgroups: dict[int, str] = {}
        self.node_cpus = os.cpu_count()

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

    def _flag_guess(self, job) -> None:
        """Mark a run credited through the process tree, not through its cgroup: the flag
        ``proc_tree`` (docs/methodology.md). Only a tree that held processes counts: on a
        cgroup node, the moments before the job's cgroup exists credit nothing, flag nothing.
        Set again each interval while missing, so that a concurrent update of the run's flags
        cannot lose it."""
        if PROC_TREE_FLAG not in job.flags:
            self.store.update_job(job.run_id, flags=sorted({*job.flags, PROC_TREE_FLAG}))

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
                    proc_usage = self.scanner.usage_by_job({j.job_id: j.uid for j in jobs})
                usage = proc_usage.get(job.job_id)
                if usage is not None and (usage.cpu_ns or usage.memory_bytes):
                    self._flag_guess(job)
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
            gpus = tuple(self.gpu_by_minor[m] for m in job.gpus if m in self.gpu_by_minor)
            loads.append(JobLoad(job.run_id, gpus, cpu_delta,
                                 usage.memory_bytes if usage else None, job.cpus))
        live = {j.run_id for j in jobs}
        self._cpu_prev = {k: v for k, v in self._cpu_prev.items() if k in live}
        shares, rest = attribute(interval.rows, self.devices, loads,
                                 NodeLoad(busy_delta, self._node_used_memory(),
                                          self.node_cpus))
        return replace(interval, shares=tuple(shares), remainder=tuple(rest))
