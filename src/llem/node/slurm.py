"""The one place that talks to Slurm: the Prolog/Epilog environment and the jobs' cgroups.

Slurm's GPU index (``SLURM_JOB_GPUS``) is the position of the GPU in the node's GRES records,
which is neither the NVML index nor, in general, the ``/dev/nvidiaN`` minor number. The
sampler resolves it the way slurmd numbers its records (:class:`GpuMap`, from the node's
``gres.conf``) to the device keys the energy rows carry (``nvml:GPU-<uuid>``); where the
records cannot be read it assumes index = minor number and flags the job.

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
import re
from collections.abc import Mapping
from pathlib import Path

from llem.model import JobRecord


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def job_id_from_env(env: Mapping[str, str]) -> str:
    """The job id, validated: digits only (it names cgroup folders and store rows)."""
    job_id = env.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9]+", job_id):
        raise ValueError(f"SLURM_JOB_ID is missing or not a job id: {job_id[:32]!r}")
    return job_id


def node_name(env: Mapping[str, str]) -> str:
    """Slurm's node name (several slurmd may share a host); the host name outside Slurm."""
    from llem.slices import check_identifier  # the one rule for names (issue 20)

    name = env.get("SLURMD_NODENAME") or os.uname().nodename.split(".")[0]
    return check_identifier("node name", name)


def gpu_indices(env: Mapping[str, str]) -> tuple[str, ...]:
    """The job's GPUs on this node as Slurm's GRES indices (``SLURM_JOB_GPUS=0,2``)."""
    raw = env.get("SLURM_JOB_GPUS") or ""
    return tuple(g for g in (x.strip() for x in raw.split(",")) if g.isdigit())


def tag_from_env(env: Mapping[str, str]) -> str | None:
    """The job's energy tag, set by the llem SPANK plugin (``--energy-tag``)."""
    tag = env.get("SPANK_LLEM_ENERGY_TAG") or None
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", tag):
        return None  # the plugin validates; anything else did not come from it
    return tag


def job_from_env(
    env: Mapping[str, str], cluster: str, start_ns: int, gpu_keys: tuple[str, ...] = ()
) -> JobRecord:
    """A JobRecord from the slurmd Prolog/Epilog environment (Slurm 22.05 and later).

    Text that is not Unicode (names of non-UTF-8 bytes, which Python's environment holds as
    lone surrogates and SQLite refuses) gets U+FFFD, so that the job is still measured.
    """
    from llem.slices import replace_lone_surrogates

    env = replace_lone_surrogates(dict(env))
    return JobRecord(
        job_id=job_id_from_env(env),
        cluster=env.get("SLURM_CLUSTER_NAME") or cluster,
        node=node_name(env),
        start_ns=start_ns,
        uid=_int(env.get("SLURM_JOB_UID")),
        user=env.get("SLURM_JOB_USER") or None,
        gid=_int(env.get("SLURM_JOB_GID")),
        account=env.get("SLURM_JOB_ACCOUNT") or None,
        partition=env.get("SLURM_JOB_PARTITION") or None,
        nodelist=env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST") or None,
        num_nodes=_int(env.get("SLURM_JOB_NUM_NODES")),
        cpus=_cpus_here(
            env.get("SLURM_JOB_CPUS_PER_NODE"),
            env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST"),
            node_name(env),
        ),
        gpus=gpu_keys,
        tag=tag_from_env(env),
        name=env.get("SLURM_JOB_NAME") or None,
        array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
        array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
    )


def _cpus_here(
    value: str | None, nodelist: str | None = None, node: str | None = None
) -> int | None:
    """This node's figure of SLURM_JOB_CPUS_PER_NODE (``4(x2),2``: 4 on the first two nodes
    of SLURM_NODELIST, 2 on the third); the first figure when the node is not found."""
    counts: list[int] = []
    for m in re.finditer(r"(\d+)(?:\(x(\d+)\))?", value or ""):
        counts += [int(m.group(1))] * min(int(m.group(2) or 1), 100_000)
    if not counts:
        return None
    if nodelist and node:
        from llem.hostlist import expand_hostlist as expand

        try:
            names = expand(nodelist)
        except ValueError:
            names = []
        if node in names and names.index(node) < len(counts):
            return counts[names.index(node)]
    return counts[0]


# -- the node's CPUs as Slurm counts them ----------------------------------------------------


