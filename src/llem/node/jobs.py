"""Job registrations from the Slurm hooks, and sealing finished jobs.

The Prolog/Epilog hook (slurm/llem-hook.sh) does the common case in bash alone, off the
Python start-up cost: it drops a registration file into ``RUN_DIR/NODE/jobs/`` (root-only)
and wakes the live sampler, which ingests it. The file is ``<job>.start`` or ``<job>.end``:
``KEY=VALUE`` records separated by NUL bytes, the Slurm variables of the hook's environment
plus ``LLEM_EVENT_US`` (wall-clock microseconds when the hook ran). Python's ``llem prolog``
and ``llem epilog`` ingest the same files when no sampler is alive.

A registration must never lose its job. One whose records parse but whose ``LLEM_EVENT_US``
is missing or not a number (a hook on a shell without a usable clock) is dated by the file's
mtime instead, flagged ``time_from_mtime``: the hook wrote the file at the event, so the
mtime is the event's time to within the write, and the flag says where the time came from.
Only a file that does not parse at all is moved to ``jobs/bad/``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from llem.fsutil import write_atomic
from llem.model import JobRecord
from llem.node.store import NodeStore

log = logging.getLogger(__name__)

_NAME = re.compile(r"^([0-9]+)\.(start|end)$")


TIME_FROM_MTIME = "time_from_mtime"
"""Flag of a run whose start or end time is its registration file's mtime."""


def parse_registration(data: bytes) -> dict[str, str]:
    """The ``KEY=VALUE`` records of a registration; ValueError if one is not such a record.

    ``LLEM_EVENT_US`` is not checked here: see :func:`event_ns`.
    """
    env = {}
    for item in data.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise ValueError(f"bad record {item[:40]!r}")
        env[key] = value
    return env


def event_ns(env: dict[str, str], path: Path) -> tuple[int, tuple[str, ...]]:
    """The registration's time (ns) and the flags it brings: ``LLEM_EVENT_US``, or else the
    file's mtime with the flag ``time_from_mtime``."""
    event_us = env.get("LLEM_EVENT_US", "")
    if event_us.isdigit():
        return int(event_us) * 1000, ()
    at_ns = path.stat().st_mtime_ns
    log.warning(
        "job registration %s has LLEM_EVENT_US %r: dated by its mtime (flag %s)",
        path,
        event_us[:40],
        TIME_FROM_MTIME,
    )
    return at_ns, (TIME_FROM_MTIME,)


def pending(jobs_dir: Path) -> list[tuple[str, str, Path]]:
    """(job_id, 'start'|'end', path) of waiting registrations, every start before any end."""
    try:
        names = os.listdir(jobs_dir)
    except OSError:
        return []
    found = []
    for name in names:
        m = _NAME.match(name)
        if m:
            found.append((m.group(1), m.group(2), jobs_dir / name))
    return sorted(found, key=lambda f: (f[1] != "start", int(f[0])))


def ingest(store: NodeStore, jobs_dir: Path, cluster: str, node: str) -> list[tuple[str, str]]:
    """Move waiting registrations into the store; return what was ingested.

    One with no usable ``LLEM_EVENT_US`` is dated by its mtime (see :func:`event_ns`). A file
    that cannot be parsed is moved to ``jobs/bad/`` (kept, never deleted) and logged.
    """
    from llem.node.slurm import gpu_indices, job_from_env

    done = []
    for job_id, kind, path in pending(jobs_dir):
        try:
            env = parse_registration(path.read_bytes())
            if env.get("SLURM_JOB_ID") != job_id:
                raise ValueError(f"SLURM_JOB_ID {env.get('SLURM_JOB_ID')!r} in {path.name}")
            at_ns, flags = event_ns(env, path)
            env.setdefault("SLURMD_NODENAME", node)
            if kind == "start":
                record = job_from_env(env, cluster, at_ns, gpu_indices(env))
                store.add_job(dataclasses.replace(record, flags=flags))
            else:
                end_job(store, env, cluster, at_ns, flags)
            path.unlink()
            done.append((job_id, kind))
        except (OSError, ValueError) as e:
            log.error("bad job registration %s: %s", path, e)
            bad = jobs_dir / "bad"
            bad.mkdir(mode=0o700, exist_ok=True)
            try:
                os.replace(path, bad / f"{path.name}.{time.time_ns()}")
            except OSError:
                pass
            _record_problem(
                store, jobs_dir, node, f"bad job registration {path.name} (kept in {bad}): {e}"
            )
    return done


def _record_problem(store: NodeStore, jobs_dir: Path, node: str, message: str) -> None:
    """Show a lost registration in `llem doctor` (the node's problems.log beside jobs/)."""
    from llem.node.daemon import record_problem
    from llem.paths import NodePaths

    record_problem(NodePaths(node, jobs_dir.parent, store.path), message)


