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


def _derived_parts(env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(exit code, signal) of the highest step exit: ``E:S``, or a raw wait status (what
    Slurm 22.05 gives in SLURM_JOB_DERIVED_EC: 256 is exit code 1)."""
    text = (env.get("SLURM_JOB_DERIVED_EC") or "").strip()
    exit_s, sep, sig_s = text.partition(":")
    if sep:
        if exit_s.isdigit() and sig_s.isdigit():
            return int(exit_s), int(sig_s)
        return None, None
    if not text.isdigit():
        return None, None
    status = int(text)
    if os.WIFSIGNALED(status):
        return 0, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), 0


def derive_state(exit_code: int | None, signal: int | None, derived_ec: int | None = None) -> str:
    """What the header can honestly say of the job's end, in sacct's words.

    EpilogSlurmctld is not given the job state, only the batch script's exit status, and on
    Slurm 22.05 that is ``0:0`` for a job that was cancelled or timed out as well as for one
    that completed. So: ``FAILED`` when the batch script exited non-zero or was killed by a
    signal (sacct says ``FAILED N:0`` or ``FAILED 0:S`` for those), else ``UNKNOWN``: only
    Slurm's accounting (``sacct``, reconciled by ``llem aggregate``) tells ``COMPLETED`` from
    ``CANCELLED`` or ``TIMEOUT``. ``derived_ec`` does not change the state: sacct shows a job
    whose script exits 0 after a failed step as ``COMPLETED``.
    """
    del derived_ec  # the state does not depend on it (see above)
    if exit_code is None:
        return "UNKNOWN"
    if signal or exit_code != 0:
        return "FAILED"
    return "UNKNOWN"


def header_slice_from_env(
    env: Mapping[str, str], cluster: str, *, now_ns: int | None = None
) -> dict:
    """The job header slice from EpilogSlurmctld's environment.

    Uses SLURM_JOB_ID, SLURM_JOB_NAME, SLURM_JOB_NODELIST, SLURM_JOB_ACCOUNT, SLURM_JOB_USER,
    SLURM_JOB_UID, SLURM_JOB_PARTITION, SLURM_JOB_EXIT_CODE (wait status) or
    SLURM_JOB_EXIT_CODE2 (``exit:signal``), SLURM_JOB_DERIVED_EC (``E:S`` or a wait status),
    SLURM_CLUSTER_NAME (wins over
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
    derived_ec, derived_signal = _derived_parts(env)
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
        "derived_signal": derived_signal,
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