def slurm_conf_path(env: Mapping[str, str]) -> Path | None:
    """slurm.conf: ``SLURM_CONF`` (slurmd gives it to the Prolog, and the Prolog to the
    sampler), else the usual places, else a configless slurmd's cached copy."""
    conf = env.get("SLURM_CONF")
    if conf:
        return Path(conf)
    for candidate in (
        Path("/etc/slurm/slurm.conf"),
        Path("/etc/slurm-llnl/slurm.conf"),
        Path("/run/slurm/conf/slurm.conf"),
        Path("/var/spool/slurmd/conf-cache/slurm.conf"),
    ):
        if candidate.exists():
            return candidate
    return None


_TOPOLOGY = ("boards", "socketsperboard", "sockets", "corespersocket", "threadspercore")


def slurm_conf_node_cpus(text: str, node: str) -> int | None:
    """The CPUs slurm.conf gives ``node``: its ``NodeName=`` line's ``CPUs=`` (``Procs=``),
    else Boards x Sockets x CoresPerSocket x ThreadsPerCore as slurmctld derives it; values
    of ``NodeName=DEFAULT`` lines apply to the lines after them. None when no line names the
    node, or it gives neither CPUs nor topology (slurmd would then count the hardware).
    ``Include`` files are not followed."""
    from llem.hostlist import expand_hostlist

    defaults: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        fields = _gres_fields(line)
        names = fields.pop("nodename", None)
        if names is None:
            continue
        if names.upper() == "DEFAULT":
            defaults.update(fields)
            continue
        try:
            if node not in expand_hostlist(names):
                continue
        except ValueError:
            continue
        merged = {**defaults, **fields}
        cpus = _int(merged.get("cpus") or merged.get("procs"))
        if cpus is not None and cpus > 0:
            return cpus
        if not any(k in merged for k in _TOPOLOGY):
            return None
        boards = _int(merged.get("boards")) or 1
        sockets = _int(merged.get("socketsperboard")) or _int(merged.get("sockets")) or 1
        cores = _int(merged.get("corespersocket")) or 1
        threads = _int(merged.get("threadspercore")) or 1
        return max(1, boards) * max(1, sockets) * max(1, cores) * max(1, threads)
    return None


def slurm_node_cpus(path: str | os.PathLike | None, node: str) -> int | None:
    """:func:`slurm_conf_node_cpus` of a trusted slurm.conf (root's, written by no one
    else: it decides what every job is charged); None when there is none or it says
    nothing of the node."""
    if path is None or not _trusted_file(Path(path)):
        return None
    try:
        return slurm_conf_node_cpus(Path(path).read_text(errors="replace"), node)
    except OSError:
        return None


# -- GPU identity --------------------------------------------------------------------------

GPU_INDEX_ASSUMED_MINOR = "gpu_index_assumed_minor"
"""Flag of a job whose Slurm GPU indices were taken as minor numbers (no GRES records)."""
GPU_UNRESOLVED = "gpu_unresolved"
"""Flag of a job with a Slurm GPU index that names no GPU the sampler reads."""
GPU_KEY_PREFIX = "nvml:"


def is_device_key(gpu: str) -> bool:
    """True for a resolved entry of a job's ``gpus`` (a device key), False for a raw index."""
    return ":" in gpu


def gres_conf_path(env: Mapping[str, str]) -> Path:
    """The node's gres.conf: beside ``SLURM_CONF`` (slurmd gives it to the Prolog), else
    Debian's and Slurm's default places."""
    conf = env.get("SLURM_CONF")
    if conf:
        return Path(conf).parent / "gres.conf"
    for candidate in (Path("/etc/slurm/gres.conf"), Path("/etc/slurm-llnl/gres.conf")):
        if candidate.exists():
            return candidate
    return Path("/etc/slurm/gres.conf")


def _gres_fields(line: str) -> dict[str, str]:
    fields = {}
    for item in line.split():
        key, sep, value = item.partition("=")
        if sep:
            fields[key.lower()] = value
    return fields


def gres_gpu_files(text: str, node: str) -> tuple[list[str], bool]:
    """The device files of this node's ``Name=gpu`` records, in slurmd's index order.

    With ``AutoDetect=off`` (or none) slurmd numbers the records in the order of the file,
    each ``File=`` range expanded in order. Under ``AutoDetect=nvml|nvidia|rsmi`` it merges
    them with what it found and sorts them by file (``_sort_gpu_by_file`` in Slurm's
    ``gpu_common.c``: by the file name's numeric suffix), so the numbering follows the
    ``/dev/nvidiaN`` names. Lines for other nodes (``NodeName=``) are skipped.

    Returns:
        The files, and whether AutoDetect is on (then a node without ``File=`` lines numbers
        the GPUs it finds by their ``/dev/nvidiaN`` names, i.e. by minor number).
    """
    from llem.hostlist import expand_hostlist

    files: list[str] = []
    autodetect = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = _gres_fields(line)
        if "nodename" in fields and node not in expand_hostlist(fields["nodename"]):
            continue
        if fields.get("autodetect", "off").lower() not in ("off", "none", ""):
            autodetect = True
        if fields.get("name") == "gpu" and fields.get("file"):
            files += expand_hostlist(fields["file"])
    if autodetect:
        files.sort(key=_file_suffix)  # stable, like Slurm's list_sort on equal keys
    return files, autodetect


