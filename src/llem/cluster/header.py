"""Job headers from EpilogSlurmctld: what the controller knows of a job's end.

EpilogSlurmctld runs on the Slurm controller once per job. It gets the job's name, nodelist,
account and exit status, which the nodes' Prologs never see, and delivers them as a
``header`` slice beside the nodes' job slices.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from llem import __version__, slices
from llem.config import Config
from llem.hostlist import expand_hostlist
from llem.node.outbox import deliver
from llem.units import NS_PER_S

log = logging.getLogger(__name__)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = (env.get(name) or "").strip()
    try:
        return int(value)
    except ValueError:
        return None


def _exit_parts(env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(exit code, signal) from SLURM_JOB_EXIT_CODE2 (``E:S``) or the raw wait status."""
    code2 = (env.get("SLURM_JOB_EXIT_CODE2") or "").strip()
    exit_s, sep, sig_s = code2.partition(":")
    if sep and exit_s.isdigit() and sig_s.isdigit():
        return int(exit_s), int(sig_s)
    status = _env_int(env, "SLURM_JOB_EXIT_CODE")
    if status is None or status < 0:
        return None, None
    if os.WIFSIGNALED(status):
        return 0, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), 0


def _count_nodes(nodelist: str | None) -> int | None:
    try:
        return len(expand_hostlist(nodelist)) or None if nodelist else None
    except ValueError:
        log.warning("cannot expand the nodelist %r", nodelist)
        return None


def derive_state(exit_code: int | None, signal: int | None, derived_ec: int | None) -> str:
    """What the header can honestly say of the job's end.

    EpilogSlurmctld is not given the job state, only the batch script's wait status and the
    highest step exit code, so: ``COMPLETED`` (0, no signal, no failed step), ``FAILED``
    (non-zero exit), ``SIGNALED`` (killed by a signal: cancelled, timed out, out of memory or
    node failure, which slurmctld does not tell apart here; sacct does) or ``UNKNOWN``.
    """
    if exit_code is None:
        return "UNKNOWN"
    if signal:
        return "SIGNALED"
    if exit_code != 0 or (derived_ec or 0) != 0:
        return "FAILED"
    return "COMPLETED"


def header_slice_from_env(
    env: Mapping[str, str], cluster: str, *, now_ns: int | None = None
) -> dict:
    """The job header slice from EpilogSlurmctld's environment.

    Uses SLURM_JOB_ID, SLURM_JOB_NAME, SLURM_JOB_NODELIST, SLURM_JOB_ACCOUNT, SLURM_JOB_USER,
    SLURM_JOB_UID, SLURM_JOB_PARTITION, SLURM_JOB_EXIT_CODE (wait status) or
    SLURM_JOB_EXIT_CODE2 (``exit:signal``), SLURM_JOB_DERIVED_EC, SLURM_CLUSTER_NAME (wins over
    ``cluster``), SLURM_ARRAY_JOB_ID/SLURM_ARRAY_TASK_ID, and SLURM_JOB_START_TIME /
    SLURM_JOB_END_TIME (epoch seconds) where this Slurm sets them; otherwise the end is now.

    Raises:
        LedgerError: no usable SLURM_JOB_ID or cluster name.
    """
    env = slices.replace_lone_surrogates(dict(env))  # a job name of non-UTF-8 bytes
    now_ns = time.time_ns() if now_ns is None else now_ns
    start_s = _env_int(env, "SLURM_JOB_START_TIME")
    end_s = _env_int(env, "SLURM_JOB_END_TIME")
    exit_code, signal = _exit_parts(env)
    derived = (env.get("SLURM_JOB_DERIVED_EC") or "").partition(":")[0]
    derived_ec = int(derived) if derived.strip().isdigit() else None
    nodelist = (env.get("SLURM_JOB_NODELIST") or "").strip() or None
    job = {
        "job_id": (env.get("SLURM_JOB_ID") or "").strip(),
        "name": env.get("SLURM_JOB_NAME"),
        "user": env.get("SLURM_JOB_USER"),
        "uid": _env_int(env, "SLURM_JOB_UID"),
        "account": env.get("SLURM_JOB_ACCOUNT"),
        "partition": env.get("SLURM_JOB_PARTITION"),
        "nodelist": nodelist,
        "num_nodes": _count_nodes(nodelist),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "start_ns": start_s * NS_PER_S if start_s else None,
        "end_ns": end_s * NS_PER_S if end_s else now_ns,
        "exit_code": exit_code,
        "signal": signal,
        "derived_exit_code": derived_ec,
        "state": derive_state(exit_code, signal, derived_ec),
    }
    data = {
        "schema": slices.SCHEMA,
        "kind": "header",
        "cluster": (env.get("SLURM_CLUSTER_NAME") or "").strip() or cluster,
        "created_ns": now_ns,
        "producer": {"llem": __version__, "host": socket.gethostname()},
        "job": job,
    }
    return slices.checked(data)


def write_header(config: Config, env: Mapping[str, str] | None = None) -> Path:
    """EpilogSlurmctld's entry point: build the header slice and deliver it (bounded)."""
    env = os.environ if env is None else env
    return deliver(config, header_slice_from_env(env, config.cluster))
