"""What each job uses of the node: CPU time and memory, from its cgroup or from /proc.

CPU time and memory per job come from the job's cgroup, which exists only once the job's
first step (extern or batch) starts, i.e. after the Prolog: it is looked up again every
interval until found. Layouts:

* cgroup v1: ``/sys/fs/cgroup/cpuacct/slurm[_<node>]/uid_<uid>/job_<id>/cpuacct.usage`` (ns)
  and ``/sys/fs/cgroup/memory/.../job_<id>/memory.usage_in_bytes``;
* cgroup v2: ``/sys/fs/cgroup/system.slice/slurmstepd.scope/job_<id>/cpu.stat``
  (``usage_usec``) and ``memory.current``;
* no cgroup (``proctrack/linuxproc``): the job's processes are found through ``/proc`` as
  the process tree under the job's root-owned ``slurmstepd`` (never from a process's own
  environment, which its user writes), run by the job's owner, and their CPU time summed;
  the job is then flagged ``proc_tree`` (docs/methodology.md).

Each job step has a cgroup of its own under the job's (``step_batch``, ``step_extern``,
``step_0``, ...; cgroup v1 and v2 alike): :meth:`CgroupLocator.step_cpu` reads their CPU time,
which splits the job's energy between its steps (docs/methodology.md, "Steps").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class JobUsage:
    """What the attribution needs of one job at one instant."""

    cpu_ns: int | None  # cumulative CPU time of the job's processes
    memory_bytes: int | None
    source: str  # "cgroup-v1", "cgroup-v2", "proc-tree", or "none"


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


STEP_NAME = re.compile(r"[A-Za-z0-9_+]{1,32}")
"""A step's name as Slurm names its cgroup folder ``step_<name>``: ``batch``, ``extern``,
``interactive``, ``0``, ``1``, ... (anything else under the job's folder is not a step; the
same rule as the slice's, llem.slices.STEP_NAME)."""
MAX_STEP_DIRS = 4096
"""The most entries of a job's cgroup folder read per interval (Slurm makes one per step;
srun can start many): beyond them, steps are not seen and their CPU time stays the job's."""


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
            uid_dirs = (
                [f"uid_{uid}"] if uid is not None else [p.name for p in base_cpu.glob("uid_*")]
            )
            for uid_dir in uid_dirs:
                cpu = base_cpu / uid_dir / f"job_{job_id}"
                if cpu.is_dir():
                    mem = self.root / "memory" / slurm_dir / uid_dir / f"job_{job_id}"
                    return cpu, mem
        return None

    def v2(self, job_id: str) -> Path | None:
        for base in (self.root / "system.slice" / "slurmstepd.scope", self.root / "slurm"):
            path = base / f"job_{job_id}"
            if (path / "cpu.stat").exists():
                return path
        return None

    def step_cpu(self, job_id: str, uid: int | None, node: str) -> dict[str, int] | None:
        """Cumulative CPU time (ns) of each step cgroup under the job's: ``{"batch": ns,
        "0": ns, ...}``; None without a job cgroup. A step without a readable counter (its
        cgroup just created or just removed) is left out. At most :data:`MAX_STEP_DIRS`
        folders are looked at (a job cannot make the sampler read without bound)."""
        v2 = self.v2(job_id)
        if v2 is not None:
            folder, counter, scale = v2, "cpu.stat", 1000
        else:
            v1 = self.v1(job_id, uid, node)
            if v1 is None:
                return None
            folder, counter, scale = v1[0], "cpuacct.usage", 1
        out: dict[str, int] = {}
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return out
        for entry in entries[:MAX_STEP_DIRS]:
            step = entry.name[len("step_") :]
            if not entry.name.startswith("step_") or not STEP_NAME.fullmatch(step):
                continue
            path = Path(entry.path) / counter
            value = _cpu_stat_usec(path) if scale == 1000 else _read_int(path)
            if value is not None:
                out[step] = value * scale
        return out

    def usage(self, job_id: str, uid: int | None, node: str) -> JobUsage | None:
        """The job's cumulative CPU time and current memory, or None if no cgroup (yet)."""
        v2 = self.v2(job_id)
        if v2 is not None:
            usec = _cpu_stat_usec(v2 / "cpu.stat")
            return JobUsage(
                None if usec is None else usec * 1000, _read_int(v2 / "memory.current"), "cgroup-v2"
            )
        v1 = self.v1(job_id, uid, node)
        if v1 is not None:
            cpu, mem = v1
            return JobUsage(
                _read_int(cpu / "cpuacct.usage"),
                _read_int(mem / "memory.usage_in_bytes"),
                "cgroup-v1",
            )
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


def cgroup_allocation(
    locator: CgroupLocator, job_id: str, uid: int | None, node: str
) -> tuple[int | None, int | None]:
    """The job's CPUs (its cpuset) and memory limit from its cgroup; None where unknown.

    v1: ``cpuset/slurm[_<node>]/uid_<uid>/job_<id>/cpuset.effective_cpus`` (or
    ``cpuset.cpus``) and ``memory/.../memory.limit_in_bytes``; v2: the job folder's
    ``cpuset.cpus.effective`` and ``memory.max``. Without ``ConstrainCores`` a cpuset may hold
    every CPU of the node: callers prefer Slurm's own figure (``SLURM_JOB_CPUS_PER_NODE``).
    """
    v2 = locator.v2(job_id)
    if v2 is not None:
        return (
            _read_cpus(v2 / "cpuset.cpus.effective", v2 / "cpuset.cpus"),
            _read_limit(v2 / "memory.max"),
        )
    v1 = locator.v1(job_id, uid, node)
    if v1 is None:
        return None, None
    cpu, mem = v1
    relative = cpu.relative_to(cpu.parents[2])  # slurm_dir/uid_dir/job_dir
    cpuset = locator.root / "cpuset" / relative
    return (
        _read_cpus(cpuset / "cpuset.effective_cpus", cpuset / "cpuset.cpus"),
        _read_limit(mem / "memory.limit_in_bytes"),
    )


STEPD_TITLE = re.compile(rb"slurmstepd: \[(\d+)\.[A-Za-z0-9_+-]+\]")
"""The title slurmstepd gives itself: ``slurmstepd: [JOBID.STEP]`` (``.batch``, ``.extern``,
``.0``...); JOBID is the job's own id (an array task's too)."""


KTHREADD = 2
"""The parent of every kernel thread."""


@dataclass
class _Proc:
    ppid: int
    uid: int | None
    ticks: int
    rss: int


class ProcScanner:
    """The ``proctrack/linuxproc`` fallback: a job's processes found through /proc.

    Only facts a user cannot forge decide which job a process belongs to (docs/security.md,
    "Attribution without cgroups"): it must descend from one of the job's ``slurmstepd``
    processes, which are root's (uid 0) and whose title names the job, and it must run as
    the job's owner. A process's own environment (``SLURM_JOB_ID``) is never read: any user
    can set it. What leaves the tree (a double fork re-parented to init) is not credited to
    the job: it goes to the node's remainder, as Slurm's own ``proctrack/linuxproc`` loses it.

    Per tick: one ``stat`` read per process; ``status`` (the real uid) once per user process
    and every tick for root's; ``cmdline`` for root's processes until they are known to be or
    not to be a job's slurmstepd (caches keyed by pid and start time).
    """

    SOURCE = "proc-tree"

    def __init__(
        self, proc_root: str | os.PathLike = "/proc", trusted_uids: frozenset[int] | None = None
    ) -> None:
        """Args:
        proc_root: the /proc tree to read.
        trusted_uids: owners whose processes may stand for a slurmstepd. Default: root
            and this process's own user, which is root for the node sampler (a
            sampler run by a user, as ``llem demo`` does, trusts only that user, who
            owns its store anyway).
        """
        self.proc = Path(proc_root)
        self.trusted = frozenset({0, os.geteuid()}) if trusted_uids is None else trusted_uids
        self._stepd: dict[tuple[int, int], str | None] = {}
        self._uid: dict[tuple[int, int], int] = {}
        self._seen: set[tuple[int, int]] = set()

    def usage_by_job(self, owners: Mapping[str, int | None]) -> dict[str, JobUsage]:
        """CPU time and memory of each job's processes.

        Args:
            owners: job id -> the job's owner uid (None: unknown; then the tree alone
                decides).
        """
        try:
            pids = [int(p) for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            return {}
        procs: dict[int, _Proc] = {}  # every readable process of the node
        children: dict[int, list[int]] = {}
        stepds: dict[int, str | None] = {}
        self._seen = set()
        for pid in pids:
            proc, start = self._read(pid)
            if proc is None:
                continue
            procs[pid] = proc
            children.setdefault(proc.ppid, []).append(pid)
            if proc.uid in self.trusted:
                key = (pid, start)
                if key not in self._stepd:
                    job, final = self._stepd_job(pid)
                    if not final:
                        continue
                    self._stepd[key] = job
                if self._stepd[key] is not None:
                    stepds[pid] = self._stepd[key]
        self._stepd = {k: v for k, v in self._stepd.items() if k in self._seen}
        self._uid = {k: v for k, v in self._uid.items() if k in self._seen}
        return {
            job: self._job_usage(job, uid, stepds, procs, children) for job, uid in owners.items()
        }

    def _job_usage(
        self,
        job: str,
        uid: int | None,
        stepds: dict[int, str | None],
        procs: dict[int, _Proc],
        children: dict[int, list[int]],
    ) -> JobUsage:
        """The processes under the job's slurmstepds that run as the job's owner."""
        cpu = mem = 0
        todo = [c for pid, j in stepds.items() if j == job for c in children.get(pid, [])]
        done: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in done or pid in stepds:  # a slurmstepd is never followed into
                continue
            done.add(pid)
            proc = procs[pid]
            if uid is None or proc.uid == uid:
                cpu += (proc.ticks * 1_000_000_000) // CLK_TCK
                mem += proc.rss
            todo.extend(children.get(pid, []))
        return JobUsage(cpu, mem, self.SOURCE)

    def _read(self, pid: int) -> tuple[_Proc | None, int]:
        """The process's parent, real uid, CPU ticks and RSS; and its start time."""
        try:
            text = (self.proc / str(pid) / "stat").read_text()
        except OSError:
            return None, 0
        fields = text[text.rfind(")") + 2 :].split()
        try:
            ppid = int(fields[1])
            ticks = int(fields[11]) + int(fields[12])
            rss = int(fields[21]) * PAGE_SIZE
            start = int(fields[19])
        except (IndexError, ValueError):
            return None, 0
        if pid == KTHREADD or ppid == KTHREADD:
            return _Proc(ppid, None, ticks, rss), start  # a kernel thread: in no job's tree
        key = (pid, start)
        self._seen.add(key)
        uid = self._uid.get(key)
        if uid is None:
            uid = self._real_uid(pid)
            # A user's process cannot become another user; root's may still drop to one
            # (slurmstepd's child before exec), so only other uids are kept.
            if uid is not None and uid not in self.trusted:
                self._uid[key] = uid
        return _Proc(ppid, uid, ticks, rss), start

    def _real_uid(self, pid: int) -> int | None:
        """The real uid (``/proc/PID/status``; the folder's owner is the effective uid, and
        root for a process that made itself non-dumpable: not a fact about its user)."""
        try:
            status = (self.proc / str(pid) / "status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("Uid:"):
                try:
                    return int(line.split()[1])
                except (IndexError, ValueError):
                    return None
        return None

    def _stepd_job(self, pid: int) -> tuple[str | None, bool]:
        """(the job a root process is the slurmstepd of, or None; whether that is final).

        A slurmstepd sets its title just after it starts: until then (``slurmstepd`` without
        a job) it is looked at again next time."""
        try:
            cmdline = (self.proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            return None, False
        match = STEPD_TITLE.match(cmdline)
        if match is not None:
            return match.group(1).decode("ascii"), True
        return None, b"slurmstepd" not in cmdline[:256]


def pid_in_job_cgroup(pid: int, job_id: str, proc_root: str | os.PathLike = "/proc") -> bool | None:
    """Whether a process lives in the job's cgroup; None when the node uses no job cgroups."""
    try:
        text = (Path(proc_root) / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    if "/job_" not in text:
        return None
    return f"/job_{job_id}/" in text or text.rstrip().endswith(f"/job_{job_id}")
