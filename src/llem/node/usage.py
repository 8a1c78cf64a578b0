"""What each job uses of the node: CPU time and memory, from its cgroup or from /proc.

CPU time and memory per job come from the job's cgroup, which exists only once the job's
first step (extern or batch) starts, i.e. after the Prolog: it is looked up again every
interval until found. Layouts:

* cgroup v1: ``/sys/fs/cgroup/cpuacct/slurm[_<node>]/uid_<uid>/job_<id>/cpuacct.usage`` (ns)
  and ``/sys/fs/cgroup/memory/.../job_<id>/memory.usage_in_bytes``;
* cgroup v2: ``/sys/fs/cgroup/system.slice/slurmstepd.scope/job_<id>/cpu.stat``
  (``usage_usec``) and ``memory.current``;
* no cgroup (``proctrack/linuxproc``): the job's processes are found through ``/proc``
  (``SLURM_JOB_ID`` in their environment, read by root) and their CPU time summed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class JobUsage:
    """What the attribution needs of one job at one instant."""

    cpu_ns: int | None  # cumulative CPU time of the job's processes
    memory_bytes: int | None
    source: str  # "cgroup-v1", "cgroup-v2", "proc", or "none"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_stat_usec(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


@dataclass
class CgroupLocator:
    """Finds a job's cgroup folder(s) under a cgroup root (v1 or v2)."""

    root: Path = field(default_factory=lambda: Path(CGROUP_ROOT))

    def v1(self, job_id: str, uid: int | None, node: str) -> tuple[Path, Path] | None:
        for slurm_dir in (f"slurm_{node}", "slurm"):
            base_cpu = self.root / "cpuacct" / slurm_dir
            if not base_cpu.is_dir():
                base_cpu = self.root / "cpu,cpuacct" / slurm_dir
                if not base_cpu.is_dir():
                    continue
            uid_dirs = [f"uid_{uid}"] if uid is not None else [
                p.name for p in base_cpu.glob("uid_*")]
            for uid_dir in uid_dirs:
                cpu = base_cpu / uid_dir / f"job_{job_id}"
                if cpu.is_dir():
                    mem = self.root / "memory" / slurm_dir / uid_dir / f"job_{job_id}"
                    return cpu, mem
        return None

    def v2(self, job_id: str) -> Path | None:
        for base in (self.root / "system.slice" / "slurmstepd.scope",
                     self.root / "slurm"):
            path = base / f"job_{job_id}"
            if (path / "cpu.stat").exists():
                return path
        return None

    def usage(self, job_id: str, uid: int | None, node: str) -> JobUsage | None:
        """The job's cumulative CPU time and current memory, or None if no cgroup (yet)."""
        v2 = self.v2(job_id)
        if v2 is not None:
            usec = _cpu_stat_usec(v2 / "cpu.stat")
            return JobUsage(None if usec is None else usec * 1000,
                            _read_int(v2 / "memory.current"), "cgroup-v2")
        v1 = self.v1(job_id, uid, node)
        if v1 is not None:
            cpu, mem = v1
            return JobUsage(_read_int(cpu / "cpuacct.usage"),
                            _read_int(mem / "memory.usage_in_bytes"), "cgroup-v1")
        return None


UNLIMITED_BYTES = 2**62
"""A v1 memory limit at or above this is "no limit" (the kernel shows ~2^63 rounded)."""


def parse_cpu_list(text: str) -> int | None:
    """Number of CPUs in a cpuset list (``0-3,8,10-11`` -> 7); None when unreadable."""
    count = 0
    try:
        for part in text.strip().split(","):
            if not part:
                continue
            first, _, last = part.partition("-")
            count += int(last or first) - int(first) + 1
    except ValueError:
        return None
    return count or None


def _read_cpus(*paths: Path) -> int | None:
    for path in paths:
        try:
            return parse_cpu_list(path.read_text())
        except OSError:
            continue
    return None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= UNLIMITED_BYTES:
        return None  # "max" (v2) or the v1 sentinel: the job has no memory limit
    return int(text)


