"""Attribution of a node's energy to the jobs running on it: a pure, documented function.

For each interval and each device of the node (``docs/methodology.md`` has the rule with a
worked example):

* **Exclusive jobs** (a job that holds all of the node's CPUs, or was started with
  ``--exclusive``): the whole energy of every device of the node goes to it (``exclusive``);
  several such runs in one interval (one ending, the next starting) share it equally.
* **GPU**: to the job the GPU is allocated to (``gpu_allocation``); a GPU shared by several
  jobs (MPS, sharding) is split equally between them (``gpu_shared``); a GPU allocated to no
  running job goes to the remainder.
* **CPU package and DRAM**, by the policy (``attribution.policy``):

  - ``use``: in proportion to each job's CPU time over the node's busy CPU time
    (``cpu_time``), DRAM by memory in use over the node's memory in use (``memory_share``).
    Busy time outside jobs, and a whole interval in which nothing was busy, go to the
    remainder.
  - ``allocation``: in proportion to the job's allocated CPUs over the node's CPUs
    (``cpu_allocation``), DRAM by allocated memory over the node's memory
    (``memory_allocation``); the unallocated share goes to the remainder, labelled
    ``unallocated``.
  - ``hybrid`` (the default): the device's *static* energy (its idle power x the interval, at
    most the interval's energy) is shared by allocation (``idle_allocation``), the *dynamic*
    rest by use as above. The unallocated static share goes to the remainder, labelled
    ``idle_unallocated``.

  Where a job's allocation (or the node's size) is unknown, ``allocation`` and ``hybrid`` fall
  back to ``use`` for that device and interval; the job is flagged by the caller.
* **Platform** (a node meter minus the parts: fans, NICs, disks, power-supply losses; see
  llem.sensors.platform): static power, charged by allocation: each job's allocated CPUs over
  the node's CPUs (``platform_allocation``), so the unallocated part of a shared node stays in
  the remainder (``idle_unallocated``). Where a job's allocation is unknown, by CPU time like a package
  (``platform_cpu_time``).
* **Exclusive** jobs (holding all of the node's CPUs) take every device's energy (``exclusive``).
* psys (a whole-node meter or RAPL's platform domain) is shown, never added: it always goes
  to the remainder, under an exclusive job too, since the parts and the platform residual
  already hold it.

Everything else that no job takes (an unallocated GPU, busy time outside jobs, psys, the
rounding of the splits by use) is remainder labelled ``unattributed``.

Integer arithmetic (floor for each job, the rest to the remainder) makes the invariant exact:
for every interval and device, the jobs' shares plus the remainder (all labels) equal the
node's energy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from llem.model import (
    IDLE_UNALLOCATED,
    UNALLOCATED,
    UNATTRIBUTED,
    EnergyRow,
    JobShare,
    Remainder,
    StepUse,
)
from llem.sensors.base import Device
from llem.sensors.platform import PlatformResidual
from llem.slices import MAX_STEPS

GPU_ALLOCATION = "gpu_allocation"
GPU_SHARED = "gpu_shared"
CPU_TIME = "cpu_time"
MEMORY_SHARE = "memory_share"
PLATFORM_ALLOCATION = "platform_allocation"
PLATFORM_CPU_TIME = "platform_cpu_time"
CPU_ALLOCATION = "cpu_allocation"
MEMORY_ALLOCATION = "memory_allocation"
IDLE_ALLOCATION = "idle_allocation"
EXCLUSIVE = "exclusive"

USE, ALLOCATION, HYBRID = "use", "allocation", "hybrid"
POLICIES = (HYBRID, USE, ALLOCATION)
"""The configurable policies (``attribution.policy``); ``exclusive`` applies by itself."""

MAX_STEPS_PER_JOB = MAX_STEPS - 1
"""Steps of one job run recorded each on their own; the steps seen after them are recorded
together as step ``other`` and the run is flagged :data:`STEPS_CAPPED_FLAG`."""
OTHER_STEP = "other"
STEPS_CAPPED_FLAG = "steps_capped"

PROC_TREE_FLAG = "proc_tree"
"""Job flag: its CPU time and memory came from the process tree under its slurmstepd (no job
cgroup), a weaker fact than a cgroup's (docs/methodology.md)."""