def end_job(
    store: NodeStore, env: dict, cluster: str, end_ns: int, extra_flags: Iterable[str] = ()
) -> JobRecord:
    """Mark the job's latest running run ended, adding ``extra_flags`` to its flags; a job
    the Prolog never registered gets a run of its own (flag ``no_prolog``) so that the ledger
    knows it ran without data."""
    from llem.node.slurm import gpu_indices, job_from_env

    job_id = env["SLURM_JOB_ID"]
    runs = store.runs_of(job_id, "running")
    if runs:
        run = max(runs, key=lambda r: r.start_ns)
        flags = list(run.flags)
    else:
        record = job_from_env(env, cluster, end_ns, gpu_indices(env))
        run = store.run(store.add_job(record))
        flags = ["no_prolog"]
    flags += [f for f in extra_flags if f not in flags]
    store.update_job(run.run_id, end_ns=max(end_ns, run.start_ns), state="ended", flags=flags)
    return store.run(run.run_id)


def seal_figures(
    store: NodeStore, run_id: int, start_ns: int, end_ns: int
) -> tuple[float, set[str]]:
    """Coverage and flags of a run.

    Coverage is the share of the job's wall time inside sampler intervals in which every
    device the run draws energy from had data (for a run that drew none, some device): an
    interval with a gap, a reset or a read error of such a device is not covered, so lost
    data is never claimed (issue 20)."""
    span = max(1, end_ns - start_ns)
    covered, cursor = 0, start_ns
    for s, e in store.covered_spans(start_ns, end_ns, run_id):
        s, e = max(s, cursor, start_ns), min(e, end_ns)
        if e > s:
            covered += e - s
            cursor = e
    coverage = round(min(1.0, covered / span), 4)
    flags: set[str] = set()
    kinds = store.event_kinds_between(start_ns, end_ns)
    if "sampler_restart" in kinds:
        flags.add("sampler_restart")
    if kinds & {"counter_reset", "counter_gap", "device_lost"} or coverage < 0.99:
        flags.add("gap")
    for kind in ("attribution_error", "clock_jump"):
        if kind in kinds:
            flags.add(kind)
    if "estimated" in store.run_sources(run_id):
        flags.add("estimated")
    if store.run_split_devices(run_id):
        flags.add("gpu_package_split")  # a GPU charged a share of its package (MI250X, MI300X)
    window_ms = store.meter_window_ms()
    if window_ms and end_ns - start_ns < window_ms * 1_000_000:
        flags.add("shorter_than_meter_window")  # the power meter averages over longer
    return coverage, flags


def seal(
    store: NodeStore, run: JobRecord, extra_flags: set[str] | frozenset = frozenset()
) -> JobRecord:
    """Compute coverage and flags of an ended run and mark it sealed."""
    assert run.end_ns is not None
    coverage, flags = seal_figures(store, run.run_id, run.start_ns, run.end_ns)
    if run.attribution and '"allocation_unknown": true' in run.attribution:
        flags.add("allocation_unknown")  # charged by use: Slurm did not say its CPUs
    all_flags = sorted(set(run.flags) | flags | set(extra_flags))
    store.update_job(run.run_id, state="sealed", coverage=coverage, flags=all_flags)
    log.info(
        "job %s sealed: coverage %.3f, flags %s",
        run.job_id,
        coverage,
        ",".join(all_flags) or "none",
    )
    return store.run(run.run_id)


def finalize_ended(store: NodeStore, up_to_ns: int) -> list[JobRecord]:
    """Seal every ended run whose end is covered by data up to ``up_to_ns``."""
    return [seal(store, run) for run in store.runs_ended_by(up_to_ns)]


JOB_VARS = (
    "SLURM_JOB_ID",
    "SLURM_JOB_UID",
    "SLURM_JOB_USER",
    "SLURM_JOB_GID",
    "SLURM_JOB_ACCOUNT",
    "SLURM_JOB_PARTITION",
    "SLURM_CLUSTER_NAME",
    "SLURMD_NODENAME",
    "SLURM_NODELIST",
    "SLURM_JOB_NUM_NODES",
    "SLURM_JOB_CPUS_PER_NODE",
    "SLURM_JOB_GPUS",
    "SLURM_JOB_NAME",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SPANK_LLEM_ENERGY_TAG",
)
"""The variables slurm/llem-hook.sh records (keep the two lists equal)."""


def write_registration(jobs_dir: Path, kind: str, env: dict, at_ns: int | None = None) -> Path:
    """What the hook's bash does, in Python (``llem demo``, tests): ``<job>.start|end``."""
    job_id = env["SLURM_JOB_ID"]
    if not job_id.isdigit() or kind not in ("start", "end"):
        raise ValueError(f"bad registration {job_id!r} {kind!r}")
    at_ns = time.time_ns() if at_ns is None else at_ns
    records = [f"LLEM_EVENT_US={at_ns // 1000}"]
    records += [f"{k}={env[k]}" for k in JOB_VARS if k in env]
    data = b"".join(r.encode() + b"\0" for r in records)
    return write_atomic(jobs_dir, f"{job_id}.{kind}", data, 0o600)