def cgroup_allocation(locator: CgroupLocator, job_id: str, uid: int | None,
                      node: str) -> tuple[int | None, int | None]:
    """The job's CPUs (its cpuset) and memory limit from its cgroup; None where unknown.

    v1: ``cpuset/slurm[_<node>]/uid_<uid>/job_<id>/cpuset.effective_cpus`` (or
    ``cpuset.cpus``) and ``memory/.../memory.limit_in_bytes``; v2: the job folder's
    ``cpuset.cpus.effective`` and ``memory.max``. Without ``ConstrainCores`` a cpuset may hold
    every CPU of the node: callers prefer Slurm's own figure (``SLURM_JOB_CPUS_PER_NODE``).
    """
    v2 = locator.v2(job_id)
    if v2 is not None:
        return (_read_cpus(v2 / "cpuset.cpus.effective", v2 / "cpuset.cpus"),
                _read_limit(v2 / "memory.max"))
    v1 = locator.v1(job_id, uid, node)
    if v1 is None:
        return None, None
    cpu, mem = v1
    relative = cpu.relative_to(cpu.parents[2])  # slurm_dir/uid_dir/job_dir
    cpuset = locator.root / "cpuset" / relative
    return (_read_cpus(cpuset / "cpuset.effective_cpus", cpuset / "cpuset.cpus"),
            _read_limit(mem / "memory.limit_in_bytes"))


class ProcScanner:
    """The ``proctrack/linuxproc`` fallback: a job's processes found through /proc.

    The job of a process is read once from its environment (``SLURM_JOB_ID``) and cached by
    (pid, start time), so a tick costs one ``stat`` read per process.
    """

    def __init__(self, proc_root: str | os.PathLike = "/proc") -> None:
        self.proc = Path(proc_root)
        self._job_of: dict[tuple[int, int], str | None] = {}

    def usage_by_job(self, job_ids: set[str]) -> dict[str, JobUsage]:
        cpu: dict[str, int] = {j: 0 for j in job_ids}
        mem: dict[str, int] = {j: 0 for j in job_ids}
        seen: set[tuple[int, int]] = set()
        try:
            pids = [int(p) for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            return {}
        for pid in pids:
            stat = self._stat(pid)
            if stat is None:
                continue
            key = (pid, stat[2])
            seen.add(key)
            if key not in self._job_of:
                self._job_of[key] = self._job_env(pid)
            job = self._job_of[key]
            if job in cpu:
                cpu[job] += (stat[0] * 1_000_000_000) // CLK_TCK
                mem[job] += stat[1]
        self._job_of = {k: v for k, v in self._job_of.items() if k in seen}
        return {j: JobUsage(cpu[j], mem[j], "proc") for j in job_ids}

    def _stat(self, pid: int) -> tuple[int, int, int] | None:
        """(utime+stime ticks, rss bytes, start time) of a process."""
        try:
            text = (self.proc / str(pid) / "stat").read_text()
        except OSError:
            return None
        fields = text[text.rfind(")") + 2:].split()
        try:
            ticks = int(fields[11]) + int(fields[12])
            rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            start = int(fields[19])
        except (IndexError, ValueError):
            return None
        return ticks, rss, start

    def _job_env(self, pid: int) -> str | None:
        try:
            data = (self.proc / str(pid) / "environ").read_bytes()
        except OSError:
            return None
        for item in data.split(b"\0"):
            if item.startswith(b"SLURM_JOB_ID="):
                return item[13:].decode("ascii", "replace")
        return None


def pid_in_job_cgroup(pid: int, job_id: str, proc_root: str | os.PathLike = "/proc") -> bool | None:
    """Whether a process lives in the job's cgroup; None when the node uses no job cgroups."""
    try:
        text = (Path(proc_root) / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    if "/job_" not in text:
        return None
    return f"/job_{job_id}/" in text or text.rstrip().endswith(f"/job_{job_id}")