@dataclass(frozen=True)
class JobLoad:
    """One job's use and allocation of the node over one interval."""

    run_id: int
    gpus: tuple[str, ...] = ()
    """Device keys of the GPUs allocated to the job on this node."""
    cpu_ns: int | None = None
    """CPU time the job's processes used in the interval (None: unknown, counts as 0)."""
    memory_bytes: int | None = None
    """Memory the job holds (None: unknown, counts as 0)."""
    alloc_cpus: int | None = None
    """CPUs allocated to the job on this node (its cpuset; None: unknown)."""
    alloc_memory_bytes: int | None = None
    """Memory allocated to the job on this node (its cgroup limit; None: unknown)."""
    exclusive: bool = False
    """The job holds the whole node."""


@dataclass(frozen=True)
class NodeLoad:
    busy_cpu_ns: int | None = None
    """CPU time all processes used in the interval (from /proc/stat)."""
    used_memory_bytes: int | None = None
    """Memory in use on the node (MemTotal - MemAvailable)."""
    cpus: int | None = None
    """CPUs of the node (None: unknown)."""
    memory_bytes: int | None = None
    """Memory of the node, MemTotal (None: unknown)."""


def _split(
    energy_uj: int, weights: Sequence[tuple[int, int]], total: int, device_key: str, method: str
) -> tuple[list[JobShare], int]:
    shares = []
    given = 0
    for run_id, weight in weights:
        if weight <= 0:
            continue
        part = energy_uj * weight // total
        given += part
        shares.append(JobShare(run_id, device_key, part, method, min(1.0, weight / total)))
    return shares, energy_uj - given


