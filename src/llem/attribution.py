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

from dataclasses import dataclass
from typing import Mapping, Sequence

from llem.sensors.base import Device
from llem.store.node import EnergyRow, JobShare

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