def _file_suffix(path: str) -> int:
    m = re.search(r"(\d+)$", path)
    return int(m.group(1)) if m else 0


def _trusted_file(path: Path) -> bool:
    """gres.conf decides which GPU a job is charged for: only root (or us) may write it."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


class GpuMap:
    """Slurm GPU index -> device key on this node, built once per sampler life.

    Args:
        devices: the sampler's devices; GPUs carry ``attrs['minor']``.
        node: Slurm's node name (selects ``NodeName=`` lines of gres.conf).
        gres_conf: the node's gres.conf; None or unreadable: index = minor number, flagged.
        minor_of: a device file's minor number (a test seam; default: ``os.stat``).
    """

    def __init__(
        self, devices, node: str, gres_conf: str | os.PathLike | None, minor_of=None
    ) -> None:
        minor_of = minor_of or _device_minor
        self.by_minor = {
            int(d.attrs["minor"]): d.key
            for d in devices
            if d.component == "gpu" and d.attrs.get("minor") is not None
        }
        self.keys = {d.key for d in devices if d.component == "gpu"}
        self.minors: list[int | None] | None = None
        self.source = "index = minor number (assumed)"
        path = Path(gres_conf) if gres_conf else None
        if path is not None and _trusted_file(path):
            try:
                files, autodetect = gres_gpu_files(path.read_text(errors="replace"), node)
            except OSError:
                files, autodetect = [], False
            if files:
                self.minors = [minor_of(f) for f in files]
                self.source = f"GRES records of {path}"
            elif autodetect:
                self.minors = list(sorted(self.by_minor))
                self.source = f"AutoDetect in {path}: GPUs by /dev/nvidiaN name"

    def resolve(self, gpus: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The device keys of a job's ``gpus`` (Slurm indices; keys are kept), and the flags
        the resolution brings. An index that names no GPU here stays as it is, flagged
        ``gpu_unresolved``: the ledger and the report treat such an entry as unresolved."""
        out, flags = [], set()
        for gpu in gpus:
            if is_device_key(gpu):
                out.append(gpu)
                continue
            minor: int | None = None
            if self.minors is None:
                minor = int(gpu) if gpu.isdigit() else None
                flags.add(GPU_INDEX_ASSUMED_MINOR)
            elif gpu.isdigit() and int(gpu) < len(self.minors):
                minor = self.minors[int(gpu)]
            key = self.by_minor.get(minor) if minor is not None else None
            if key is None:
                flags.add(GPU_UNRESOLVED)
                out.append(gpu)
            else:
                out.append(key)
        return tuple(out), tuple(sorted(flags))


DRM_MAJOR = 226
DRM_RENDER_BASE = 128


def _device_minor(path: str, sys_root: str = "/sys") -> int | None:
    """The GPU number of a character device file, as the sensors count GPUs (``minor``).

    ``/dev/nvidiaN`` (NVIDIA): the device's minor number (3 on most nodes for nvidia3, but
    only the device node itself says so). DRM nodes (AMD, ``AutoDetect=rsmi`` and gres.conf
    ``File=/dev/dri/renderD128``): the render node's minor minus 128, the amdsmi sensor's
    ``minor``; a card node (``/dev/dri/card1``) is taken to its GPU's render node through
    sysfs, as card numbers count other display devices too (a BMC's VGA is often card0)."""
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        return None
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    if major != DRM_MAJOR:
        return minor
    if minor >= DRM_RENDER_BASE:
        return minor - DRM_RENDER_BASE
    try:
        names = os.listdir(f"{sys_root}/dev/char/{DRM_MAJOR}:{minor}/device/drm")
    except OSError:
        return None
    renders = [int(n[7:]) for n in names if n.startswith("renderD") and n[7:].isdigit()]
    return renders[0] - DRM_RENDER_BASE if len(renders) == 1 else None


# -- cgroups -------------------------------------------------------------------------------