def static_uj(idle_mw: int | None, interval_ns: int, energy_uj: int) -> int:
    """The static part of an interval's energy: idle power x time, at most the energy."""
    if not idle_mw or idle_mw <= 0 or interval_ns <= 0:
        return 0
    return min(energy_uj, idle_mw * interval_ns // 1_000_000)


def _use_weights(component: str, jobs: Sequence[JobLoad], node: NodeLoad):
    if component == "cpu":
        weights = [(j.run_id, max(0, j.cpu_ns or 0)) for j in jobs]
        node_total, method = node.busy_cpu_ns or 0, CPU_TIME
    else:
        weights = [(j.run_id, max(0, j.memory_bytes or 0)) for j in jobs]
        node_total, method = node.used_memory_bytes or 0, MEMORY_SHARE
    # Cgroup and /proc/stat accounting can disagree slightly: never give jobs more than all.
    return weights, max(node_total, sum(w for _, w in weights)), method


def _allocation_weights(component: str, jobs: Sequence[JobLoad], node: NodeLoad):
    """(weights, total) by allocation, or None when an allocation or the node is unknown."""
    if component == "cpu":
        weights = [(j.run_id, j.alloc_cpus) for j in jobs]
        node_total = node.cpus
    else:
        weights = [(j.run_id, j.alloc_memory_bytes) for j in jobs]
        node_total = node.memory_bytes
    if not node_total or any(w is None or w < 0 for _, w in weights):
        return None
    return weights, max(node_total, sum(w for _, w in weights))


def _by_use(energy_uj: int, key: str, component: str, jobs, node) -> tuple[list, int]:
    weights, total, method = _use_weights(component, jobs, node)
    if total <= 0:
        return [], energy_uj
    return _split(energy_uj, weights, total, key, method)


def _cpu_dram(
    row: EnergyRow,
    component: str,
    jobs: Sequence[JobLoad],
    node: NodeLoad,
    policy: str,
    idle_mw: int | None,
    interval_ns: int,
) -> tuple[list, list[tuple[str, int]]]:
    """Shares of one CPU package or DRAM row under ``policy``, and what is left by label."""
    energy = row.energy_uj
    alloc = None if policy == USE else _allocation_weights(component, jobs, node)
    if alloc is None:
        got, rest = _by_use(energy, row.device_key, component, jobs, node)
        return got, [(UNATTRIBUTED, rest)]
    weights, total = alloc
    if policy == ALLOCATION:
        method = CPU_ALLOCATION if component == "cpu" else MEMORY_ALLOCATION
        got, rest = _split(energy, weights, total, row.device_key, method)
        return got, [(UNALLOCATED, rest)]
    static = static_uj(idle_mw, interval_ns, energy)
    got_static, rest_static = [], 0
    if static:  # no idle power known: no static rows at all (the store writes every share)
        got_static, rest_static = _split(static, weights, total, row.device_key, IDLE_ALLOCATION)
    got_dynamic, rest_dynamic = _by_use(energy - static, row.device_key, component, jobs, node)
    return got_static + got_dynamic, [(IDLE_UNALLOCATED, rest_static), (UNATTRIBUTED, rest_dynamic)]


def attribute(
    rows: Sequence[EnergyRow],
    devices: Mapping[str, Device],
    jobs: Sequence[JobLoad],
    node: NodeLoad,
    *,
    policy: str = USE,
    idle_mw: Mapping[str, int] | None = None,
    interval_ns: int = 0,
) -> tuple[list[JobShare], list[Remainder]]:
    """Split each row's energy between jobs; return (job shares, remainder per device and
    label).

    Args:
        rows: the interval's energy per device.
        devices: the node's devices by key.
        jobs: the jobs that ran in the interval, with their use and allocation.
        node: the node's use and size.
        policy: ``hybrid``, ``use`` or ``allocation`` (exclusive jobs take all regardless).
        idle_mw: idle power per device key, milliwatts (``hybrid`` only).
        interval_ns: the interval's length (``hybrid`` only).

    Rows without energy produce nothing. The result satisfies, for every row,
    ``sum(shares of the device) + sum(remainders of the device) == row.energy_uj``; a
    remainder entry is never zero.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown attribution policy {policy!r}")
    idle_mw = idle_mw or {}
    owners = [j.run_id for j in jobs if j.exclusive]
    shares: list[JobShare] = []
    remainder: list[Remainder] = []
    for row in rows:
        if row.energy_uj <= 0:
            continue
        component = devices[row.device_key].component
        rest = row.energy_uj
        got: list[JobShare] = []
        rests: list[tuple[str, int]] | None = None
        if component == "psys":
            pass  # shown, never added (the parts and the platform residual hold it)
        elif owners:
            got, rest = _split(
                rest, [(r, 1) for r in owners], len(owners), row.device_key, EXCLUSIVE
            )
        elif component == "gpu":
            holders = [j.run_id for j in jobs if row.device_key in j.gpus]
            if holders:
                method = GPU_ALLOCATION if len(holders) == 1 else GPU_SHARED
                got, rest = _split(
                    rest, [(r, 1) for r in holders], len(holders), row.device_key, method
                )
        elif component == "platform":
            got, rests = _platform(rest, row.device_key, jobs, node)
        elif component in ("cpu", "dram") and jobs:
            got, rests = _cpu_dram(
                row, component, jobs, node, policy, idle_mw.get(row.device_key), interval_ns
            )
        shares += got
        for label, uj in rests if rests is not None else [(UNATTRIBUTED, rest)]:
            if uj:
                remainder.append(Remainder(row.device_key, uj, label))
    return shares, remainder


def _platform(
    energy_uj: int, key: str, jobs: Sequence[JobLoad], node: NodeLoad
) -> tuple[list[JobShare], list[tuple[str, int]]]:
    """The platform's static power by allocated CPUs (the unallocated part is
    ``idle_unallocated``); by CPU time where that is unknown."""
    if not jobs:
        return [], [(UNATTRIBUTED, energy_uj)]
    if node.cpus and all(j.alloc_cpus is not None for j in jobs):
        weights = [(j.run_id, max(0, j.alloc_cpus or 0)) for j in jobs]
        total = max(node.cpus, sum(w for _, w in weights))
        got, rest = _split(energy_uj, weights, total, key, PLATFORM_ALLOCATION)
        return got, [(IDLE_UNALLOCATED, rest)]
    weights = [(j.run_id, max(0, j.cpu_ns or 0)) for j in jobs]
    total = max(node.busy_cpu_ns or 0, sum(w for _, w in weights))
    if total <= 0:
        return [], [(UNATTRIBUTED, energy_uj)]
    got, rest = _split(energy_uj, weights, total, key, PLATFORM_CPU_TIME)
    return got, [(UNATTRIBUTED, rest)]


@dataclass
class _Allocation:
    cpus: int | None
    memory_bytes: int | None
    exclusive: bool
    final: bool
    """Read from the job's cgroup (or no cgroup will come): not looked up again."""


