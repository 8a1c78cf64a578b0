"""The one place that talks to Slurm: the Prolog/Epilog environment and the jobs' cgroups.

Slurm's GPU index (``SLURM_JOB_GPUS``) is the ``/dev/nvidiaN`` minor number, not the NVML
index: allocations are mapped to NVML devices through their minor number.

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
from typing import Mapping

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


def gpu_minors(env: Mapping[str, str]) -> tuple[str, ...]:
    """The job's GPUs on this node as minor numbers (``SLURM_JOB_GPUS=0,2``)."""
    raw = env.get("SLURM_JOB_GPUS") or ""
    return tuple(g for g in (x.strip() for x in raw.split(",")) if g.isdigit())


def tag_from_env(env: Mapping[str, str]) -> str | None:
    """The job's energy tag, set by the llem SPANK plugin (``--energy-tag``)."""
    tag = env.get("SPANK_LLEM_ENERGY_TAG") or None
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", tag):
        return None  # the plugin validates; anything else did not come from it
    return tag


def job_from_env(env: Mapping[str, str], cluster: str, start_ns: int,
                 gpu_keys: tuple[str, ...] = ()) -> JobRecord:
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
        cpus=_cpus_here(env.get("SLURM_JOB_CPUS_PER_NODE")),
        gpus=gpu_keys,
        tag=tag_from_env(env),
        name=env.get("SLURM_JOB_NAME") or None,
        array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
        array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
    )


def _cpus_here(value: str | None) -> int | None:
    """First figure of SLURM_JOB_CPUS_PER_NODE (``4(x2),2`` -> 4)."""
    m = re.match(r"^(\d+)", value or "")
    return int(m.group(1)) if m else None


# -- cgroups -------------------------------------------------------------------------------