def node_cpus(proc_root: str | os.PathLike = "/proc") -> int | None:
    """CPUs of the node: the ``cpuN`` lines of /proc/stat."""
    try:
        text = (Path(proc_root) / "stat").read_text()
    except OSError:
        return None
    count = sum(1 for line in text.splitlines() if line.startswith("cpu") and line[3:4].isdigit())
    return count or None


class JobAttributor:
    """Reads the jobs' use and allocation of the node each interval and applies
    :func:`attribute` with the configured policy; records the policy and idle powers in
    force with each job run (``jobs.attribution``) and teaches the idle learner.

    Args:
        store, node, devices, started_ns: the node store, node name, devices and the
            sampler's start.
        proc_root, cgroup_root: the /proc and cgroup trees read.
        policy: ``hybrid``, ``use`` or ``allocation``.
        idle: an :class:`llem.node.idle.IdleLearner` (None: one without config or store).
    """

    def __init__(
        self,
        store,
        node: str,
        devices,
        started_ns: int,
        proc_root: str | os.PathLike = "/proc",
        cgroup_root: str | None = None,
        policy: str = HYBRID,
        idle=None,
        gres_conf: str | os.PathLike | None = None,
        slurm_conf: str | os.PathLike | None = None,
    ) -> None:
        from llem.node.idle import IdleLearner
        from llem.node.slurm import GpuMap, slurm_node_cpus
        from llem.node.usage import CgroupLocator, ProcScanner

        if policy not in POLICIES:
            raise ValueError(f"unknown attribution policy {policy!r}")
        self.store = store
        self.node = node
        self.devices = {d.key: d for d in devices}
        # The sampler adds the platform device when a node meter is read (the sensors'
        # devices do not include it): know it here too, whoever built the device list.
        platform = PlatformResidual.for_devices(list(self.devices.values()))
        if platform is not None:
            self.devices.setdefault(platform.device.key, platform.device)
        self.gpu_map = GpuMap(devices, node, gres_conf)
        self.started_ns = started_ns
        self.proc = Path(proc_root)
        self.locator = CgroupLocator(Path(cgroup_root)) if cgroup_root else CgroupLocator()
        self.scanner = ProcScanner(proc_root)
        self.policy = policy
        self.idle = idle if idle is not None else IdleLearner(devices)
        # The node's CPUs in Slurm's units (the job's CPUs come from SLURM_JOB_CPUS_PER_NODE,
        # in the same units): slurm.conf's figure, read once per sampler life; else the
        # kernel's count of logical CPUs (docs/methodology.md, "Allocation").
        slurm_cpus = slurm_node_cpus(slurm_conf, node)
        self.node_cpus = slurm_cpus or node_cpus(proc_root)
        self.node_cpus_source = (
            "slurm.conf" if slurm_cpus else "/proc/stat" if self.node_cpus else None
        )
        self.node_memory_bytes = self._meminfo().get("MemTotal")
        self._cpu_prev: dict[int, int] = {}
        self._step_prev: dict[int, dict[str, int]] = {}
        self._step_names: dict[int, set[str]] = {}
        self._busy_prev: int | None = None
        self._alloc: dict[int, _Allocation] = {}
        self._recorded: dict[int, str] = {}
        self.cgroups: dict[int, str] = {}

    def _job_gpus(self, job) -> tuple[str, ...]:
        """The job's GPUs as device keys: Slurm's indices are resolved once, at the job's
        first interval, and stored (with any flag the resolution brings) in its record."""
        keys, flags = self.gpu_map.resolve(job.gpus)
        if keys != job.gpus or not set(flags) <= set(job.flags):
            self.store.update_job(job.run_id, gpus=keys, flags=sorted(set(job.flags) | set(flags)))
        return keys

    def _node_busy_ns(self) -> int | None:
        try:
            fields = (self.proc / "stat").read_text().split("\n", 1)[0].split()
            ticks = sum(int(fields[i]) for i in (1, 2, 3, 6, 7))  # user nice system irq softirq
        except (OSError, ValueError, IndexError):
            return None
        from llem.node.usage import CLK_TCK

        return ticks * 1_000_000_000 // CLK_TCK

    def _meminfo(self) -> dict[str, int]:
        try:
            info = {}
            for line in (self.proc / "meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    info[key] = int(rest.split()[0]) * 1024
            return info
        except (OSError, ValueError, IndexError):
            return {}

    def _node_used_memory(self) -> int | None:
        info = self._meminfo()
        if "MemTotal" not in info or "MemAvailable" not in info:
            return None
        return info["MemTotal"] - info["MemAvailable"]

    def _flag_guess(self, job) -> None:
        """Mark a run credited through the process tree, not through its cgroup: the flag
        ``proc_tree`` (docs/methodology.md). Only a tree that held processes counts: on a
        cgroup node, the moments before the job's cgroup exists credit nothing, flag nothing.
        Set again each interval while missing, so that a concurrent update of the run's flags
        cannot lose it."""
        if PROC_TREE_FLAG not in job.flags:
            self.store.update_job(job.run_id, flags=sorted({*job.flags, PROC_TREE_FLAG}))

    def _allocation(self, job, has_cgroup: bool) -> _Allocation:
        """The job's CPUs (Slurm's figure, else its cpuset) and memory limit (its cgroup)."""
        known = self._alloc.get(job.run_id)
        if known is not None and known.final:
            return known
        from llem.node.usage import cgroup_allocation

        cpus, memory = (None, None)
        if has_cgroup:
            cpus, memory = cgroup_allocation(self.locator, job.job_id, job.uid, self.node)
        cpus = job.cpus if job.cpus else cpus
        exclusive = bool(cpus and self.node_cpus and cpus >= self.node_cpus)
        alloc = _Allocation(cpus, memory, exclusive, final=has_cgroup)
        self._alloc[job.run_id] = alloc
        return alloc

    def _usage(self, jobs):
        """Each job's usage (cgroup, else /proc) and whether it came from a cgroup."""
        out = {}
        proc_usage = None
        for job in jobs:
            usage = self.locator.usage(job.job_id, job.uid, self.node)
            if usage is None:
                if proc_usage is None:
                    proc_usage = self.scanner.usage_by_job({j.job_id: j.uid for j in jobs})
                usage = proc_usage.get(job.job_id)
                if usage is not None and (usage.cpu_ns or usage.memory_bytes):
                    self._flag_guess(job)
                out[job.run_id] = (usage, False)
            else:
                self.cgroups[job.run_id] = usage.source
                out[job.run_id] = (usage, True)
        return out

    def _steps(self, job, job_cpu_ns: int | None, first_reading: bool) -> list[StepUse]:
        """The CPU time each of the job's steps used in the interval (their cgroups), the
        steps beyond :data:`MAX_STEPS_PER_JOB` summed as ``other``. A step first seen counts
        from zero, except at the sampler's first reading of a job it did not see start
        (restarted mid-job): then, as for the job, that reading is only a baseline."""
        cumulative = self.locator.step_cpu(job.job_id, job.uid, self.node)
        if not cumulative:
            self._step_prev.pop(job.run_id, None)
            return []
        prev = self._step_prev.get(job.run_id, {})
        baseline = first_reading and job.start_ns < self.started_ns
        names = self._step_names.setdefault(job.run_id, set())
        deltas: dict[str, int] = {}
        capped = False
        for step, ns in cumulative.items():
            before = prev.get(step, ns if baseline else 0)
            if step not in names and len(names) >= MAX_STEPS_PER_JOB:
                capped = True
                key = OTHER_STEP
            else:
                names.add(step)
                key = step
            deltas[key] = deltas.get(key, 0) + max(0, ns - before)
        self._step_prev[job.run_id] = dict(cumulative)
        if capped and STEPS_CAPPED_FLAG not in job.flags:
            self.store.update_job(job.run_id, flags=sorted({*job.flags, STEPS_CAPPED_FLAG}))
        total = max(job_cpu_ns or 0, sum(deltas.values()))
        return [StepUse(job.run_id, k, v, total) for k, v in sorted(deltas.items())]

    def _cpu_delta(self, job, usage) -> int | None:
        if usage is None or usage.cpu_ns is None:
            return None
        prev = self._cpu_prev.get(job.run_id)
        if prev is None:
            # A cgroup born after this sampler started counts from zero; otherwise (the
            # sampler restarted mid-job) the first reading is only a baseline.
            prev = 0 if job.start_ns >= self.started_ns else usage.cpu_ns
        self._cpu_prev[job.run_id] = usage.cpu_ns
        return max(0, usage.cpu_ns - prev)

    def __call__(self, interval):
        jobs = self.store.runs_active_since(interval.start_ns)
        busy = self._node_busy_ns()
        busy_delta = None if busy is None or self._busy_prev is None else busy - self._busy_prev
        self._busy_prev = busy
        interval_ns = max(0, interval.end_ns - interval.start_ns)
        self.idle.observe(interval.rows, interval_ns, interval.end_ns, bool(jobs))
        idle = self.idle.resolve()
        usages = self._usage(jobs)
        loads = []
        steps: list[StepUse] = []
        for job in jobs:
            usage, has_cgroup = usages[job.run_id]
            alloc = self._allocation(job, has_cgroup)
            gpus = tuple(g for g in self._job_gpus(job) if g in self.devices)
            first_reading = job.run_id not in self._cpu_prev
            cpu_delta = self._cpu_delta(job, usage)
            if has_cgroup:
                steps += self._steps(job, cpu_delta, first_reading)
            loads.append(
                JobLoad(
                    job.run_id,
                    gpus,
                    cpu_delta,
                    usage.memory_bytes if usage else None,
                    alloc.cpus,
                    alloc.memory_bytes,
                    alloc.exclusive,
                )
            )
        live = {j.run_id for j in jobs}
        self._cpu_prev = {k: v for k, v in self._cpu_prev.items() if k in live}
        self._alloc = {k: v for k, v in self._alloc.items() if k in live}
        self._step_prev = {k: v for k, v in self._step_prev.items() if k in live}
        self._step_names = {k: v for k, v in self._step_names.items() if k in live}
        shares, rest = attribute(
            interval.rows,
            self.devices,
            loads,
            NodeLoad(busy_delta, self._node_used_memory(), self.node_cpus, self.node_memory_bytes),
            policy=self.policy,
            idle_mw={k: v.power_mw for k, v in idle.items()},
            interval_ns=interval_ns,
        )
        self._record(jobs, loads, idle)
        return replace(interval, shares=tuple(shares), remainder=tuple(rest), steps=tuple(steps))

    def _record(self, jobs, loads, idle) -> None:
        """Keep the policy and idle powers in force with each run, when they change."""
        for job, load in zip(jobs, loads):
            text = attribution_record(
                self.policy,
                load,
                idle,
                self.node_cpus,
                self.node_memory_bytes,
                node_cpus_source=self.node_cpus_source,
            )
            if self._recorded.get(job.run_id, job.attribution) != text:
                self.store.update_job(job.run_id, attribution=text)
            self._recorded[job.run_id] = text
        live = {j.run_id for j in jobs}
        self._recorded = {k: v for k, v in self._recorded.items() if k in live}


def attribution_record(
    policy: str,
    load: JobLoad,
    idle,
    node_cpus: int | None,
    node_memory_bytes: int | None,
    node_cpus_source: str | None = None,
) -> str:
    """The JSON kept with a job run: the policy applied, its allocation and idle powers.

    ``policy`` is ``exclusive`` for a job holding the whole node; ``allocation_unknown`` is
    true when the job's CPUs could not be known and it was charged by use;
    ``node_cpus_source`` says where the node's CPUs came from (``slurm.conf`` or
    ``/proc/stat``).
    """
    import json

    # Flagged only where it changed the charge: hybrid with an idle power, or allocation.
    wanted = policy == ALLOCATION or (policy == HYBRID and any(v.power_mw for v in idle.values()))
    unknown = wanted and not load.exclusive and not (load.alloc_cpus and node_cpus)
    return json.dumps(
        {
            "policy": EXCLUSIVE if load.exclusive else policy,
            "cpus": load.alloc_cpus,
            "node_cpus": node_cpus,
            "node_cpus_source": node_cpus_source,
            "memory_bytes": load.alloc_memory_bytes,
            "node_memory_bytes": node_memory_bytes,
            "idle_w": {
                k: {"w": v.power_mw / 1000, "source": v.source, "samples": v.samples}
                for k, v in sorted(idle.items())
            },
            "allocation_unknown": unknown,
        },
        sort_keys=True,
    )
